"""benchmarks/ceiling.py: the bytes a decode step reads and the share of the bandwidth
ceiling bench.py reports (arithmetic only; no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ceiling  # noqa: E402

CONFIG_125M = {
    "hidden_size": 768,
    "num_layers": 12,
    "vocab_size": 50257,
    "intermediate_size": None,
    "window_size": 256,
    "attention_layers": ["global", "local"] * 6,
}


def test_weights_read_per_token_by_dtype():
    h, v = 768, 50257
    matrices = 12 * 12 * h * h + v * h  # qkv 3h², out h², fc 4h², proj 4h² per layer; head
    fp32 = ceiling.decode_bytes(CONFIG_125M, "float32", None, prompt=32, new_tokens=1)
    bf16 = ceiling.decode_bytes(CONFIG_125M, "bfloat16", None, prompt=32, new_tokens=1)
    int8 = ceiling.decode_bytes(CONFIG_125M, "float32", "int8", prompt=32, new_tokens=1)
    small = 12 * (h + 4 * h + h + 4 * h) + 4 * h  # biases, LayerNorms, ln_f, embedding rows
    assert fp32["weights"] == 4 * (matrices + small)
    assert bf16["weights"] == 2 * (matrices + small)
    rows = 12 * (3 * h + h + 4 * h + h) + v  # one 4-byte scale per output row
    assert int8["weights"] == matrices + 4 * rows + 4 * small
    assert 490e6 < fp32["weights"] < 500e6  # the "0.5 GB a token" of issue 14


def test_kv_bytes_follow_the_context_and_the_local_window():
    one = ceiling.decode_bytes(CONFIG_125M, "float32", None, prompt=32, new_tokens=1)
    # the first new token sees 33 positions in all 12 layers: K and V, 768 floats each
    assert one["kv"] == 12 * 33 * 2 * 768 * 4
    long = ceiling.decode_bytes(CONFIG_125M, "float32", None, prompt=999, new_tokens=1)
    # at 1000 positions, local layers read only their 256-token window
    assert long["kv"] == (6 * 1000 + 6 * 256) * 2 * 768 * 4
    assert long["total"] == long["weights"] + long["kv"]


def test_annotate_gives_the_ceiling_and_the_share():
    rows = [
        {"shape": "125m", "dtype": "float32", "engine": "gptneo", "decode_tok_s": 20.0,
         "read_bandwidth_near_gbs": 8.0},
        {"shape": "125m", "dtype": "float32", "engine": "gptneo-int8", "quantize": "int8",
         "decode_tok_s": 50.0},
        {"shape": "125m", "dtype": "float32", "engine": "x", "decode_tok_s": None},
    ]  # fmt: skip
    ceiling.annotate(rows, 10.0, lambda shape: CONFIG_125M, prompt=32, new_tokens=16)
    fp32, int8, empty = rows
    assert fp32["ceiling_tok_s"] == pytest.approx(10e9 / fp32["decode_bytes_per_token"])
    assert fp32["ceiling_share"] == pytest.approx(20.0 / fp32["ceiling_tok_s"])
    assert int8["decode_bytes_per_token"] < fp32["decode_bytes_per_token"] / 3
    assert "ceiling_share" not in empty
    meta = {"read_bandwidth_gbs": 10.0, "args": {"threads": 2}}
    table = "\n".join(ceiling.markdown_lines(rows, meta))
    assert "10.0 GB/s" in table
    meta["read_bandwidth_samples"] = [7.5, 10.0, 9.25]  # the spread is shown, the max used
    table = "\n".join(ceiling.markdown_lines(rows, meta))
    assert "10.0 GB/s, the highest of 3 measurements" in table and "(7.5, 10.0, 9.2" in table
    assert f"| {100 * fp32['ceiling_share']:.0f} % |" in table
    # the share of the bandwidth measured next to the row, where it was
    assert fp32["ceiling_share_near"] == pytest.approx(fp32["ceiling_share"] * 10.0 / 8.0)
    assert f"| 8.0 | {100 * fp32['ceiling_share_near']:.0f} % |" in table
    assert "ceiling_share_near" not in int8 and "| – | – |" in table


def test_read_bandwidth_is_a_positive_rate():
    assert ceiling.read_bandwidth_gbs(gib=1 / 64, repeats=1) > 0
