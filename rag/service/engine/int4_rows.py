"""Up to how many rows 4-bit decode pays on this machine, timed when the engine is built.

A 4-bit matmul's time grows with the rows (torch's CPU kernel unpacks every weight group
for each row it multiplies; the engine's unpacks a group once for up to 8 rows, but its dot
products then fill the processor's bf16 units), while a dense bf16 matmul of a few rows
costs its weights' bytes whatever the rows.  Where the two cross depends on the processor
(its bf16 matrix units, its memory bandwidth), and these machines change from day to day:
so the crossover is measured, on the model's own layers, with the threads the engine
computes with, rather than set once.

A probe is one decode step's matmuls at a given number of rows (every 4-bit layer the
forward pass multiplies with, in order, so the weights stream from memory as in a real
step), 4-bit against dense, alternating, median of a few; rows are probed from one
upwards until 4-bit stops being clearly faster (PAYS_AT_MOST).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from rag.service.engine.int4 import INT4_ACTIVATIONS, Int4Linear

log = logging.getLogger(__name__)

AUTO = "auto"  # `model.int4_max_rows`: time the crossover when the engine is built
MOST_ROWS = 16  # the largest row count probed (and the most auto keeps 4-bit for)
REPEATS = 3  # timed passes per kind and row count
# 4 bits is kept at a row count only where its matmuls take at most this share of the
# dense ones' time.  Near the crossover the two are within the probe's noise, which decided
# such near-ties either way from one start to the next, and there a served decode step
# loses: 4 bits' unpacking takes processor time that the step's other work needs.
PAYS_AT_MOST = 0.85


def decode_layers(model: PreTrainedModel) -> list[Int4Linear]:
    """The 4-bit layers one decode step multiplies with, in the forward pass's order (its
    fused q/k/v and gate/up, o and down in each layer, then the LM head)."""
    layers = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for name, parent in (
            ("qkv_proj", attention),
            ("o_proj", attention),
            ("gate_up_proj", mlp),
            ("down_proj", mlp),
        ):
            layers.append(getattr(parent, name, None))
    layers.append(model.lm_head)
    return [layer for layer in layers if isinstance(layer, Int4Linear)]


def int4_rows(model: PreTrainedModel) -> int:
    """Up to how many rows the model's linear layers multiply in 4 bits (0: none are 4-bit)."""
    return max((m.max_rows for m in model.modules() if isinstance(m, Int4Linear)), default=0)


def set_int4_rows(model: PreTrainedModel, rows: int) -> None:
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.max_rows = rows


def parse_int4_rows(setting: int | str) -> int | None:
    """`model.int4_max_rows` as a row count, or None for auto."""
    if setting == AUTO:
        return None
    if isinstance(setting, int) and setting >= 0:
        return setting
    raise ValueError(f"model.int4_max_rows must be {AUTO!r} or a row count >= 0, not {setting!r}")


def choose_int4_rows(model: PreTrainedModel) -> int:
    """The most rows (0..MOST_ROWS) up to which every probed row count decodes clearly
    faster in 4 bits than with the dense weights (`rows_that_pay`), timed on the model as
    the engine will run it; the model's 4-bit layers are left multiplying up to that many
    rows."""
    layers = decode_layers(model)
    if not layers:
        return 0
    started = time.perf_counter()
    chosen = rows_that_pay(lambda rows: _probe(layers, rows))
    set_int4_rows(model, chosen)
    log.info(
        "4-bit decode up to %d rows (timed on %d layers at 1..%d rows in %.2f s, %d threads)",
        chosen,
        len(layers),
        min(chosen + 1, MOST_ROWS),
        time.perf_counter() - started,
        torch.get_num_threads(),
    )
    return chosen


def rows_that_pay(ratio: Callable[[int], float]) -> int:
    """The most rows (0..MOST_ROWS) up to which every row count's 4-bit time, as a share
    of the dense time (`ratio(rows)`, asked from one row upwards), is at most PAYS_AT_MOST."""
    chosen = 0
    for rows in range(1, MOST_ROWS + 1):
        if ratio(rows) > PAYS_AT_MOST:
            break
        chosen = rows
    return chosen


@torch.inference_mode()
def _probe(layers: Sequence[Int4Linear], rows: int) -> float:
    """One step's matmuls at `rows` rows, median seconds in 4 bits over median seconds
    dense."""
    inputs = {
        width: torch.randn(rows, width, dtype=INT4_ACTIVATIONS)
        for width in {layer.in_features for layer in layers}
    }
    kinds = (Int4Linear.four_bit_product, Int4Linear.dense_product)

    def step(product: Callable[[Int4Linear, torch.Tensor], torch.Tensor]) -> float:
        begun = time.perf_counter()
        for layer in layers:
            product(layer, inputs[layer.in_features])
        return time.perf_counter() - begun

    for product in kinds:  # each shape's first call sets up its kernel
        for layer in {(layer.in_features, layer.out_features): layer for layer in layers}.values():
            product(layer, inputs[layer.in_features])
    times: list[list[float]] = [[], []]
    for _ in range(REPEATS):
        for kind, product in enumerate(kinds):
            times[kind].append(step(product))
    return statistics.median(times[0]) / statistics.median(times[1])
