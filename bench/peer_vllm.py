"""The peer's side of bench_peer.py: vLLM-CPU's `LLM.generate` on prompts given as token ids,
run by the peer's own interpreter (its virtual environment, never ours), so this file
imports only vLLM, torch and the standard library.

    <peer python> bench/peer_vllm.py --model DIR --prompts FILE [--batches 1 20 40]
        [--repeats 3] [--steps] --out RESULT.json

Writes one JSON object to --out: for each batch size the seconds of each timed `LLM.generate`
(after a warm-up at that size), the token ids of the first, and the process's peak RSS;
with --steps, each step of one more run at each size instead (`step_profile`).

vLLM runs as its CPU backend recommends for speed here (worker in process, the threads of
OMP_NUM_THREADS), in bf16, with automatic prefix caching off: the prompts repeat across runs
(and within the 40), and a prompt met before would skip its prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import uuid

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

NEW_TOKENS = 32
KV_CACHE_BYTES = 1 << 30  # room for 40 prompts of ~1k positions; vLLM's default takes 92 % of RAM


def load(model: str, max_model_len: int):
    from vllm import LLM

    return LLM(
        model=model,
        dtype="bfloat16",
        max_model_len=max_model_len,
        seed=0,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enable_prefix_caching=False,
    )


def timed_generate(llm, prompts: list[list[int]], repeats: int) -> dict:
    """A warm-up, then `repeats` timed runs of `LLM.generate` on `prompts`."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    llm.generate(inputs, params, use_tqdm=False)
    seconds, tokens = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds.append(time.perf_counter() - started)
        tokens = tokens or [list(o.outputs[0].token_ids) for o in outputs]
    return {"seconds": seconds, "tokens": tokens}


def stepped(llm, prompts: list[list[int]]) -> list[dict]:
    """One run of `prompts` step by step through the engine: each step's scheduled tokens
    and rows, and `step_profile.profiled`'s figures."""
    from step_profile import profiled
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    schedule, scheduled = scheduler.schedule, []

    def recording(*args, **kwargs):
        out = schedule(*args, **kwargs)
        scheduled.append((out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
        return out

    scheduler.schedule = recording
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for ids in prompts:
        engine.add_request(uuid.uuid4().hex, TokensPrompt(prompt_token_ids=ids), params)
    steps = []
    while engine.has_unfinished_requests():
        before = len(scheduled)
        _, step = profiled(engine.step)
        if len(scheduled) > before:  # a step that computed something
            tokens, rows = scheduled[-1]
            steps.append({"tokens": tokens, "rows": rows, **step})
    scheduler.schedule = schedule
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder: safetensors, config, tokenizer")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 20, 40])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=1056)
    parser.add_argument("--steps", action="store_true", help="profile each step instead")
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    args = parser.parse_args()
    with open(args.prompts) as handle:
        prompts = json.load(handle)
    started = time.perf_counter()
    llm = load(args.model, args.max_model_len)
    result: dict = {"load_s": time.perf_counter() - started, "batches": {}}
    for batch in args.batches:
        if args.steps:
            timed_generate(llm, prompts[:batch], 0)  # a warm-up at this size
            result["batches"][batch] = stepped(llm, prompts[:batch])
        else:
            result["batches"][batch] = timed_generate(llm, prompts[:batch], args.repeats)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import torch
    import vllm

    result["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
    result["torch_threads"] = torch.get_num_threads()
    with open(args.out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
