"""The step-level engine gives the tokens transformers' `generate` gives: the same greedy
answer for prompts of different lengths, whatever slots they share, whatever else runs
beside them.  4-bit decode is checked block by block against the GGUF's own dequantiser
(its effect on whole answers is an agreement rate, measured in bench/bench_engine.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from rag.config import compose
from rag.service.engine import kernels
from rag.service.engine.engine import Sequence
from rag.service.engine.int4 import READERS, Int4Linear, use_int4_for_decode, write_blocks
from rag.service.engine.int4_rows import (
    AUTO,
    MOST_ROWS,
    PAYS_AT_MOST,
    decode_layers,
    int4_rows,
    rows_that_pay,
)
from rag.service.engine.slots import causal_mask, eager_attention, sdpa_attention
from rag.service.generator import Generator
from rag.service.models import TINY_TOKENIZER, build_engine, load_generator, tiny_decoder
from rag.service.shaped import borrowed_tokenizer

QUESTIONS = [
    "Why?",
    "Context:\nBees dance to show where flowers are.\n\nQuestion: how do bees find flowers?",
    "Context:\n" + "Dogs were domesticated from wolves long ago. " * 8 + "\n\nQuestion: from what?",
    "Context:\n" + "Horses were first ridden on the steppe by nomads. " * 20 + "\n\nQuestion: who?",
]


def tiny_generator(cache_dir, *overrides: str) -> Generator:
    cfg = compose(["model=tiny", f"model.cache_dir={cache_dir}", *overrides])
    return load_generator(cfg.model)


def prompts_of(generator: Generator) -> list[str]:
    return [generator.render(generator.cfg.system_prompt, q) for q in QUESTIONS]


def as_tuples(generations) -> list[tuple[str, int, int]]:
    return [(g.text, g.prompt_tokens, g.new_tokens) for g in generations]


@pytest.mark.parametrize("slots", [1, 2, 8])
def test_engine_gives_generates_greedy_tokens_for_prompts_of_different_lengths(cache_dir, slots):
    """Fewer slots than prompts makes later prompts wait and enter freed slots (and active
    sequences move down into holes); more slots decodes them all together."""
    generator = tiny_generator(cache_dir, f"model.engine_slots={slots}", "model.max_new_tokens=12")
    assert generator.engine is not None and generator.engine.prefix  # the prefix is shared
    prompts = prompts_of(generator)
    lengths = {len(ids) for ids in generator.encode(prompts)}
    assert len(lengths) == len(prompts)
    reference = [generator.generate_with_transformers([p])[0] for p in prompts]
    assert as_tuples(generator.generate(prompts)) == as_tuples(reference)


def test_torchs_decode_attention_gives_generates_tokens_where_the_kernels_are_absent(
    cache_dir, monkeypatch
):
    """The path of a machine without the engine's kernels (not built, or another CPU),
    taken here whether or not they were built."""
    monkeypatch.setattr(kernels, "LOADED", False)
    generator = tiny_generator(cache_dir, "model.engine_slots=2", "model.max_new_tokens=12")
    prompts = prompts_of(generator)
    reference = [generator.generate_with_transformers([p])[0] for p in prompts]
    assert as_tuples(generator.generate(prompts)) == as_tuples(reference)


def test_a_prompt_without_the_shared_prefix_is_prefilled_whole(cache_dir):
    generator = tiny_generator(cache_dir)
    prompt = "No system prompt here, just a question?"
    prefix = generator.engine.prefix
    assert generator.encode([prompt])[0][: len(prefix)] != prefix
    assert as_tuples(generator.generate([prompt])) == as_tuples(
        generator.generate_with_transformers([prompt])
    )


def test_eos_is_held_back_until_the_minimum_with_ignore_eos(cache_dir):
    generator = tiny_generator(cache_dir, "model.ignore_eos=true", "model.max_new_tokens=10")
    prompts = prompts_of(generator)
    engine = as_tuples(generator.generate(prompts))
    assert [new for _, _, new in engine] == [10] * len(prompts)
    assert engine == as_tuples(generator.generate_with_transformers(prompts))


def test_a_sequence_leaves_at_eos_and_its_slot_serves_the_next(cache_dir):
    generator = tiny_generator(cache_dir, "model.engine_slots=1", "model.max_new_tokens=12")
    engine = generator.engine
    ids = generator.encode(prompts_of(generator))
    free_run = engine.generate([generator.sequence(ids[2])])[0].tokens
    engine.eos_token_id = free_run[3]  # the fourth token it chooses now ends it
    alone = engine.generate([generator.sequence(ids[1])])[0].tokens
    first, second = engine.generate([generator.sequence(ids[2]), generator.sequence(ids[1])])
    assert first.finish == "eos" and first.tokens == free_run[: free_run.index(free_run[3]) + 1]
    assert second.tokens == alone and not engine.busy  # the freed slot, reused


def test_a_cancelled_sequence_frees_its_slot_and_changes_no_other_answer(cache_dir):
    generator = tiny_generator(cache_dir, "model.engine_slots=3", "model.max_new_tokens=12")
    engine = generator.engine
    ids = generator.encode(prompts_of(generator))
    alone = [engine.generate([generator.sequence(i)])[0].tokens for i in ids]
    sequences = [engine.submit(generator.sequence(i)) for i in ids]
    engine.step()
    engine.step()
    engine.cancel(sequences[0])  # in slot 0: the last active sequence moves into it
    engine.cancel(sequences[3])  # still waiting: it never takes a slot
    while engine.busy:
        engine.step()
    assert [s.finish for s in sequences] == ["cancelled", "length", "length", "cancelled"]
    # A sequence's first step gives its prefill's token, each later one a decoded token.
    assert len(sequences[0].tokens) == 2 and sequences[3].tokens == []
    assert [s.tokens for s in sequences[1:3]] == alone[1:3]


def test_a_step_reports_what_it_did(cache_dir):
    generator = tiny_generator(cache_dir, "model.max_new_tokens=3")
    engine = generator.engine
    ids = generator.encode(prompts_of(generator)[:2])
    for prompt in ids:
        engine.submit(generator.sequence(prompt))
    first = engine.step()
    assert (first.prefilled, first.decoded) == (2, 0)
    assert first.prefill_tokens == sum(len(i) - len(engine.prefix) for i in ids)
    engine.submit(generator.sequence(ids[0]))
    second = engine.step()  # the newcomer's prefill in the same pass as tokens 2 of 3
    assert (second.prefilled, second.decoded, second.finished) == (1, 2, [])
    third = engine.step()  # tokens 3 of 3
    assert third.prefilled == 0 and len(third.finished) == 2 and engine.busy


def test_a_prompt_too_long_for_a_slot_is_refused_before_it_runs(cache_dir):
    generator = tiny_generator(cache_dir)
    too_long = Sequence(list(range(5, 5 + generator.engine.positions)), max_new_tokens=4)
    with pytest.raises(ValueError, match="positions of a slot"):
        generator.engine.submit(too_long)
    assert not generator.engine.busy


def test_sampling_is_reproducible_from_the_seed(cache_dir):
    overrides = ("model.temperature=1.0", "model.top_p=0.9", "model.max_new_tokens=12")
    prompts = prompts_of(tiny_generator(cache_dir))
    first = tiny_generator(cache_dir, *overrides).generate(prompts)
    again = tiny_generator(cache_dir, *overrides).generate(prompts)
    other = tiny_generator(cache_dir, *overrides, "model.seed=1").generate(prompts)
    assert as_tuples(first) == as_tuples(again)
    assert as_tuples(first) != as_tuples(other)


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
def test_blocks_hold_what_the_gguf_dequantiser_reads(kind):
    weights = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32)
    raw = quants.quantize(weights, kind)
    rebuilt = sum(part.dequantize() for part in READERS[kind](raw))
    expected = torch.from_numpy(quants.dequantize(raw, kind))
    torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
def test_int4_linear_multiplies_few_rows_in_4_bit_and_many_with_the_dense_weight(kind):
    weights = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    raw = quants.quantize(weights, kind)
    dense = torch.nn.Linear(128, 64, bias=False)
    dense.weight.data = torch.from_numpy(quants.dequantize(raw, kind)) + 1.0  # tell them apart
    layer = Int4Linear.from_blocks(dense, READERS[kind](raw), max_rows=4)
    x = torch.randn(2, 2, 128)  # 4 rows
    exact = x @ torch.from_numpy(quants.dequantize(raw, kind)).T
    torch.testing.assert_close(layer(x), exact, rtol=1e-3, atol=1e-3)
    many = torch.randn(5, 128)
    torch.testing.assert_close(layer(many), dense(many))


def test_4_bit_blocks_go_back_into_the_layers_they_name_and_never_where_they_do_not_fit(
    tmp_path, cache_dir
):
    model = tiny_generator(cache_dir).model
    down = model.model.layers[0].mlp.down_proj  # [64, 128]
    raw = quants.quantize(down.weight.detach().numpy(), GGMLQuantizationType.Q4_1)
    parts = READERS[GGMLQuantizationType.Q4_1](raw)
    path = tmp_path / "blocks.safetensors"
    write_blocks(path, {"model.layers.0.mlp.down_proj.weight": parts})
    assert use_int4_for_decode(model, path, max_rows=4) == 1
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int4Linear) and layer.dense is down
    x = torch.randn(3, 128)
    exact = x @ torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1)).T
    torch.testing.assert_close(layer(x), exact, rtol=1e-3, atol=1e-3)

    write_blocks(path, {"model.layers.0.mlp.up_proj.weight": parts})  # [128, 64]: no fit
    with pytest.raises(ValueError, match="do not fit"):
        use_int4_for_decode(model, path, max_rows=4)
    write_blocks(path, {"model.layers.9.mlp.down_proj.weight": parts})  # no such layer
    with pytest.raises(ValueError, match="do not fit"):
        use_int4_for_decode(model, path, max_rows=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_only_a_bf16_model_decodes_in_4_bit(tmp_path, dtype):
    """torch's 4-bit CPU kernel is vectorised for bf16 activations only; in the other
    dtypes it is slower than the dense weight, so the engine keeps the dense layers."""
    tokenizer = borrowed_tokenizer(TINY_TOKENIZER)
    model = tiny_decoder(tokenizer, seed=0).to(dtype).eval()
    down = model.model.layers[0].mlp.down_proj
    q4_1 = GGMLQuantizationType.Q4_1
    raw = quants.quantize(down.weight.detach().float().numpy(), q4_1)
    path = tmp_path / "blocks.safetensors"
    write_blocks(path, {"model.layers.0.mlp.down_proj.weight": READERS[q4_1](raw)})
    assert build_engine(model, tokenizer, compose(["model=tiny"]).model, path) is not None
    four_bit = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(four_bit) == (1 if dtype == torch.bfloat16 else 0)


def bf16_model_with_4_bit_down_projections(tmp_path):
    """A tiny bf16 decoder and a blocks file holding each layer's down projection."""
    tokenizer = borrowed_tokenizer(TINY_TOKENIZER)
    model = tiny_decoder(tokenizer, seed=0).to(torch.bfloat16).eval()
    q4_1 = GGMLQuantizationType.Q4_1
    blocks = {}
    for n, layer in enumerate(model.model.layers):
        raw = quants.quantize(layer.mlp.down_proj.weight.detach().float().numpy(), q4_1)
        blocks[f"model.layers.{n}.mlp.down_proj.weight"] = READERS[q4_1](raw)
    path = tmp_path / "blocks.safetensors"
    write_blocks(path, blocks)
    return model, tokenizer, path


def test_auto_times_up_to_how_many_rows_4_bit_pays_and_every_4_bit_layer_keeps_it(tmp_path):
    model, tokenizer, path = bf16_model_with_4_bit_down_projections(tmp_path)
    cfg = compose(["model=tiny"]).model
    assert cfg.int4_max_rows == AUTO  # the default
    engine = build_engine(model, tokenizer, cfg, path)
    assert engine is not None
    chosen = int4_rows(model)
    assert 0 <= chosen <= MOST_ROWS
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == len(model.model.layers)
    assert {layer.max_rows for layer in layers} == {chosen}
    assert decode_layers(model) == layers  # what was timed: each step's 4-bit layers


@pytest.mark.parametrize(
    ("ratios", "chosen"),
    [
        ([0.5, 0.6, 0.7, 0.95, 0.9, 0.8], 3),  # a near-tie ends it: later rows are not asked
        ([PAYS_AT_MOST, 0.9], 1),  # at the bound it still pays
        ([0.99, 0.5], 0),
        ([0.5] * MOST_ROWS, MOST_ROWS),
    ],
)
def test_4_bit_is_kept_only_up_to_the_rows_where_it_is_clearly_faster(ratios, chosen):
    asked: list[int] = []

    def ratio(rows: int) -> float:
        asked.append(rows)
        return ratios[rows - 1]

    assert rows_that_pay(ratio) == chosen
    assert asked == list(range(1, min(chosen + 1, MOST_ROWS) + 1))


@pytest.mark.parametrize("rows", [0, 3, 40])
def test_an_explicit_int4_max_rows_overrides_the_timing(tmp_path, rows):
    model, tokenizer, path = bf16_model_with_4_bit_down_projections(tmp_path)
    cfg = compose(["model=tiny", f"model.int4_max_rows={rows}"]).model
    assert build_engine(model, tokenizer, cfg, path) is not None
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers and {layer.max_rows for layer in layers} == {rows}
    assert int4_rows(model) == rows


@pytest.mark.parametrize("setting", ["many", "-1"])
def test_a_wrong_int4_max_rows_is_refused_with_what_it_may_be(tmp_path, setting):
    model, tokenizer, path = bf16_model_with_4_bit_down_projections(tmp_path)
    cfg = compose(["model=tiny", f"model.int4_max_rows={setting}"]).model
    with pytest.raises(ValueError, match="'auto' or a row count"):
        build_engine(model, tokenizer, cfg, path)


@pytest.mark.packaged
def test_engine_gives_generates_greedy_tokens_on_the_default_model(cache_dir):
    """In float32 and without 4-bit decode: any difference is then the engine's, not the
    rounding's (bf16 rounds differently at each matrix shape, which can flip a near-tie)."""
    cfg = compose(
        ["model.dtype=float32", "model.int4_decode=false", f"model.cache_dir={cache_dir}"]
    )
    generator = load_generator(cfg.model)
    prompts = prompts_of(generator)
    reference = [generator.generate_with_transformers([p])[0] for p in prompts]
    assert as_tuples(generator.generate(prompts)) == as_tuples(reference)


@pytest.mark.packaged
def test_the_default_model_decodes_its_gguf_layers_in_4_bit(cache_dir):
    cfg = compose(["model.dtype=bfloat16", f"model.cache_dir={cache_dir}"])
    generator = load_generator(cfg.model)
    layers = [m for m in generator.model.modules() if isinstance(m, Int4Linear)]
    decoder_layers = generator.model.model.layers
    fused = [m for d in decoder_layers for m in (d.self_attn.qkv_proj, d.mlp.gate_up_proj)]
    assert all(isinstance(m, Int4Linear) for m in fused)  # the decode step's fused matmuls
    # q k v o gate up down, LM head, and the fused q/k/v and gate/up
    assert len(layers) == 7 * len(decoder_layers) + 1 + len(fused)
    (answer,) = generator.generate(prompts_of(generator)[1:2])
    assert "bee" in answer.text.lower() or "dance" in answer.text.lower()


@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_prompt_attention_computes_what_sdpa_computes(past, dtype):
    """The CPU's prompt attention against SDPA (the other devices' path) on the same
    grouped-query inputs, with and without reused prefix positions."""
    generator = torch.Generator().manual_seed(0)
    count, heads, kv_heads, head_dim = 7, 6, 2, 8
    query = torch.randn(count, heads, head_dim, generator=generator).to(dtype)
    keys, values = (
        torch.randn(past + count, kv_heads, head_dim, generator=generator).to(dtype)
        for _ in range(2)
    )
    mask = causal_mask(count, past, torch.device("cpu"))
    eager = eager_attention(query, keys, values, mask, 0.3)
    sdpa = sdpa_attention(query, keys, values, 0.3)
    assert eager.shape == (count, heads, head_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(eager.float(), sdpa.float(), atol=tolerance, rtol=tolerance)
    # the first prompt token sees the reused positions and itself only
    assert torch.isinf(mask[0, past + 1 :]).all() and (mask[0, : past + 1] == 0).all()
