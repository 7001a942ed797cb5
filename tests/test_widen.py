"""benchmarks/widen.py: the widened demo model computes the demo model's logits.

The speculative-decoding benchmark reads its acceptance off this stand-in, so it must be
the trained function and not merely a model of the right size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import widen  # noqa: E402

from gptneo_cli import load  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = widen.write_widened(
        tmp_path_factory.mktemp("wide") / "w", factor=2, layers=6, vocab=2048 + 40
    )
    small, tokenizer = load("tiny", dtype="float32", device="cpu")
    wide, wide_tokenizer = load(str(folder), dtype="float32", device="cpu")
    return small, wide, tokenizer, wide_tokenizer


def test_the_widened_model_has_the_asked_shape(pair):
    small, wide, _, _ = pair
    assert wide.config.hidden_size == 2 * small.config.hidden_size
    assert wide.config.num_heads == 2 * small.config.num_heads
    assert wide.config.num_layers == 6
    assert wide.config.vocab_size == 2048 + 40
    assert wide.config.attention_layers == ["global", "local"] * 3


def test_the_widened_model_computes_the_demo_models_logits(pair):
    small, wide, tokenizer, wide_tokenizer = pair
    text = "def read(path):\n    with open(path) as f:\n        return f.read()\n" * 3
    ids = tokenizer.encode(text)
    assert wide_tokenizer.encode(text) == ids
    x = torch.tensor([ids])
    with torch.inference_mode():
        a = small(x).logits[0]
        b = wide(x).logits[0]
    vocab = a.shape[-1]
    torch.testing.assert_close(b[:, :vocab], a, atol=2e-3, rtol=1e-3)
    # the added vocabulary rows never win: the greedy choices are the demo model's
    assert torch.equal(b.argmax(-1), a.argmax(-1))
    assert float(b[:, vocab:].abs().max()) < 0.1 * float(a.max(-1).values.min())


def test_a_layer_count_below_the_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        widen.write_widened(tmp_path / "w", factor=2, layers=2, vocab=2048)
