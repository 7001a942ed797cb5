"""The memory-bandwidth ceiling of batch-1 decode, measured in the same run as the figures.

Batch-1 decode is memory-bound: each new token reads every weight matrix once (and the KV
cache), so no engine can decode faster than bandwidth ÷ bytes read per token. bench.py
measures the bandwidth (`read_bandwidth_gbs`: in ordinary and in huge pages, the faster),
computes each decode row's bytes per token (`decode_bytes`) and reports the share of the
ceiling reached:

    share = decode tok/s × bytes per token ÷ bandwidth

Bytes per token (an estimate from the shapes, not a hardware counter):
- weights: every linear matrix (fused qkv, out_proj, c_fc, c_proj) and the tied lm_head
  (the embedding matrix, read in full for the logits) at the row's bytes per weight:
  4 float32, 2 bfloat16/float16, 1 for int8 plus a 4-byte scale per output row; biases
  and LayerNorms in the model dtype; one row of each embedding;
- KV cache: keys and values (2 × hidden per position and layer, in the model dtype) of the
  positions each layer attends to (global layers: the whole context; local layers: at most
  `window_size`), averaged over the decode (context = prompt + 1 ... prompt + new tokens).
Activations are ignored (a few KiB per token at batch 1).
"""

from __future__ import annotations

import time
from typing import Any

WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def read_bandwidth_gbs(device: str = "cpu", gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the best of `repeats` sums of a `gib` GiB float32
    tensor (a streamed read), with torch's current thread count. On CPU the tensor is read
    twice, in ordinary 4 KiB pages and in 2 MiB pages where the kernel grants them (our
    panels can be held in those: gptneo_cli.native.huge_region), and the faster counts: the
    ceiling is the best read the machine does, whoever's pages."""
    best = _read_once(device, gib, repeats, huge=False)
    if device == "cpu":
        best = max(best, _read_once(device, gib, repeats, huge=True))
    return best


def _read_once(device: str, gib: float, repeats: int, huge: bool) -> float:
    import torch

    numel = int(gib * 2**30) // 4
    if huge:
        from gptneo_cli import native

        data = native.huge_region(numel * 4).view(torch.float32).fill_(1)
    else:
        data = torch.ones(numel, dtype=torch.float32, device=device)  # touched: pages are real
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass is a warm-up
        _sync(device)
        start = time.perf_counter()
        total = data.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    assert float(total) == numel  # the read really happened
    del data
    return numel * 4 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def decode_bytes(
    config: dict[str, Any], dtype: str, quantize: str | None, prompt: int, new_tokens: int
) -> dict[str, float]:
    """Bytes one decode step reads (module docstring), averaged over `new_tokens` steps
    after a `prompt`-token prompt: {"weights", "kv", "total"}."""
    h, layers, vocab = config["hidden_size"], config["num_layers"], config["vocab_size"]
    inner = config.get("intermediate_size") or 4 * h
    model_bytes = WEIGHT_BYTES[dtype]
    matrices = [(3 * h, h), (h, h), (inner, h), (h, inner)] * layers + [(vocab, h)]
    if quantize:
        matrix_bytes = sum(rows * cols + 4 * rows for rows, cols in matrices)
    else:
        matrix_bytes = sum(rows * cols for rows, cols in matrices) * model_bytes
    small = layers * (h + inner + h + 4 * h) + 2 * h + 2 * h  # biases, LNs, ln_f, 2 rows
    weights = matrix_bytes + small * model_bytes
    kinds = config.get("attention_layers") or ["global"] * layers
    window = config.get("window_size", 256)
    steps = range(prompt + 1, prompt + max(new_tokens, 1) + 1)
    positions = sum(min(ctx, window) if kind == "local" else ctx for kind in kinds for ctx in steps)
    kv = 2 * h * model_bytes * positions / len(steps)
    return {"weights": float(weights), "kv": kv, "total": weights + kv}


def annotate(
    rows: list[dict[str, Any]],
    bandwidth_gbs: float,
    config_of: Any,
    prompt: int,
    new_tokens: int,
) -> None:
    """Add bytes per token, the ceiling and the share reached to every row with a decode
    rate. `config_of(shape)` gives the row's config.json dict."""
    for row in rows:
        rate = row.get("decode_tok_s")
        if not rate or row.get("dtype") not in WEIGHT_BYTES:
            continue
        quantize = row.get("quantize") or ("int8" if "int8" in str(row.get("engine")) else None)
        step = decode_bytes(config_of(row["shape"]), row["dtype"], quantize, prompt, new_tokens)
        row["decode_weight_bytes"] = step["weights"]
        row["decode_kv_bytes"] = step["kv"]
        row["decode_bytes_per_token"] = step["total"]
        row["ceiling_tok_s"] = bandwidth_gbs * 1e9 / step["total"]
        row["ceiling_share"] = rate * step["total"] / (bandwidth_gbs * 1e9)
        near = row.get("read_bandwidth_near_gbs")
        if near:  # the median of the bandwidths measured right before the row's repeats
            row["ceiling_share_near"] = rate * step["total"] / (near * 1e9)


def _near(row: dict[str, Any]) -> str:
    near = row.get("read_bandwidth_near_gbs")
    if not near or row.get("ceiling_share_near") is None:
        return "– | – |"
    return f"{near:.1f} | {100 * row['ceiling_share_near']:.0f} % |"


def markdown_lines(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The ceiling table for bench.py's markdown output."""
    bandwidth = meta.get("read_bandwidth_gbs")
    if not bandwidth:
        return []
    samples = meta.get("read_bandwidth_samples") or [bandwidth]
    spread = ", ".join(f"{b:.1f}" for b in samples)
    lines = [
        "",
        f"Memory read bandwidth, measured in this run: {bandwidth:.1f} GB/s, the highest of "
        f"{len(samples)} measurements before, between shapes and after ({spread}; each the "
        f"sum of a 1 GiB float32 tensor, best of 5, in 4 KiB pages and in 2 MiB pages, "
        f"the faster; {meta['args']['threads']} threads). "
        "Shares of the ceiling are against the highest; the last column is against the "
        "median bandwidth measured right before each of the row's repeats (the host's "
        "bandwidth moves between phases within minutes). Bytes per decode "
        "step: every weight matrix once in the row's dtype (int8: 1 byte + a scale per "
        "row), the tied head in full, plus the KV cache of the mean context (global layers "
        "all positions, local layers at most the window); see benchmarks/ceiling.py.",
        "",
        "| shape | dtype | engine | decode tok/s | MB read per token (weights + KV) | "
        "ceiling tok/s | share of ceiling | bandwidth next to it GB/s | share of that |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("ceiling_share") is None:
            continue
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['engine']} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_bytes_per_token'] / 1e6:.0f} ({r['decode_weight_bytes'] / 1e6:.0f} + "
            f"{r['decode_kv_bytes'] / 1e6:.1f}) | {r['ceiling_tok_s']:.1f} | "
            f"{100 * r['ceiling_share']:.0f} % | {_near(r)}"
        )
    return lines
