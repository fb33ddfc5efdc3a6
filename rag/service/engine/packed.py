"""Dense linear layers whose weights are packed once for oneDNN, torch's CPU matmul library.

`F.linear` hands oneDNN a bf16 weight as it is stored ([out, in], row-major), and oneDNN's
bf16 kernels first copy it into their own blocked layout (pairs of inputs interleaved for
the dot-product instructions): on every call.  At decode, where a matmul is a few rows,
that copy costs about as much as the product.  A weight packed when the engine is built
leaves each call only the product; vLLM's CPU backend prepacks its weights for oneDNN the
same way.  The kernels and their order of summation are the ones `F.linear` reaches, so
the outputs are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

PACKED_FOR_ROWS = 128  # oneDNN chooses the layout for this many rows; it serves any number


@register_flop_formula(torch.ops.mkldnn._linear_pointwise, get_raw=True)
def _packed_linear_flops(x, weight, *args, **kwargs) -> int:
    """Counted by torch's FlopCounterMode as `F.linear` is: 2 x rows x in x out (the
    packed weight keeps its [out, in] shape)."""
    return 2 * x.numel() * weight.shape[0]


def can_pack(weight: torch.Tensor) -> bool:
    """bf16 weights on a CPU whose oneDNN computes bf16 (float32 keeps `F.linear`, whose
    numbers the engine's tests compare with transformers' own bit for bit)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PackedLinear(torch.nn.Module):
    """A linear layer computing with its weight in oneDNN's layout (the dense one is not
    kept)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.nbytes = linear.weight.nbytes  # what one product reads
        self.weight = torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach(), PACKED_FOR_ROWS
        )
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multiply(x)

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """The output for rows [..., in]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class SlicedLinear(torch.nn.Module):
    """A layer fused into a packed one (q, k or v; gate or up): its rows of the fused
    output, so that the model's own layers still compute what they did, from the one
    packed copy of their weights."""

    def __init__(self, fused: PackedLinear, rows: slice) -> None:
        super().__init__()
        self.fused = fused
        self.rows = rows
        self.in_features = fused.in_features
        self.out_features = rows.stop - rows.start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multiply(x)

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.multiply(x)[..., self.rows]


def pack_linears(model: torch.nn.Module) -> int:
    """Pack, in place, every linear layer of `model` whose weight can be packed (the
    sentence encoder's: it embeds each query on the compute thread, between the engine's
    steps, where a weight copy per call is time every running request waits); how many."""
    packable = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and can_pack(child.weight)
    ]
    for parent, name, child in packable:
        setattr(parent, name, PackedLinear(child))
    return len(packable)


def dense_product(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A dense layer's output, packed or not, without nn.Module's call overhead."""
    if isinstance(layer, PackedLinear | SlicedLinear):
        return layer.multiply(x)
    return F.linear(x, layer.weight, layer.bias)
