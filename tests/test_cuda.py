"""The GPU path, on a CUDA GPU (skipped where none is visible; bench/gpu_check.sh runs
these on a lent one): in fp16 and bf16 the engine's greedy tokens are generate's, on tiny
models of every family and on the a6000-shaped generator's first layers; decode steps
replayed from CUDA graphs give the tokens of the same steps run eagerly, and no step waits
for the GPU; prompt attention runs on the flash kernel; the batched and continuous servers
answer; peak GPU memory is bounded; `model.dtype=auto` picks what the GPU computes
natively.

Two kernels that round differently (generate's separate q, k, v matmuls, the engine's
fused one) can flip a near tie in half precision: a greedy answer may leave generate's
only where generate's two candidates were that close (`assert_greedy_matches`)."""

from __future__ import annotations

import gc
import threading

import httpx
import pytest
import torch
from engine_helpers import (
    EOS,
    FAMILIES,
    assert_greedy_matches,
    generate_reference,
    random_prompts,
    serve_like,
    tiny_model,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from rag.config import compose
from rag.service.engine.engine import Engine
from rag.service.engine.runner import SlotModel
from rag.service.engine.slots import causal_mask, eager_attention, sdpa_attention
from rag.service.models import load_generator, pick_dtype
from rag.service.shaped import SHAPES, borrowed_tokenizer
from rag.service.shaped import build as build_shaped

pytestmark = pytest.mark.cuda

NEAR_TIE = {torch.float16: 0.02, torch.bfloat16: 0.1}  # logits' standard deviations
LOGITS_CLOSE = {torch.float16: 0.02, torch.bfloat16: 0.06}  # of the largest logit


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=LOGITS_CLOSE[dtype] * scale, rtol=0
    )


@pytest.mark.parametrize("decode", ["graphs", "dynamic"])
@pytest.mark.parametrize("dtype", list(NEAR_TIE))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_engine_gives_generates_greedy_tokens_on_cuda(family, dtype, decode):
    """Prompts of different lengths, fewer slots than prompts, newcomers prefilled in the
    running batch's pass, a cancellation (`serve_like`)."""
    model = tiny_model(family, "cuda", dtype)
    prompts = random_prompts([1, 5, 17, 30, 9])
    references = [generate_reference(model, prompt, 12) for prompt in prompts]
    engine = Engine(SlotModel(model, slots=3, positions=64, decode=decode), eos_token_id=EOS)
    assert_greedy_matches(serve_like(engine, prompts, 12), references, NEAR_TIE[dtype])


@pytest.mark.parametrize("dtype", list(NEAR_TIE))
def test_graph_replays_give_the_tokens_of_the_same_steps_run_eagerly(dtype):
    """Same kernels on the same shapes: the same tokens, across a span bucket's end."""
    model = tiny_model("qwen2", "cuda", dtype)
    prompts = random_prompts([250, 5, 17, 240, 9])
    answers = {}
    for decode in ("static", "graphs"):
        engine = Engine(SlotModel(model, slots=3, positions=300, decode=decode), EOS)
        answers[decode] = [s.tokens for s in serve_like(engine, prompts, 20)]
    assert answers["graphs"] == answers["static"]


@pytest.mark.parametrize("dtype", list(NEAR_TIE))
def test_the_a6000_shaped_generators_first_layers_on_cuda(dtype):
    """Two layers of the study's generator at its sizes (151,936 tokens, 12 query heads on
    2 key heads of 128, biased q/k/v): mixed passes and graph-replayed decode steps give
    the logits of the model's own forward, and the engine generate's greedy tokens."""
    tokenizer = borrowed_tokenizer("smollm2")
    shape = SHAPES["qwen2.5-1.5b-instruct"]
    model = build_shaped(shape, tokenizer, torch.device("cuda"), dtype, seed=0, layers=2)
    assert tokenizer.eos_token_id == EOS
    slots = SlotModel(model, slots=3, positions=300, decode="graphs")
    a, b, c = random_prompts([40, 260, 7], vocab=len(tokenizer))

    def last_logits(*sequences: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            ids = [torch.tensor([s], device="cuda") for s in sequences]
            return torch.stack([model(i).logits[0, -1] for i in ids])

    slots.prefill([(0, a[:-1], 0), (1, b[:-1], 0)])
    mixed = slots.step([(2, c, 0)], [a[-1], b[-1]], [len(a) - 1, len(b) - 1])
    assert_logits_close(mixed, last_logits(c, a, b), dtype)
    decoded = slots.decode([7, 8, 9], [len(a), len(b), len(c)])
    assert_logits_close(decoded, last_logits([*a, 7], [*b, 8], [*c, 9]), dtype)

    prompts = random_prompts([1, 30, 170, 12, 60], vocab=len(tokenizer), seed=3)
    references = [generate_reference(model, prompt, 10) for prompt in prompts]
    engine = Engine(SlotModel(model, slots=3, positions=300, decode="graphs"), EOS)
    assert_greedy_matches(serve_like(engine, prompts, 10), references, NEAR_TIE[dtype])


def test_a_step_queues_its_work_without_waiting_for_the_gpu():
    """Under torch's sync debug mode any synchronising call (`.item()`, `.tolist()`, a copy
    from pageable memory) raises: a mixed pass and a replayed decode step make none."""
    model = tiny_model("qwen2", "cuda", torch.float16)
    slots = SlotModel(model, slots=3, positions=64, decode="graphs")
    a, b = random_prompts([9, 17])
    assert len(slots.static.captured) == 3  # rows 1, 2, 3 over the whole slot: captured
    slots.prefill([(0, a, 0)])
    slots.decode([7], [len(a)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mixed = slots.step([(1, b, 0)], [8], [len(a) + 1])
        decoded = slots.decode([9, 10], [len(a) + 2, len(b)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mixed.shape[0] == 2 and decoded.shape[0] == 2


@pytest.mark.parametrize("past", [0, 5])
def test_prompt_attention_runs_on_the_flash_kernel(past):
    generator = torch.Generator(device="cuda").manual_seed(0)
    count, heads, kv_heads, head_dim = 37, 12, 2, 128

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=generator, dtype=torch.float16)

    query, keys, values = (
        draw(count, heads, head_dim),
        *(draw(past + count, kv_heads, head_dim) for _ in range(2)),
    )
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot take it
        flash = sdpa_attention(query, keys, values, 0.1)
    mask = causal_mask(count, past, query.device)
    eager = eager_attention(query, keys, values, mask, 0.1)
    # (eager rounds its fp16 scores before the softmax; a misaligned causal bias would
    # differ by tenths in the first rows)
    torch.testing.assert_close(flash.float(), eager.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("variant", ["batched", "continuous"])
def test_the_servers_answer_on_cuda(start_server, variant):
    server = start_server(
        f"variant={variant}", "model.device=cuda", "model.dtype=float16",
        "model.ignore_eos=true", "model.max_new_tokens=16",
    )  # fmt: skip
    answers = send_together(server.url, 8)
    assert [a.status_code for a in answers] == [200] * 8
    assert {a.json()["new_tokens"] for a in answers} == {16}
    runtime = httpx.get(f"{server.url}/stats", timeout=10).json()["runtime"]
    assert runtime["device"] == "cuda:0" and runtime["decode_step"] == "graphs"


def test_the_a6000_shaped_preset_serves_continuously_on_cuda(start_server):
    server = start_server("variant=continuous", model="a6000-shaped", ready_timeout_s=300)
    answers = send_together(server.url, 12)
    assert [a.status_code for a in answers] == [200] * 12
    assert {a.json()["new_tokens"] for a in answers} == {32}
    runtime = httpx.get(f"{server.url}/stats", timeout=10).json()["runtime"]
    assert runtime["weights"] == "random" and runtime["dtype"] == "float16"


def send_together(url: str, count: int) -> list[httpx.Response]:
    answers: list[httpx.Response] = [None] * count  # type: ignore[list-item]

    def send(i: int) -> None:
        body = {"query": f"Which animals can hover in the air? ({i})", "k": 2}
        answers[i] = httpx.post(f"{url}/rag", json=body, timeout=120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    return answers


def test_peak_gpu_memory_of_the_a6000_shaped_generator_is_bounded(cache_dir, capsys):
    """Weights, the slot cache and at most 2 GiB more, with every slot full of long
    prompts; reported whatever it is (above what this process held before)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cfg = compose(["model=a6000-shaped", f"model.cache_dir={cache_dir}"]).model
    generator = load_generator(cfg)
    weights = sum(p.nbytes for p in generator.model.parameters())
    cache = generator.engine.model.cache.nbytes
    prompt = generator.render(cfg.system_prompt, "Context:\n" + "Bees dance. " * 300)
    slots = generator.engine.slots
    answers = generator.generate([prompt] * slots)
    peak = torch.cuda.max_memory_allocated() - before
    with capsys.disabled():
        print(
            f"\npeak GPU memory {peak / 2**30:.2f} GiB: weights {weights / 2**30:.2f}, "
            f"slot cache {cache / 2**30:.2f}, {slots} prompts of {answers[0].prompt_tokens} "
            "tokens"
        )
    assert answers[0].prompt_tokens > 900 and len(answers) == slots
    assert peak <= weights + cache + 2 * 2**30


def test_dtype_auto_picks_what_the_gpu_computes_natively():
    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    expected = torch.bfloat16 if native_bf16 else torch.float16
    assert pick_dtype("auto", torch.device("cuda")) == expected
