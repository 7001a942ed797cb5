"""The demo model's function at a bigger model's weight size: a trained stand-in for speed.

Random weights give near-uniform next-token distributions, so a speculative draft is
rejected wherever int8 rounding flips a near tie, unlike a trained model. The Hub cannot
be reached here, so to measure drafting on a trained model at gpt-neo-125M's size this
writes the bundled demo model (hidden 256, 4 heads of 64, 4 layers, trained on Python
source) into a wider and deeper checkpoint that computes the same logits:

- every hidden state h becomes f copies [h, ..., h]; LayerNorm over the copies equals the
  copies of LayerNorm(h), so its weight and bias are tiled;
- a linear layer that reads copies has its weight divided by f across the input copies and
  its outputs tiled, so it writes copies; heads stay 64 wide, so tiling q, k, v tiles the
  heads (head i + 4j computes head i), and the MLP's 4x width is tiled the same way;
- the final LayerNorm is divided by f, so the tied head's logits x . w are unchanged;
- the added layers read noise-sized weights (so they cost what real ones do) but their
  output projections are zero: they add nothing to the residual stream;
- the vocabulary rows past the demo model's are small noise (their logits stay near 0,
  below a trained model's top choices), and positions and window stay the demo model's.

With f = 3 and 12 layers the weights are gpt-neo-125M's (hidden 768, 12 heads, 3072 MLP,
50257 tokens; only the position table keeps the demo model's 256 rows). The demo model's
tokenizer is copied beside it. `tests/test_widen.py` checks the logits against the demo
model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gptneo_cli.hub import BUNDLED_DIR

BUNDLED = BUNDLED_DIR / "tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tile_linear(weight: torch.Tensor, f: int) -> torch.Tensor:
    """A weight [out, in] that reads f copies of its input and writes f copies."""
    return weight.repeat(f, f) / f


def widen_state(
    state: dict[str, torch.Tensor],
    config: dict,
    factor: int,
    layers: int,
    vocab: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The widened and deepened weights (float32) of a GPT-Neo state dict."""
    gen = torch.Generator().manual_seed(seed)

    def noise(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, std, generator=gen)

    f = factor
    src = {name: t.float() for name, t in state.items()}
    hidden = config["hidden_size"] * f
    inner = (config.get("intermediate_size") or 4 * config["hidden_size"]) * f
    out: dict[str, torch.Tensor] = {}
    wte = src["transformer.wte.weight"].repeat(1, f)
    extra = noise(vocab - wte.shape[0], hidden, std=1e-3)
    out["transformer.wte.weight"] = torch.cat([wte, extra])
    out["transformer.wpe.weight"] = src["transformer.wpe.weight"].repeat(1, f)
    out["transformer.ln_f.weight"] = src["transformer.ln_f.weight"].repeat(f) / f
    out["transformer.ln_f.bias"] = src["transformer.ln_f.bias"].repeat(f) / f
    for i in range(layers):
        p = f"transformer.h.{i}."
        if i < config["num_layers"]:
            for name, t in src.items():
                if not name.startswith(p):
                    continue
                if t.dim() == 1:  # LayerNorm weights and biases, linear biases: tiled
                    out[name] = t.repeat(f)
                else:
                    out[name] = _tile_linear(t, f)
            continue
        a = p + "attn.attention."
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[a + proj + ".weight"] = noise(hidden, hidden)
        out[a + "out_proj.weight"] = torch.zeros(hidden, hidden)
        out[a + "out_proj.bias"] = torch.zeros(hidden)
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = torch.ones(hidden)
            out[p + ln + ".bias"] = torch.zeros(hidden)
        out[p + "mlp.c_fc.weight"] = noise(inner, hidden)
        out[p + "mlp.c_fc.bias"] = torch.zeros(inner)
        out[p + "mlp.c_proj.weight"] = torch.zeros(hidden, inner)
        out[p + "mlp.c_proj.bias"] = torch.zeros(hidden)
    return out


def widen_config(config: dict, factor: int, layers: int, vocab: int) -> dict:
    """The config of the widened model: same heads' width, tiled heads, more layers."""
    wide = dict(config)
    kinds = [kind for pattern, times in config["attention_types"] for kind in pattern * times]
    pattern = kinds[:2] if len(kinds) >= 2 else kinds
    wide.update(
        hidden_size=config["hidden_size"] * factor,
        num_heads=config["num_heads"] * factor,
        num_layers=layers,
        vocab_size=vocab,
        attention_types=[[pattern, layers // len(pattern)]],
        attention_layers=(pattern * layers)[:layers],
        torch_dtype="float32",
    )
    if config.get("intermediate_size"):
        wide["intermediate_size"] = config["intermediate_size"] * factor
    return wide


def write_widened(
    folder: Path,
    factor: int = 3,
    layers: int = 12,
    vocab: int = 50257,
    source: Path = BUNDLED,
) -> Path:
    """Write (once) the widened demo model into `folder`; return it."""
    from safetensors.torch import load_file

    from gptneo_cli.weights import save_safetensors

    done = folder / ".complete"
    if done.is_file():
        return folder
    config = json.loads((source / "config.json").read_text())
    if layers < config["num_layers"] or layers % 2:
        raise ValueError(f"layers must be even and at least {config['num_layers']}")
    folder.mkdir(parents=True, exist_ok=True)
    state = widen_state(load_file(str(source / "model.safetensors")), config, factor, layers, vocab)
    wide = widen_config(config, factor, layers, vocab)
    (folder / "config.json").write_text(json.dumps(wide, indent=2))
    save_safetensors(state, folder / "model.safetensors")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    done.write_text("ok\n")
    return folder
