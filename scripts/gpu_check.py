#!/usr/bin/env python
"""The CUDA checks of issue 15, in one run on a lent GPU machine (see scripts/gpu_check.sh).

    python scripts/gpu_check.py --out DIR [--sections parity,greedy,...] [--budget-s 420]

Sections (each writes its result into DIR/gpu_report.json as soon as it ends, so a run cut
short still reports what it finished):
- env: torch, GPU, flash-attn importable or not, HBM copy bandwidth (read + write).
- parity: every class (base, causal LM, fast causal LM, the three heads) against
  transformers' eager model on the same random weights, on CUDA, fp32/fp16/bf16, eager and
  sdpa, a left-padded batch. fp32 within 1e-4; fp16/bf16 within 3x transformers' own error
  against the fp32 reference (plus a floor), both measured here.
- greedy: 600 greedy tokens across the 256-token window, fp32: the reference model, the
  fast model and the compiled (CUDA-graph) fast model against transformers eager.
- auto: what attn="auto" picks on CUDA without flash-attn, and with a stand-in flash_attn
  module importable (the wiring; the real kernel cannot be built on that machine).
- flex: flex_attention against sdpa with an explicit window mask, prefill at 2048 tokens.
- bench: benchmarks/bench.py's GPU rows (1.3B and 2.7B shapes, fp16/bf16, with and without
  --compile, transformers eager as the baseline).
- cli: `gptneo generate --device cuda --stats` on a random 1.3B-shaped local checkpoint.
Everything runs on random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests", REPO / "benchmarks", REPO / "scripts"):
    sys.path.insert(0, str(extra))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

HEAD_CLASSES = {
    "base": "GPTNeoModel",
    "causal_lm": "GPTNeoForCausalLM",
    "sequence_classification": "GPTNeoForSequenceClassification",
    "token_classification": "GPTNeoForTokenClassification",
    "question_answering": "GPTNeoForQuestionAnswering",
}
#: "cpu" only for a smoke run of the script itself (--device cpu).
DEVICE = "cuda"
GREEDY_TOKENS = 600
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Report:
    """The JSON report, rewritten after every section."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.path = out / "gpu_report.json"
        self.data: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        }
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, fn: Callable[[], Any], needs_s: float) -> None:
        if self.left() < needs_s:
            self.data[name] = {"skipped": f"{self.left():.0f} s left, needs ~{needs_s:.0f} s"}
            print(f"== {name}: skipped (time)", flush=True)
            self.save()
            return
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        began = time.perf_counter()
        try:
            result = {"result": fn(), "ok": True}
        except Exception as exc:  # noqa: BLE001 - a failed section is reported, not fatal
            result = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-4000:],
            }
            print(result["traceback"], flush=True)
        result["seconds"] = round(time.perf_counter() - began, 1)
        self.data[name] = result
        self.save()
        print(
            f"== {name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s", flush=True
        )

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


# ---- helpers ------------------------------------------------------------------------------


def sync() -> None:
    torch.cuda.synchronize()


def cuda_time_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def load_fast(folder: Path, dtype: str, attn: str = "auto", compile: bool = False) -> Any:
    """The fast causal LM (the test folders have no tokenizer, so not gptneo_cli.load)."""
    from gptneo_cli.fast import FastCausalLM

    return FastCausalLM.from_pretrained(
        folder, dtype=dtype, device=DEVICE, attn=attn, compile=compile
    )


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_batch(
    vocab: int, seq: int, device: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (3, seq), generator=gen)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, : seq // 2] = 0
    ids[mask == 0] = 0
    return ids.to(device or DEVICE), mask.to(device or DEVICE)


def outputs(obj: Any, head: str) -> dict[str, torch.Tensor]:
    """The tensors to compare, by name, from either library's output object."""
    if head == "base":
        names = ["last_hidden_state"]
    elif head == "question_answering":
        names = ["start_logits", "end_logits"]
    else:
        names = ["logits"]
    found = {n: getattr(obj, n).float() for n in names}
    hidden = getattr(obj, "hidden_states", None)
    if head == "base" and hidden is not None:
        for i, h in enumerate(hidden):
            found[f"hidden_{i}"] = h.float()
    return found


def max_err(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None) -> float:
    diff = (a - b).abs()
    if valid is not None and diff.dim() >= 2 and diff.shape[:2] == valid.shape:
        diff = diff[valid.bool()]
    return float(diff.max()) if diff.numel() else 0.0


# ---- sections ---------------------------------------------------------------------------


def section_env() -> dict[str, Any]:
    from bench import copy_bandwidth_gbs, flash_available

    props = torch.cuda.get_device_properties(0)
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "flash_attn_importable": flash_available(),
        "transformers": __import__("transformers").__version__,
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs("cuda"), 1),
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }


def section_parity(tmp: Path) -> dict[str, Any]:
    from oracle import TINY_CONFIGS, build_reference, save_reference

    import gptneo_cli

    rows = []
    failures = []
    for cfg_name, cfg in TINY_CONFIGS.items():
        for head, cls_name in HEAD_CLASSES.items():
            ref_cpu = build_reference(head, seed=3, **cfg)
            folder = save_reference(ref_cpu, tmp / f"{cfg_name}-{head}")
            ids, mask = padded_batch(cfg["vocab_size"], 21)
            pos = positions(mask)
            valid = (
                mask
                if head in ("base", "causal_lm", "token_classification", "question_answering")
                else None
            )
            kwargs = {"output_hidden_states": True} if head == "base" else {}
            with torch.inference_mode():
                ref32 = outputs(
                    ref_cpu.to(DEVICE)(ids, attention_mask=mask, position_ids=pos, **kwargs), head
                )
            for dtype_name, dtype in DTYPES.items():
                with torch.inference_mode():
                    hf = ref_cpu.to(dtype)(ids, attention_mask=mask, position_ids=pos, **kwargs)
                hf_err = max(max_err(t, ref32[n], valid) for n, t in outputs(hf, head).items())
                candidates: list[tuple[str, Any]] = []
                ours_cls = getattr(gptneo_cli, cls_name)
                for attn in ("eager", "sdpa"):
                    candidates.append(
                        (
                            attn,
                            lambda a=attn, c=ours_cls, f=folder, d=dtype_name: c.from_pretrained(
                                f, dtype=d, device=DEVICE, attn=a
                            ),
                        )
                    )
                    if head == "causal_lm":
                        candidates.append(
                            (
                                f"fast-{attn}",
                                lambda a=attn, f=folder, d=dtype_name: load_fast(f, d, a),
                            )
                        )
                for label, make in candidates:
                    model = make()
                    with torch.inference_mode():
                        got = outputs(model(ids, attention_mask=mask, **kwargs), head)
                    err = max(max_err(t, ref32[n], valid) for n, t in got.items())
                    limit = 1e-4 if dtype is torch.float32 else max(3 * hf_err, 2e-3)
                    ok = err <= limit
                    row = {
                        "config": cfg_name,
                        "head": head,
                        "dtype": dtype_name,
                        "impl": label,
                        "max_err": err,
                        "transformers_err": hf_err,
                        "limit": limit,
                        "ok": ok,
                    }
                    rows.append(row)
                    if not ok:
                        failures.append(row)
                    del model
            ref_cpu.to("cpu", torch.float32)
    return {
        "checked": len(rows),
        "failures": failures,
        "worst": sorted(rows, key=lambda r: -r["max_err"] / r["limit"])[:8],
    }


def greedy_ours(model: Any, ids: torch.Tensor, new: int) -> list[int]:
    cache = model.new_cache(ids.shape[0], ids.shape[1] + new)
    tokens = []
    with torch.inference_mode():
        logits = model(ids, cache=cache, logits_to_keep=1).logits
        for step in range(new):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            if step + 1 < new:
                logits = model(token, cache=cache).logits
    return tokens


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def section_greedy(tmp: Path) -> dict[str, Any]:
    from oracle import build_reference, save_reference

    import gptneo_cli

    cfg = dict(
        vocab_size=1000,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 2]],
        window_size=256,
        max_position_embeddings=1024,
    )
    ref = build_reference("causal_lm", seed=11, **cfg)
    with torch.no_grad():  # a sharper distribution: fewer near-ties for rounding to flip
        ref.lm_head.weight.mul_(4.0)
    folder = save_reference(ref, tmp / "greedy")
    new = GREEDY_TOKENS
    ids = torch.randint(1, 1000, (1, 24), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    result: dict[str, Any] = {}
    for dtype_name, dtype in DTYPES.items():
        hf = ref.to(DEVICE, dtype)
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        want = out[0, ids.shape[1] :].tolist()
        impls: dict[str, Callable[[], Any]] = {
            "reference-sdpa": lambda d=dtype_name: gptneo_cli.GPTNeoForCausalLM.from_pretrained(
                folder, dtype=d, device=DEVICE, attn="sdpa"
            ),
            "reference-eager": lambda d=dtype_name: gptneo_cli.GPTNeoForCausalLM.from_pretrained(
                folder, dtype=d, device=DEVICE, attn="eager"
            ),
            "fast": lambda d=dtype_name: load_fast(folder, d, "sdpa"),
        }
        if dtype is not torch.float16 and DEVICE == "cuda":  # CUDA graphs, one compile each
            impls["fast-compile"] = lambda d=dtype_name: load_fast(folder, d, "sdpa", True)
        rows = {}
        for label, make in impls.items():
            began = time.perf_counter()
            model = make()
            got = greedy_ours(model, ids, new)
            rows[label] = {
                "first_mismatch": first_mismatch(got, want),
                "identical": got == want,
                "seconds": time.perf_counter() - began,
            }
            del model
        result[dtype_name] = rows
    ref.to("cpu", torch.float32)
    result["fp32_all_identical"] = all(r["identical"] for r in result["float32"].values())
    return result


def section_auto(tmp: Path) -> dict[str, Any]:
    import importlib.machinery
    import types

    from gptneo_cli import attention

    result: dict[str, Any] = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        result[f"auto_{str(dtype)[6:]}"] = attention.choose_backend(
            "auto", torch.device("cuda"), dtype
        )
    # A stand-in flash_attn (the real one has no wheels): auto must pick it in half precision.
    fake = types.ModuleType("flash_attn")

    def flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)
    ):
        t = q.shape[1]
        i = torch.arange(t, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window_size[0] >= 0:
            allowed &= i[None, :] >= i[:, None] - window_size[0]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed,
            scale=softmax_scale,
        )
        return out.transpose(1, 2)

    fake.flash_attn_func = flash_attn_func
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    from oracle import build_reference, save_reference

    ref = build_reference(
        "causal_lm",
        seed=2,
        vocab_size=300,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        max_position_embeddings=128,
    )
    folder = save_reference(ref, tmp / "auto")
    sys.modules["flash_attn"] = fake
    attention.flash_module.cache_clear()
    try:
        result["auto_bfloat16_with_flash"] = attention.choose_backend(
            "auto", torch.device("cuda"), torch.bfloat16
        )
        result["auto_float32_with_flash"] = attention.choose_backend(
            "auto", torch.device("cuda"), torch.float32
        )
        ids = torch.randint(1, 300, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        import gptneo_cli

        errs = {}
        with torch.inference_mode():
            want = gptneo_cli.GPTNeoForCausalLM.from_pretrained(
                folder, dtype="bfloat16", device=DEVICE, attn="eager"
            )(ids).logits.float()
            for attn in ("auto", "flash"):
                got = load_fast(folder, "bfloat16", attn)(ids).logits.float()
                errs[attn] = float((got - want).abs().max())
        result["stand_in_flash_vs_eager_max_err"] = errs
    finally:
        sys.modules.pop("flash_attn", None)
        attention.flash_module.cache_clear()
    return result


def section_flex(tmp: Path) -> dict[str, Any]:
    from flex_prefill import flex_window_prefill

    from gptneo_cli import attention

    result: dict[str, Any] = {}
    window = 256
    for heads, dim, label in ((20, 128, "2.7b"),):
        for dtype in (torch.bfloat16,):
            t = 2048
            gen = torch.Generator(device=DEVICE).manual_seed(0)
            q, k, v = (
                torch.randn(1, heads, t, dim, device=DEVICE, dtype=dtype, generator=gen) * 0.3
                for _ in range(3)
            )
            plan = attention.build_plan("local", 0, t, window, None, q.device)
            glob = attention.build_plan("global", 0, t, window, None, q.device)
            began = time.perf_counter()
            flex_out = flex_window_prefill(q, k, v, plan)
            sync()
            first_call_s = time.perf_counter() - began
            sdpa_out = attention.sdpa_attention(q, k, v, plan)
            err = float((flex_out.float() - sdpa_out.float()).abs().max())
            key = f"{label}_{str(dtype)[6:]}"
            qkv = (q, k, v)
            result[key] = {
                "sdpa_window_mask_ms": cuda_time_ms(
                    lambda x=qkv, p=plan: attention.sdpa_attention(*x, p)
                ),
                "flex_window_ms": cuda_time_ms(lambda x=qkv, p=plan: flex_window_prefill(*x, p)),
                "sdpa_causal_global_ms": cuda_time_ms(
                    lambda x=qkv, p=glob: attention.sdpa_attention(*x, p)
                ),
                "flex_first_call_s": first_call_s,
                "max_abs_diff": err,
            }
    # A second length: does a new prompt length recompile (and how long does it take)?
    q2 = torch.randn(1, 20, 1500, 128, device=DEVICE, dtype=torch.bfloat16)
    began = time.perf_counter()
    flex_window_prefill(q2, q2, q2, attention.build_plan("local", 0, 1500, 256, None, q2.device))
    sync()
    result["second_length_first_call_s"] = time.perf_counter() - began
    # Padded batch through flex vs sdpa (the mask read from the plan).
    valid = torch.ones(2, 1024, dtype=torch.bool, device=DEVICE)
    valid[1, :300] = False
    plan = attention.build_plan("local", 0, 1024, 256, valid)
    qb = torch.randn(2, 16, 1024, 128, device=DEVICE, dtype=torch.bfloat16)
    got = flex_window_prefill(qb, qb, qb, plan)
    want = attention.sdpa_attention(qb, qb, qb, plan)
    result["padded_max_abs_diff_valid_rows"] = float(
        (got - want).float().abs()[valid[:, None, :, None].expand_as(got)].max()
    )
    return result


def section_flex_model(cache_dir: Path) -> dict[str, Any]:
    """Whole-model 2048-token prefill, 2.7B shape bf16: sdpa everywhere vs flex on local."""
    from bench import checkpoint
    from flex_prefill import flex_window_prefill

    from gptneo_cli import attention

    folder = checkpoint("2.7b", cache_dir)
    model = load_fast(folder, "bfloat16", "sdpa")
    ids = torch.randint(0, 50000, (1, 2048), device=DEVICE)
    result: dict[str, Any] = {}
    with torch.inference_mode():

        def prefill() -> Any:
            return model(ids, logits_to_keep=1).logits

        base = prefill().float()
        result["sdpa_ms"] = cuda_time_ms(prefill, repeats=10)
        plain = attention._sdpa_cuda

        def routed(q: Any, k: Any, v: Any, plan: Any) -> Any:
            # local layers' prefills of 512+ tokens through flex, the rest as before
            long_local = plan.window is not None and q.shape[-2] >= 512
            if long_local and k.shape[-2] == q.shape[-2]:
                return flex_window_prefill(q, k, v, plan)
            return plain(q, k, v, plan)

        attention._sdpa_cuda = routed
        try:
            flexed = prefill().float()
            result["flex_local_ms"] = cuda_time_ms(prefill, repeats=10)
        finally:
            attention._sdpa_cuda = plain
        result["last_logits_max_abs_diff"] = float((base - flexed).abs().max())
        result["same_argmax"] = bool((base.argmax(-1) == flexed.argmax(-1)).all())
    return result


def section_bench(cache_dir: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench.py"),
        "--device",
        "cuda",
        "--shapes",
        args.shapes,
        "--dtypes",
        "float16,bfloat16",
        "--variants",
        "compile",
        "--repeats",
        str(args.repeats),
        "--no-load",
        "--new-tokens",
        "64",
        "--batch-tokens",
        "32",
        "--cache-dir",
        str(cache_dir),
        "--json",
        str(out / "bench-gpu.json"),
        "--markdown",
        str(out / "bench-gpu.md"),
    ]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_LOGS": "perf_hints"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=max(60, args.bench_timeout())
    )
    (out / "bench-gpu.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    hints = [line for line in proc.stderr.splitlines() if "cudagraph" in line.lower()]
    if proc.returncode != 0:
        raise RuntimeError(f"bench.py exited {proc.returncode}: {proc.stderr[-3000:]}")
    return {
        "returncode": proc.returncode,
        "cudagraph_log_lines": hints[:10],
        "table": (out / "bench-gpu.md").read_text() if proc.returncode == 0 else None,
        "stderr_tail": proc.stderr[-3000:],
    }


def section_cli(cache_dir: Path, tmp: Path, assets: Path | None) -> dict[str, Any]:
    from bench import checkpoint

    folder = checkpoint("1.3b", cache_dir)
    model_dir = tmp / "cli-1.3b"
    model_dir.mkdir(exist_ok=True)
    for item in folder.iterdir():
        target = model_dir / item.name
        if not target.exists():
            target.symlink_to(item)
    if assets and (assets / "vocab.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(assets / name, model_dir / name)
        tokenizer = "gpt2 vocab.json + merges.txt"
    else:
        raise RuntimeError("no GPT-2 vocabulary carried: pass --assets")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "XDG_CONFIG_HOME": str(tmp / "cfg"),
        "NO_COLOR": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "gptneo_cli.cli",
        "generate",
        "def hello_world():",
        "--model",
        str(model_dir),
        "--device",
        "cuda",
        "--max-new-tokens",
        "48",
        "--greedy",
        "--stats",
    ]
    runs = {}
    for label, extra in (("bf16", ["--dtype", "bfloat16"]), ("fp16", ["--dtype", "float16"])):
        began = time.perf_counter()
        proc = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, timeout=240)
        runs[label] = {
            "returncode": proc.returncode,
            "stdout": proc.stdout[-600:],
            "stderr": proc.stderr[-1500:],
            "wall_s": time.perf_counter() - began,
        }
    failed = [label for label, run in runs.items() if run["returncode"] != 0]
    if failed:
        raise RuntimeError(f"gptneo generate failed for {failed}: {runs}")
    return {"tokenizer": tokenizer, "runs": runs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--sections", default="env,parity,greedy,auto,cli,flex_model,flex,bench")
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--shapes", default="2.7b")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--assets", default=None, help="folder with GPT-2 vocab.json/merges.txt")
    p.add_argument("--cache-dir", default="/tmp/gptneo-bench")
    p.add_argument(
        "--reserve-s",
        type=float,
        default=10,
        help="seconds the bench leaves for the sections after it",
    )
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEVICE, GREEDY_TOKENS
    DEVICE = args.device
    if DEVICE == "cpu":  # smoke run: short greedy, no timing sections
        GREEDY_TOKENS = 40
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir)
    report = Report(out, args.budget_s)
    args.bench_timeout = lambda: report.left() - args.reserve_s
    tmp = Path(tempfile.mkdtemp(prefix="gpucheck-"))
    assets = Path(args.assets) if args.assets else None
    wanted = args.sections.split(",")
    sections: dict[str, tuple[Callable[[], Any], float]] = {
        "env": (section_env, 5),
        "parity": (lambda: section_parity(tmp), 30),
        "greedy": (lambda: section_greedy(tmp), 40),
        "auto": (lambda: section_auto(tmp), 10),
        "flex": (lambda: section_flex(tmp), 30),
        "flex_model": (lambda: section_flex_model(cache_dir), 40),
        "bench": (lambda: section_bench(cache_dir, out, args), 120),
        "cli": (lambda: section_cli(cache_dir, tmp, assets), 40),
    }
    for name in wanted:
        fn, needs = sections[name]
        report.run(name, fn, needs)
    print(
        json.dumps(
            {k: (v.get("ok") if isinstance(v, dict) else v) for k, v in report.data.items()},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
