"""The static decode step (rows padded to a bucket, attention over a fixed span under a
mask, inputs in preallocated buffers: what a CUDA graph replays) computes what the dynamic
step computes, checked here on the CPU in float32, where any difference would be the
step's, not the rounding's."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import (
    FAMILIES,
    generate_reference,
    random_prompts,
    serve_like,
    tiny_model,
)

from rag.config import compose
from rag.service.engine.engine import Engine
from rag.service.engine.runner import SlotModel
from rag.service.engine.static import row_buckets, span_buckets
from rag.service.models import load_generator
from rag.service.shaped import SHAPES, borrowed_tokenizer
from rag.service.shaped import build as build_shaped


def test_buckets_cover_every_batch_and_span():
    assert row_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert row_buckets(12) == [1, 2, 4, 8, 12]
    assert row_buckets(1) == [1]
    assert span_buckets(1056) == [256, 512, 768, 1024, 1056]
    assert span_buckets(64) == [64]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_steps_give_the_dynamic_steps_logits(family):
    """Rows at positions on both sides of a span bucket's end (256), fewer rows than their
    bucket (3 of 4): each row's logits are the dynamic step's, and so its token."""
    model = tiny_model(family)
    dynamic = SlotModel(model, slots=4, positions=300)
    static = SlotModel(model, slots=4, positions=300, decode="static")
    prompts = random_prompts([5, 270, 40])
    for slots in (dynamic, static):
        slots.prefill([(slot, prompt, 0) for slot, prompt in enumerate(prompts)])
    for step, rows in enumerate((3, 2, 1)):
        tokens = [7 + step + row for row in range(rows)]
        positions = [len(p) + step for p in prompts[:rows]]
        expected = dynamic.decode(tokens, positions)
        got = static.decode(tokens, positions)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert static.static is not None and dynamic.static is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_engine_on_static_steps_gives_generates_greedy_tokens(family):
    model = tiny_model(family)
    engine = Engine(SlotModel(model, slots=3, positions=64, decode="static"), eos_token_id=2)
    prompts = random_prompts([1, 5, 17, 30, 9])
    references = [generate_reference(model, prompt, 12) for prompt in prompts]
    sequences = serve_like(engine, prompts, 12)
    assert [s.finish for s in sequences].count("cancelled") == 1
    for sequence, reference in zip(sequences, references, strict=True):
        expected = reference.tokens[: len(sequence.tokens)]
        assert sequence.tokens == expected
        if sequence.finish != "cancelled":
            assert sequence.tokens == reference.tokens


def test_the_qwen_shaped_generators_first_layer_decodes_the_same_on_static_steps():
    """The study's generator shape (vocabulary, heads, grouped keys, biased q/k/v), one
    layer of it: the static step's logits are the dynamic step's."""
    tokenizer = borrowed_tokenizer("minilm")  # any ids below its vocabulary will do
    shape = SHAPES["qwen2.5-1.5b-instruct"]
    model = build_shaped(shape, tokenizer, torch.device("cpu"), torch.float32, 0, layers=1)
    dynamic = SlotModel(model, slots=2, positions=64)
    static = SlotModel(model, slots=2, positions=64, decode="static")
    prompts = random_prompts([9, 23], vocab=len(tokenizer))
    for slots in (dynamic, static):
        slots.prefill([(slot, prompt, 0) for slot, prompt in enumerate(prompts)])
    positions = [len(p) for p in prompts]
    torch.testing.assert_close(
        static.decode([11, 12], positions), dynamic.decode([11, 12], positions)
    )


def test_decode_step_choices_are_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        SlotModel(model, slots=2, positions=32, decode="graphs")
    with pytest.raises(ValueError, match="is not one of dynamic, static, graphs"):
        SlotModel(model, slots=2, positions=32, decode="compiled")


def test_the_cpu_decodes_on_dynamic_steps_unless_told(cache_dir):
    overrides = ["model=tiny", f"model.cache_dir={cache_dir}"]
    assert load_generator(compose(overrides).model).engine.model.decode_step == "dynamic"
    told = load_generator(compose([*overrides, "model.decode_step=static"]).model)
    assert told.engine.model.decode_step == "static"
