"""Small random decoders of every family the engine drives, the way a server drives an
engine (prompts of different lengths, fewer slots than prompts, newcomers prefilled in the
running batch's pass, a cancellation), and transformers' `generate` as the reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from rag.service.engine.engine import Engine, Sequence

FAMILIES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,  # biased q, k and v
    "qwen3": Qwen3Config,  # normalised query and key heads
}
EOS = 2
VOCAB = 300


def tiny_model(
    family: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    config = FAMILIES[family](
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        eos_token_id=EOS,
        initializer_range=0.3,  # attention far from uniform, so positions matter
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():  # random biases and norms, so that they matter
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=dtype)


def random_prompts(lengths: list[int], vocab: int = VOCAB, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@dataclass
class Reference:
    """A prompt's greedy answer by `generate`, with the logits each token was chosen from."""

    tokens: list[int]
    logits: list[torch.Tensor]


def generate_reference(model: PreTrainedModel, prompt: list[int], new_tokens: int) -> Reference:
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=EOS, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, len(prompt) :].tolist()
    return Reference(tokens, [step[0].float().cpu() for step in out.logits[: len(tokens)]])


def serve_like(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[Sequence]:
    """Run the prompts as a server would: the first two start together; two steps later
    the rest arrive, and as many as there are free slots are prefilled in the running
    batch's pass (the others wait for a slot); then the second is cancelled; the others
    run to their end."""
    sequences = [Sequence(prompt, new_tokens) for prompt in prompts]
    for sequence in sequences[:2]:
        engine.submit(sequence)
    engine.step()
    engine.step()
    for sequence in sequences[2:]:
        engine.submit(sequence)
    mixed = engine.step()
    assert mixed.prefilled and mixed.decoded  # newcomers and running rows in one pass
    engine.cancel(sequences[1])
    while engine.busy:
        engine.step()
    return sequences


def assert_greedy_matches(
    sequences: list[Sequence], references: list[Reference], tie: float = 0.0
) -> None:
    """Each answer is its reference's (a cancelled one: the reference's beginning).  With
    `tie` > 0 (half precision, where two kernels round differently), an answer may leave
    its reference only where the reference's two candidates were within `tie` standard
    deviations of that step's logits, a near tie; what follows is another answer, so the
    comparison of that one ends there."""
    for sequence, reference in zip(sequences, references, strict=True):
        got, expected = sequence.tokens, reference.tokens
        if sequence.finish == "cancelled":
            expected = expected[: len(got)]
        for position, (mine, theirs) in enumerate(zip(got, expected, strict=False)):
            if mine == theirs:
                continue
            logits = reference.logits[position]
            gap = float(logits[theirs] - logits[mine]) / float(logits.std())
            assert gap <= tie, (
                f"token {position} is {mine}, generate's is {theirs}, "
                f"{gap:.3f} standard deviations apart (a near tie is <= {tie})"
            )
            break
        else:
            assert len(got) == len(expected), f"{len(got)} tokens, generate gave {len(expected)}"
