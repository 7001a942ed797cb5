"""Builders for the oracle: tiny random-weight GPT-Neo checkpoints written by transformers."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
#: The real GPT-2 vocabulary (never copied into the repo): ../shared/assets/gpt2-tokenizer,
#: or wherever GPTNEO_TEST_GPT2_ASSETS points. Tests that need it skip when it is absent.
GPT2_ASSETS = Path(
    os.environ.get("GPTNEO_TEST_GPT2_ASSETS")
    or REPO.parent / "shared" / "assets" / "gpt2-tokenizer"
)

#: Odd shapes on purpose: 1 layer, 3 heads, windows smaller than the sequence, local-first
#: layers, vocab sizes that are not multiples of 8, intermediate_size set.
TINY_CONFIGS = {
    "one_layer": dict(
        vocab_size=101,
        hidden_size=24,
        num_layers=1,
        num_heads=3,
        attention_types=[[["global"], 1]],
        window_size=4,
        max_position_embeddings=64,
    ),
    "local_first": dict(
        vocab_size=97,
        hidden_size=48,
        num_layers=3,
        num_heads=3,
        attention_types=[[["local", "global"], 1], [["local"], 1]],
        window_size=5,
        max_position_embeddings=64,
        intermediate_size=40,
    ),
    "alternating": dict(
        vocab_size=131,
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        attention_types=[[["global", "local"], 2]],
        window_size=7,
        max_position_embeddings=64,
        activation_function="gelu",
    ),
}

HEADS = {
    "base": "GPTNeoModel",
    "causal_lm": "GPTNeoForCausalLM",
    "sequence_classification": "GPTNeoForSequenceClassification",
    "token_classification": "GPTNeoForTokenClassification",
    "question_answering": "GPTNeoForQuestionAnswering",
}


def hf_config(**overrides):
    import transformers

    kwargs = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, num_labels=3)
    kwargs.update(overrides)
    return transformers.GPTNeoConfig(**kwargs)


def build_reference(head: str = "causal_lm", seed: int = 0, **config):
    """A random-weight transformers model of the given head (eval mode, fp32)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, HEADS[head])(hf_config(**config)).eval()
    # transformers initialises some heads (and biases) to zero; randomise every tensor so
    # that a wrong wiring cannot hide behind zeros.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" not in name:
                param.normal_(0.0, 0.05 if param.dim() > 1 else 0.02)
    return model


def save_reference(model, folder: Path, fmt: str = "safetensors") -> Path:
    """save_pretrained, or for fmt="bin" the torch.save'd state dict older transformers wrote
    (transformers 5 writes safetensors only)."""
    import torch

    model.save_pretrained(folder)
    if fmt == "bin":
        (folder / "model.safetensors").unlink()
        state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, folder / "pytorch_model.bin")
    assert (folder / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")).is_file()
    return folder


class IdTokenizer:
    """Token ids as text (" 12"): enough for the engine without a real vocabulary; id 0 is
    eos (ignored with ignore_eos)."""

    eos_id = bos_id = 0
    vocab_size = 61

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return "".join(f" {i}" for i in ids)

    def stream_decoder(self) -> SimpleNamespace:
        return SimpleNamespace(push=lambda token: f" {token}", finish=lambda: "")
