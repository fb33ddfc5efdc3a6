"""A decode step of fixed shapes, and the CUDA graphs that replay it.

On a GPU a decode step at small batch is launch-bound: hundreds of kernels of a few
microseconds each, every one launched from Python.  A CUDA graph launches a captured
sequence of kernels at once, but only over fixed shapes and fixed memory.  This step has
both: the running rows are padded to a bucket of the batch size, each row attends over a
fixed span of its slot (a bucket of the longest position) under a mask, and the inputs
(tokens, positions) are copied into preallocated buffers.  A padded row decodes token 0 at
position 0 of a free slot: the active sequences occupy slots 0..rows-1, so slots
rows..bucket-1 hold nothing that anyone reads, and a slot is rewritten from position 0
when a sequence enters it.

The same step runs eagerly on any device (`graphs=False`): on the CPU it is checked to
give the dynamic step's tokens.  With graphs (CUDA only), every (rows bucket, span bucket)
is captured when the step is built, while no slot holds a sequence (a capture runs the
step once, writing keys into the slots), largest first so that the others fit in the
memory pool they all share; a replay's logits are read before the next replay overwrites
them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rag.service.engine.forward import Forward
from rag.service.engine.slots import SlotCache, StepPlan

SPAN_STEP = 256  # positions; a span bucket is a multiple of it (or the whole slot)


def row_buckets(slots: int) -> list[int]:
    """Batch sizes a step is padded to: 1, 2, 4, 8, then multiples of 8, then `slots`."""
    small = [b for b in (1, 2, 4) if b < slots]
    return [*small, *range(8, slots, 8), slots]


def span_buckets(positions: int, step: int = SPAN_STEP) -> list[int]:
    """Spans a step attends over: multiples of `step`, then the whole slot."""
    return [*range(step, positions, step), positions]


class StaticDecode:
    """Decode one token for each of slots 0..rows-1 with fixed shapes (see the module)."""

    def __init__(self, forward: Forward, cache: SlotCache, graphs: bool) -> None:
        device = cache.keys.device
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.forward = forward
        self.cache = cache
        self.graphs = graphs
        self.device = device
        self.row_buckets = row_buckets(cache.slots)
        self.span_buckets = span_buckets(cache.positions)
        self.inputs = torch.zeros(2, cache.slots, dtype=torch.long, device=device)
        self.slot_index = torch.arange(cache.slots, device=device)
        self.span_index = torch.arange(cache.positions, device=device)
        self.captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: tuple[int, int] | None = None
        if graphs:
            with torch.inference_mode():
                for span in reversed(self.span_buckets):
                    for bucket in reversed(self.row_buckets):
                        self.inputs[1, :bucket] = span - 1
                        self._capture(bucket, span)

    def __call__(self, last_tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """The logits [rows, vocab] of one new token for each of slots 0..rows-1."""
        rows = len(last_tokens)
        bucket = next(b for b in self.row_buckets if b >= rows)
        span = next(s for s in self.span_buckets if s > max(positions))
        padding = [0] * (bucket - rows)
        host = torch.tensor([[*last_tokens, *padding], [*positions, *padding]], dtype=torch.long)
        if self.device.type == "cuda":
            # From pinned memory the copy is queued, not waited for; the caching host
            # allocator keeps the block until the copy has run.
            host = host.pin_memory()
        self.inputs[:, :bucket].copy_(host, non_blocking=True)
        if not self.graphs:
            return self._run(bucket, span)[:rows]
        graph, logits = self.captured[(bucket, span)]
        graph.replay()
        return logits[:rows]

    def _run(self, bucket: int, span: int) -> torch.Tensor:
        """The step over the inputs in place, eagerly: what a graph captures."""
        tokens, positions = self.inputs[0, :bucket], self.inputs[1, :bucket]
        visible = self.span_index[:span] <= positions[:, None]
        dtype = self.cache.keys.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device)
        mask = mask.masked_fill(~visible, float("-inf"))[:, None, None, :]
        keys, values = (
            c[:, :bucket, :span].transpose(2, 3) for c in (self.cache.keys, self.cache.values)
        )
        rows = self.slot_index[:bucket]
        plan = StepPlan(rows, positions, (), (), bucket, span, mask, keys, values)
        return self.forward(tokens, plan, rows)

    def _capture(self, bucket: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Run the step once on a side stream (cuBLAS and the allocator settle), then
        capture it into a graph sharing the others' memory pool."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(bucket, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._run(bucket, span)
        self.pool = graph.pool()
        self.captured[(bucket, span)] = graph, logits
        return graph, logits
