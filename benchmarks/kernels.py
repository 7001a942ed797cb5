"""The matrix products behind gptneo's CPU layout choices, timed on this machine.

fast.py picks a layout per dtype (oneDNN-packed, transposed columns, plain rows). Which one
wins depends on the CPU (MKL is fast on Intel and takes a generic path on AMD), so this script
times each candidate on the shapes of gpt-neo-125M and prints a markdown table:

- layer matrices (768 x 3072) streamed from memory: 52 different matrices per pass, about the
  bytes of the whole model, so every read comes from RAM as in decoding;
- the tied lm_head (50257 x 768), the largest single matrix;
- 1, 8 and 512 rows (decode, batch-8 decode, a prefill), and for one row the weight bytes
  read per second (a decode step's speed limit);
- our own kernels (gptneo_cli/native.py) where they are built: the row kernels (one row,
  float32 and bf16, plain rows read in place) and the panel kernels (any rows, a repacked
  copy; float32, bf16, int8); the int8 rows compare them with torch's weight-only int8
  kernel.

    python benchmarks/kernels.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench import machine

from gptneo_cli import native
from gptneo_cli.fast import Int8Linear, quantize_rows

HIDDEN, INNER, VOCAB, MATRICES = 768, 3072, 50257, 52


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """oneDNN's linear on a plain or a prepacked weight (what fast.PackedLinear calls)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run` after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def candidates(dtype: torch.dtype, weights: list[torch.Tensor]) -> dict[str, tuple]:
    """name -> (product, the weights in the layout that product reads)."""
    out: dict[str, tuple] = {
        "F.linear, rows [out, in]": (F.linear, weights),
        "oneDNN, plain rows": (onednn, weights),
        "oneDNN, prepacked": (
            onednn,
            [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights],
        ),
    }
    if dtype == torch.float32:
        out["x @ W, columns [in, out]"] = (torch.mm, [w.t().contiguous() for w in weights])
    if native.available() and dtype in native.DTYPES:
        out["row kernel (ours), plain rows"] = (_rows, weights)
        out["panel kernel (ours), panels"] = (_panels, [_packed(w) for w in weights])
    return out


def _rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """Our row kernel where it takes the shape (1 row), else None (skipped)."""
    return native.gemv(x, w, None) if x.shape[0] == 1 else None


def _packed(w: torch.Tensor, scales: torch.Tensor | None = None) -> tuple:
    """The panels fast.py holds (bf16 as pairs where the CPU has the bf16 dot product,
    int8 as quads with their column sums)."""
    colsum = native.quad_sums(w) if w.dtype == torch.int8 else None
    return native.panel_weights(w), w.shape[0], scales, colsum


def _panels(x: torch.Tensor, packed: tuple) -> torch.Tensor:
    """As fast.py runs them: int8 prompts (17+ rows) with bf16 activations."""
    panels, out_features, scales, colsum = packed
    prompt = x.shape[0] >= Int8Linear.PANEL_BF16_ROWS
    return native.panels(x, panels, out_features, scales, None, prompt, colsum)


def int8_candidates(weights: list[torch.Tensor]) -> dict[str, tuple]:
    """Weight-only int8 products: torch's kernel (bf16 activations) and ours (float32)."""
    quantized = [quantize_rows(w) for w in weights]
    stored = [(q, s.bfloat16(), s) for q, s in quantized]

    def torch_int8(x: torch.Tensor, w: tuple) -> torch.Tensor | None:
        if x.shape[0] > 64:
            return None
        return torch._weight_int8pack_mm(x.bfloat16(), w[0], w[1])

    out = {"torch._weight_int8pack_mm": (torch_int8, stored)}
    if native.available() and native.quads_supported():
        out["panel kernel (ours)"] = (_panels, [_packed(q, s) for q, _, s in stored])
    return out


def table(dtype: torch.dtype | str, repeats: int) -> list[str]:
    """Rows of the markdown table for one dtype ("int8": weight-only int8 products)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.float32 if dtype == "int8" else dtype
    layers = [torch.randn(INNER, HIDDEN, generator=gen).to(base) for _ in range(MATRICES)]
    head = [torch.randn(VOCAB, HIDDEN, generator=gen).to(base)]
    bytes_per = 1 if dtype == "int8" else torch.finfo(base).bits // 8
    lines = []
    for label, weights in (("layer matrices, streamed", layers), ("lm_head", head)):
        params = sum(w.numel() for w in weights)
        found = int8_candidates(weights) if dtype == "int8" else candidates(base, weights)
        for name, (product, stored) in found.items():
            cells = []
            for rows in (1, 8, 512):
                x = torch.randn(rows, HIDDEN, generator=gen).to(
                    torch.float32 if dtype == "int8" else base
                )
                if product(x, stored[0]) is None:
                    cells.append("-")
                    continue

                def run(product=product, stored=stored, x=x) -> None:
                    for w in stored:
                        product(x, w)

                s = seconds(run, repeats if rows < 512 else max(1, repeats // 2))
                if rows == 1:
                    cells.append(f"{params * bytes_per / s / 1e9:.1f}")
                cells.append(f"{2 * params * rows / s / 1e9:.1f}")
            if cells[0] == "-":
                cells.insert(0, "-")
            name_dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
            lines.append(f"| {name_dtype} | {label} | {name} | " + " | ".join(cells) + " |")
            del stored
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"{info.get('cpu', info['platform'])}, torch {info['torch']}, {info['threads']} threads")
    print(f"native kernels: {native.status()}")
    print("\nGB/s of weights read at 1 row, GFLOP/s at 1, 8, 512 rows (higher is better)\n")
    print("| dtype | matrices | product | 1 row GB/s | 1 row | 8 rows | 512 rows |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, "int8"):
        for line in table(dtype, args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
