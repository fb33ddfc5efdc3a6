"""Weight-only 4-bit matmuls for decode, built from a GGUF file's own quantised blocks.

A decode step at small batch streams every weight matrix from memory for a few rows of
activations, so its time is the weights' bytes.  The packaged generator's linear layers are
GGUF Q4_1 already (groups of 32: w = d x q + m, q in 0..15), which torch's CPU int4 kernel
computes directly as w = (q - 8) x scale + zero with scale = d and zero = m + 8d.  The tied
embedding / LM head is Q8_0 (w = d x q, q in -127..127): q = 16 x hi + lo splits it into two
4-bit matrices whose products add up to the same result.  Nothing is rounded beyond what the
GGUF holds, except the scales, which torch's kernel takes in the activations' dtype.

Where the CPU has AVX512-BF16 and the engine's kernels are built, a bf16 layer multiplies
with the engine's own kernel instead (int4_matmul.cpp, its codes packed by `pair_codes`):
it unpacks a group once for up to 8 rows where torch's unpacks it for each row, so 4 bits
pay at more rows.

Each replaced layer keeps its dense weight (packed for oneDNN where it is bf16) for many
rows (prefill, large batches), where a dense bf16 matmul is faster than unpacking 4-bit
groups.  Both kernels are vectorised for bf16 activations only: in float32 or float16
torch's is far slower than the dense matmul, so a model in those dtypes keeps its dense
layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, get_tensor_name_map
from safetensors import safe_open
from safetensors.numpy import save_file
from torch.utils.flop_counter import register_flop_formula
from transformers import PreTrainedModel
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from rag.service.engine import kernels
from rag.service.engine.packed import dense_product

GROUP = 32
FIELDS = ("codes", "scales", "zeros")  # of Blocks, in order
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
INT4_ACTIVATIONS = torch.bfloat16  # the one dtype INT4_MM computes at speed


@register_flop_formula(INT4_MM)
def _int4_mm_flops(a_shape, b_shape, group_size, scales_shape, *args, **kwargs) -> int:
    """The same count as the dense matmul it replaces: 2 x rows x in x out."""
    rows, inner = a_shape
    return 2 * rows * inner * scales_shape[1]


@dataclass(frozen=True)
class Blocks:
    """One weight matrix's 4-bit codes ([out, in], 0..15) with per-group scale and zero
    ([out, in / 32]): w = (q - 8) x scale + zero."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    def dequantize(self) -> torch.Tensor:
        expand = lambda a: np.repeat(a, GROUP, axis=1)  # noqa: E731
        w = (self.codes.astype(np.float32) - 8) * expand(self.scales) + expand(self.zeros)
        return torch.from_numpy(w)


def _q4_1(raw: np.ndarray) -> list[Blocks]:
    """Q4_1: 20 bytes per 32 weights: d and m as float16, then 16 bytes of nibbles (low
    nibbles are weights 0-15, high nibbles 16-31)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, -1)
    return [Blocks(codes, d, m + 8 * d)]


def _q8_0(raw: np.ndarray) -> list[Blocks]:
    """Q8_0: 34 bytes per 32 weights: d as float16, then 32 int8 q; w = d x (16 hi + lo)
    with lo = q mod 16 and hi = q // 16 in -8..7, so w = d x (lo - 8) + 8d plus
    16d x ((hi + 8) - 8)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.int16).reshape(rows, -1)
    low, high = (q & 0x0F).astype(np.uint8), ((q >> 4) + 8).astype(np.uint8)
    return [Blocks(low, d, 8 * d), Blocks(high, 16 * d, np.zeros_like(d))]


READERS = {GGMLQuantizationType.Q4_1: _q4_1, GGMLQuantizationType.Q8_0: _q8_0}

PAIRED_BLOCK = 16  # output rows per block of `pair_codes`' layout
TORCH_BLOCK = 64  # torch's CPU packing interleaves output rows in blocks of up to 64


def pair_codes(codes: np.ndarray) -> np.ndarray:
    """Codes [out, in] (0..15) in the engine's kernel's layout (int4_matmul.cpp), [out, in /
    2] bytes: per block of 16 outputs, for each 4 inputs 4i + 2h + e, byte 2j + e holds
    output j's code for h = 0 in its low nibble and for h = 1 in its high one."""
    out, inner = codes.shape
    split = codes.reshape(out // PAIRED_BLOCK, PAIRED_BLOCK, inner // 4, 2, 2)  # block j i h e
    nibbles = split[:, :, :, 0, :] | (split[:, :, :, 1, :] << 4)  # block j i e
    return np.ascontiguousarray(nibbles.transpose(0, 2, 1, 3)).reshape(out, inner // 2)


def _torch_int4_mm(flat: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor):
    return INT4_MM(flat, packed, GROUP, scales)


def _scale_pairs(first: np.ndarray, second: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Per-group [out, in / 32] pairs as the kernels take them: [in / 32, out, 2]."""
    return torch.from_numpy(np.stack([first.T, second.T], axis=-1)).to(dtype).contiguous()


def _paired_parts(parts: list[Blocks]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The engine's kernel's codes, and (scale, minimum) in float16 as GGUF stores them."""
    packed = [torch.from_numpy(pair_codes(p.codes)) for p in parts]
    scales = [_scale_pairs(p.scales, p.zeros - 8 * p.scales, torch.float16) for p in parts]
    return packed, scales


def _torch_parts(
    parts: list[Blocks], dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """torch's packed codes, and (scale, zero) in the activations' dtype, as its kernel
    takes them."""
    packed = [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(p.codes.astype(np.int32)), 2
        )
        for p in parts
    ]
    return packed, [_scale_pairs(p.scales, p.zeros, dtype) for p in parts]


class Int4Linear(torch.nn.Module):
    """A linear layer that multiplies up to `max_rows` rows with 4-bit weights (summing
    the parts, one or two: codes `packed[i]` with `scales[i]`, [in / 32, out, 2]: each
    group's scale and zero for torch's kernel, scale and minimum for the engine's, whose
    layout they are in where `paired`) and more rows with the dense weight it replaces."""

    def __init__(
        self,
        dense: torch.nn.Linear,
        packed: list[torch.Tensor],
        scales: list[torch.Tensor],
        max_rows: int,
        paired: bool,
    ) -> None:
        super().__init__()
        self.dense = dense
        self.max_rows = max_rows
        self.in_features = dense.in_features
        self.out_features = dense.out_features
        self.packed = packed
        self.scales = scales
        self.paired = paired
        self._product = kernels.int4_linear if paired else _torch_int4_mm

    @property
    def row_block(self) -> int:
        """Output rows per block of the codes' layout (matrices concatenate in whole ones)."""
        return PAIRED_BLOCK if self.paired else TORCH_BLOCK

    @classmethod
    def from_blocks(cls, dense: torch.nn.Linear, parts: list[Blocks], max_rows: int) -> Int4Linear:
        """The engine's kernel for a bf16 layer where it runs (`kernels.INT4_LINEAR`) and
        the outputs come in whole blocks; torch's otherwise."""
        dtype = dense.weight.dtype
        paired = (
            kernels.INT4_LINEAR
            and dtype == torch.bfloat16
            and dense.out_features % PAIRED_BLOCK == 0
        )
        packed, scales = _paired_parts(parts) if paired else _torch_parts(parts, dtype)
        return cls(dense, packed, scales, max_rows, paired)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return self.multiply(flat).reshape(*x.shape[:-1], self.out_features)

    def multiply(self, flat: torch.Tensor) -> torch.Tensor:
        """The output for contiguous rows [rows, in] (`forward` without nn.Module's call
        and reshapes, which cost a few microseconds a call)."""
        if flat.shape[0] > self.max_rows:
            return self.dense_product(flat)
        return self.four_bit_product(flat)

    def dense_product(self, flat: torch.Tensor) -> torch.Tensor:
        return dense_product(self.dense, flat)

    def four_bit_product(self, flat: torch.Tensor) -> torch.Tensor:
        out = self._product(flat, self.packed[0], self.scales[0])
        for packed, scales in zip(self.packed[1:], self.scales[1:], strict=True):
            out = out + self._product(flat, packed, scales)
        if self.dense.bias is not None:
            out = out + self.dense.bias
        return out


def read_blocks(gguf_path: Path, model: PreTrainedModel) -> Iterator[tuple[str, list[Blocks]]]:
    """The 4-bit parts of each Q4_1 or Q8_0 weight in the file, one at a time (so only one
    matrix's codes are in memory), by the model's parameter name, with the row permutation
    transformers' GGUF loader applies (llama's q and k)."""
    config = model.config
    names = gguf_names(model)
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(
        config={
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
        }
    )
    for tensor in GGUFReader(gguf_path).tensors:
        reader = READERS.get(tensor.tensor_type)
        if reader is None or tensor.name not in names:
            continue
        parts = []
        for part in reader(np.asarray(tensor.data)):
            codes, scales, zeros = (
                processor.process(weights=a, name=tensor.name).weights
                for a in (part.codes, part.scales, part.zeros)
            )
            parts.append(Blocks(codes, scales, zeros))
        yield names[tensor.name], parts


def gguf_names(model: PreTrainedModel) -> dict[str, str]:
    """Each GGUF tensor name -> the model's parameter name, from gguf's name table for the
    architecture.  transformers' `get_gguf_hf_weights_map` gives the same map for the
    families the engine drives, but builds the table again for every submodule."""
    arches = [k for k, v in MODEL_ARCH_NAMES.items() if v == model.config.model_type]
    if not arches:
        raise NotImplementedError(f"gguf knows no architecture {model.config.model_type!r}")
    table = get_tensor_name_map(arches[0], model.config.num_hidden_layers)
    names = {}
    for name in model.state_dict():
        stem, _, suffix = name.rpartition(".")
        if (gguf_stem := table.get_name(stem)) is not None:
            names[f"{gguf_stem}.{suffix}"] = name
    return names


def _reproduces(parts: list[Blocks], weight: torch.Tensor, chunk: int = 1024) -> bool:
    """Whether the blocks equal the loaded weight up to its rounding (bf16: 2^-9 of the
    value), compared a chunk of rows at a time to keep the float32 copies small."""
    for row in range(0, weight.shape[0], chunk):
        rows = slice(row, row + chunk)
        rebuilt = sum(
            Blocks(p.codes[rows], p.scales[rows], p.zeros[rows]).dequantize() for p in parts
        )
        if not torch.allclose(rebuilt, weight[rows].float(), rtol=2**-8, atol=1e-8):
            return False
    return True


def linear_layers(model: PreTrainedModel) -> dict[str, list[str]]:
    """Each parameter name -> the linear layers whose weight it is (the tied LM head's
    weight is also the embedding's, so both names lead to `lm_head`)."""
    users: dict[int, list[str]] = {}  # a weight tensor's id -> the linear layers using it
    named = dict(model.named_parameters(remove_duplicate=False))
    for name, weight in named.items():
        module_name = name.removesuffix(".weight")
        if name.endswith(".weight") and isinstance(
            model.get_submodule(module_name), torch.nn.Linear
        ):
            users.setdefault(id(weight), []).append(module_name)
    return {name: users[id(weight)] for name, weight in named.items() if id(weight) in users}


def save_blocks(model: PreTrainedModel, gguf_path: Path, path: Path) -> int:
    """Write the 4-bit parts of every linear layer's weight that the GGUF holds in blocks
    to `path` (safetensors); returns how many weights.  Done once, when the model cache is
    built: reading the GGUF's blocks and mapping its names takes longer than loading the
    model, and a replica's start is what the autoscaler waits for.

    Each weight's parts are checked against the weight transformers dequantised from the
    same file, so a name or layout mismatch fails the build, loudly, and never changes an
    answer.
    """
    weights = dict(model.named_parameters(remove_duplicate=False))
    layers = linear_layers(model)
    blocks: dict[str, list[Blocks]] = {}
    for source, parts in read_blocks(gguf_path, model):
        if source not in layers:
            continue
        if not _reproduces(parts, weights[source].detach()):
            raise ValueError(f"GGUF blocks of {source} do not reproduce the loaded weight")
        blocks[source] = parts
    write_blocks(path, blocks)
    return len(blocks)


def write_blocks(path: Path, blocks: dict[str, list[Blocks]]) -> None:
    """Each weight's parts as `<weight>/<part>/<field>` in one safetensors file."""
    dtypes = {"codes": np.uint8, "scales": np.float32, "zeros": np.float32}
    save_file(
        {
            f"{source}/{n}/{field}": np.ascontiguousarray(getattr(part, field), dtypes[field])
            for source, parts in blocks.items()
            for n, part in enumerate(parts)
            for field in FIELDS
        },
        path,
    )


def load_blocks(path: Path) -> Iterator[tuple[str, list[Blocks]]]:
    """What `save_blocks` wrote, one weight at a time (only one matrix's codes in memory)."""
    with safe_open(path, framework="np") as blocks:
        parts_of: dict[str, int] = {}
        for key in blocks.keys():  # noqa: SIM118 (safe_open is not iterable)
            source, n, _ = key.split("/")
            parts_of[source] = max(parts_of.get(source, 0), int(n) + 1)
        for source, count in parts_of.items():
            yield (
                source,
                [
                    Blocks(*(blocks.get_tensor(f"{source}/{n}/{field}") for field in FIELDS))
                    for n in range(count)
                ],
            )


def int4_pays(model: PreTrainedModel) -> bool:
    """Whether 4-bit decode is faster than the model's dense weights: on the CPU, with
    activations in `INT4_ACTIVATIONS`."""
    return model.device.type == "cpu" and model.dtype == INT4_ACTIVATIONS


def use_int4_for_decode(model: PreTrainedModel, blocks_path: Path, max_rows: int) -> int:
    """Replace every linear layer whose weight `blocks_path` (written by `save_blocks`)
    holds with an Int4Linear; returns how many."""
    layers = linear_layers(model)
    weights = dict(model.named_parameters(remove_duplicate=False))
    replaced = 0
    for source, parts in load_blocks(blocks_path):
        if source not in layers or parts[0].codes.shape != tuple(weights[source].shape):
            raise ValueError(f"4-bit blocks of {source} do not fit the model's weights")
        for module_name in layers[source]:
            parent, attribute = _parent(model, module_name)
            layer = Int4Linear.from_blocks(getattr(parent, attribute), parts, max_rows)
            setattr(parent, attribute, layer)
            replaced += 1
    return replaced


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attribute = name.rpartition(".")
    return model.get_submodule(path), attribute
