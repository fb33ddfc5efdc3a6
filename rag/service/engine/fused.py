"""Linear layers that read the same input (q, k and v; gate and up) as one matmul.

At decode, a matmul of a few rows costs a fixed overhead per call plus its weights'
bytes; one call over the concatenated weights reads the input once and pays the overhead
once (vLLM's QKVParallelLinear and MergedColumnParallelLinear do the same).  The layers
keep working on their own (the model's own forward still runs): their weights become
views into the concatenation, so nothing is stored twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rag.service.engine.int4 import Int4Linear


@torch.no_grad()
def fuse(layers: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """One layer computing what `layers` compute, their outputs side by side: 4-bit where
    every layer is (with the same number of parts), dense otherwise."""
    dense = _concatenated_linear([_dense_of(layer) for layer in layers])
    if not all(isinstance(layer, Int4Linear) for layer in layers):
        return dense
    # Packed matrices concatenate along output rows only in whole blocks of one layout.
    parts = {(len(layer.packed), layer.paired) for layer in layers}
    if len(parts) != 1 or any(layer.out_features % layer.row_block for layer in layers):
        return dense
    count, paired = parts.pop()
    packed, scales = [], []
    for part in range(count):
        packed.append(torch.cat([layer.packed[part] for layer in layers]))
        scales.append(torch.cat([layer.scales[part] for layer in layers], dim=1))
        for layer, rows in zip(layers, _row_ranges(layers), strict=True):
            layer.packed[part] = packed[-1][rows]
    scales = [s.contiguous() for s in scales]
    return Int4Linear(dense, packed, scales, layers[0].max_rows, paired)


def _dense_of(layer: torch.nn.Module) -> torch.nn.Linear:
    return layer.dense if isinstance(layer, Int4Linear) else layer


def _row_ranges(layers: Sequence[torch.nn.Module]) -> list[slice]:
    ranges, start = [], 0
    for layer in layers:
        ranges.append(slice(start, start + layer.out_features))
        start += layer.out_features
    return ranges


def _concatenated_linear(layers: Sequence[torch.nn.Linear]) -> torch.nn.Linear:
    first = layers[0].weight
    weight = torch.cat([layer.weight for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat(
            [
                layer.bias if layer.bias is not None else first.new_zeros(layer.out_features)
                for layer in layers
            ]
        )
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = torch.nn.Parameter(bias, requires_grad=False)
    for layer, rows in zip(layers, _row_ranges(layers), strict=True):
        layer.weight.data = weight[rows]
        if layer.bias is not None:
            assert bias is not None
            layer.bias.data = bias[rows]
    return fused
