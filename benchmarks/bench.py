#!/usr/bin/env python
"""gptneo against transformers, side by side: speed and memory on the same weights.

    python benchmarks/bench.py                      # CPU: 125M shape, float32 and bfloat16
    python benchmarks/bench.py --shapes 125m,1.3b   # add the 1.3B shape (5.3 GB checkpoint)
    python benchmarks/bench.py --device cuda        # GPU: 1.3B and 2.7B, fp16/bf16, sdpa/flash
    gptneo bench ...                                # the same, from the CLI

It writes random-weight checkpoints with the real GPT-Neo shapes (nothing is downloaded)
into a cache folder, then runs both engines in one process on the same weights, the same
prompts and the same thread count, alternating engine by engine within each repeat, and
reports medians after a warm-up. Loading (time and peak RSS) is measured in a fresh
subprocess per engine and repeat, so one engine's allocations cannot flatter the other.

What is measured, for each engine and dtype (ratios are against transformers, same dtype;
the int8 rows are compared with transformers float32):
- decode tokens/s at batch 1 (32-token prompt, greedy, the rate after the first token);
- time to first token for a 32- and a 512-token prompt (the wall time of a 1-token
  generate call: tokenization is not involved, prompts are token ids);
- batch-8 throughput (8 prompts of 32 tokens, all new tokens / wall time, prefill included);
- load time from disk (page cache warm) and peak RSS while loading (minus the RSS before
  loading, next to the checkpoint's bytes in that dtype), peak RSS while generating.
Both engines decode greedily with generate(); gptneo through gptneo_cli.generation with a
stub tokenizer (no text decoding on either side). The fp32 rows' greedy tokens are compared.

The peers, ONNX Runtime and OpenVINO, join when their own virtualenv exists
(benchmarks/peers/.venv, see benchmarks/peers/README.md): each peer engine runs in a process
of that venv's python, measured with this file's functions, alternating with the others.

Output: a JSON file with every sample and a markdown table (docs/PERFORMANCE.md holds one).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from peers import client as peer_client  # noqa: E402 - stdlib only; needs the path above

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

#: The real GPT-Neo shapes (config.json values that matter for speed).
SHAPES: dict[str, dict[str, Any]] = {
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12),
    "1.3b": dict(hidden_size=2048, num_layers=24, num_heads=16),
    "2.7b": dict(hidden_size=2560, num_layers=32, num_heads=20),
}
TRANSFORMERS = "transformers"
PEER = "peer"  # ONNX Runtime or OpenVINO, run by benchmarks/peers/run_peer.py in its own venv


# ---- checkpoints ------------------------------------------------------------------------


def hub_config(shape: str) -> dict[str, Any]:
    """A config.json like the Hub's for this shape (alternating global/local layers)."""
    dims = SHAPES[shape]
    layers = dims["num_layers"]
    return {
        "model_type": "gpt_neo",
        "architectures": ["GPTNeoForCausalLM"],
        "vocab_size": 50257,
        "max_position_embeddings": 2048,
        "hidden_size": dims["hidden_size"],
        "num_layers": layers,
        "num_heads": dims["num_heads"],
        "intermediate_size": None,
        "window_size": 256,
        "attention_types": [[["global", "local"], layers // 2]],
        "attention_layers": ["global", "local"] * (layers // 2),
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    }


def checkpoint(shape: str, cache_dir: Path) -> Path:
    """Write (once) a float32 random-weight checkpoint of this shape; return its folder."""
    import torch

    from gptneo_cli.config import GPTNeoConfig
    from gptneo_cli.modeling import GPTNeoForCausalLM
    from gptneo_cli.weights import save_safetensors

    folder = cache_dir / f"gpt-neo-{shape}-random"
    done = folder / ".complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    log(f"writing a random {shape} checkpoint to {folder} (once)")
    config_dict = hub_config(shape)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = GPTNeoConfig.from_json_file(folder / "config.json")
    with torch.device("meta"):
        skeleton = GPTNeoForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, param in skeleton.named_parameters():
        if name.endswith("bias"):
            state[name] = torch.zeros(param.shape)
        elif ".ln_" in name or "ln_f" in name:
            state[name] = torch.ones(param.shape)
        else:
            state[name] = torch.empty(param.shape).normal_(0.0, 0.02, generator=gen)
    save_safetensors(state, folder / "model.safetensors")
    del state
    done.write_text("ok\n")
    return folder


def checkpoint_with_tokenizer(shape: str, cache_dir: Path) -> Path:
    """checkpoint(), plus the real GPT-2 vocabulary beside it (for the benchmarks that send
    text). It is read from GPTNEO_TEST_GPT2_ASSETS or ../shared/assets/gpt2-tokenizer, as in
    the tests, and copied into the cache folder only: never into the project."""
    folder = checkpoint(shape, cache_dir)
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return folder
    source = Path(
        os.environ.get("GPTNEO_TEST_GPT2_ASSETS")
        or REPO.parent / "shared" / "assets" / "gpt2-tokenizer"
    )
    if not (source / "vocab.json").is_file():
        raise SystemExit(f"no GPT-2 vocabulary in {source}: set GPTNEO_TEST_GPT2_ASSETS")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / name, folder / name)
    return folder


# ---- the engines ---------------------------------------------------------------------


@dataclass
class Engine:
    """One way of running the model: who, dtype, attention, options."""

    name: str  # "gptneo", "gptneo-int8", "gptneo-compile", "transformers", "openvino", ...
    kind: str  # "gptneo", "transformers" or "peer"
    dtype: str
    attn: str = "auto"
    quantize: str | None = None
    compile: bool = False
    reference: bool = False  # gptneo's reference modeling instead of the fast path
    peer: str | None = None  # the engine name run_peer.py knows ("openvino-bf16", ...)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.dtype}{', ' + self.attn if self.attn != 'auto' else ''})"

    def load(self, folder: Path, device: str) -> Any:
        import torch

        if self.kind == TRANSFORMERS:
            import transformers

            kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
            kwargs["attn_implementation"] = self.attn if self.attn != "auto" else "eager"
            if device != "cpu":
                kwargs["device_map"] = device
            return transformers.GPTNeoForCausalLM.from_pretrained(folder, **kwargs).eval()
        if self.reference:
            from gptneo_cli.modeling import GPTNeoForCausalLM

            return GPTNeoForCausalLM.from_pretrained(
                folder, dtype=self.dtype, device=device, attn=self.attn
            )
        from gptneo_cli.fast import FastCausalLM

        return FastCausalLM.from_pretrained(
            folder,
            dtype=self.dtype,
            device=device,
            attn=self.attn,
            quantize=self.quantize,
            compile=self.compile,
        )


class StubTokenizer:
    """gptneo's generate() wants a tokenizer; prompts are ids and no text is needed."""

    eos_id = 50256
    bos_id = 50256

    class _Decoder:
        def push(self, token_id: int) -> str:
            return ""

        def finish(self) -> str:
            return ""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Any) -> str:
        return ""

    def stream_decoder(self) -> StubTokenizer._Decoder:
        return StubTokenizer._Decoder()


class _Stamps:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_generate(
    engine: Engine, model: Any, prompts: Any, new: int, device: str
) -> tuple[float, float]:
    """One greedy generate of exactly `new` tokens per prompt.

    Returns (wall seconds, decode tokens/s after the first token, all rows together).
    """
    import torch

    if engine.kind == TRANSFORMERS:
        stamps = _Stamps()
        ids = prompts.to(model.device)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=50256,
                streamer=stamps,
            )
        sync(device)
        wall = time.perf_counter() - start
        times = stamps.times
        rows = ids.shape[0]
        rate = rows * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        return wall, rate

    from gptneo_cli.generation import GenerationConfig, generate

    config = GenerationConfig(do_sample=False, max_new_tokens=new, ignore_eos=True)
    rows = prompts.tolist()
    sync(device)
    start = time.perf_counter()
    results = generate(model, StubTokenizer(), rows, config)
    sync(device)
    wall = time.perf_counter() - start
    assert all(r.completion_tokens == new for r in results), "generation ended early"
    decode_s = max(r.timings.decode_s for r in results)
    rate = len(results) * (new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0
    return wall, rate


# ---- measurements in this process -----------------------------------------------------


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=dict)
    tokens: list[int] | None = None  # fp32 engines: greedy tokens of the 32-token prompt
    info: dict[str, Any] = field(default_factory=dict)  # a peer's versions and settings

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        vals = self.values.get(key)
        return statistics.median(vals) if vals else None


def workload_prompts(long_prompt: int, batch: int) -> tuple[Any, Any, Any]:
    """The workload's prompts as token ids (32 tokens, `long_prompt` tokens, `batch` x 32),
    seeded: every engine gets the same ones, the peers' runner included."""
    import torch

    gen = torch.Generator().manual_seed(1)
    prompt32 = torch.randint(0, 50000, (1, 32), generator=gen)
    prompt_long = torch.randint(0, 50000, (1, long_prompt), generator=gen)
    batch8 = torch.randint(0, 50000, (batch, 32), generator=gen)  # the batch row
    return prompt32, prompt_long, batch8


#: generate(prompts, new tokens) -> (wall seconds, decode tokens/s), for one loaded engine.
Generate = Callable[[Any, int], "tuple[float, float]"]


def warm_up(generate: Generate, prompts: tuple[Any, Any, Any]) -> None:
    """Every shape once (compiles and first-call allocations happen here)."""
    prompt32, prompt_long, batch8 = prompts
    generate(prompt32, 8)
    generate(prompt_long, 1)
    generate(batch8, 4)


def repeat_samples(
    generate: Generate, prompts: tuple[Any, Any, Any], args: argparse.Namespace
) -> dict[str, float]:
    """One repeat of the workload: the figures every engine reports, measured alike."""
    prompt32, prompt_long, batch8 = prompts
    out: dict[str, float] = {}
    out["decode_tok_s"] = generate(prompt32, args.new_tokens)[1]
    out["ttft_32_ms"] = 1000 * generate(prompt32, 1)[0]
    out["ttft_long_ms"] = 1000 * generate(prompt_long, 1)[0]
    wall, rate = generate(batch8, args.batch_tokens)
    out["batch8_tok_s"] = args.batch * args.batch_tokens / wall
    out["batch8_decode_tok_s"] = rate
    return out


def greedy_tokens(engine: Engine, model: Any, prompt: Any, new: int, device: str) -> list[int]:
    """The greedy continuation of one prompt (for the fp32 token-identity check)."""
    import torch

    if engine.kind == TRANSFORMERS:
        ids = prompt.to(model.device)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=50256,
            )
        return [int(t) for t in out[0, ids.shape[1] :].tolist()]
    from gptneo_cli.generation import GenerationConfig, generate

    config = GenerationConfig(do_sample=False, max_new_tokens=new, ignore_eos=True)
    return list(generate(model, StubTokenizer(), prompt.tolist(), config)[0].token_ids)


def measure_speed(
    engines: list[Engine], folder: Path, device: str, args: argparse.Namespace
) -> dict[str, Samples]:
    """Decode, TTFT and batch-8 for every engine, alternating engines within each repeat.

    A peer engine (ONNX Runtime, OpenVINO) runs in its own process in the peers' virtualenv,
    which loads and warms up once and then measures one repeat each time it is asked."""
    prompts = workload_prompts(args.long_prompt, args.batch)
    samples = {e.label: Samples() for e in engines}
    runs = start_engines(engines, folder, device, args, samples)
    for engine in engines:
        run = runs.get(engine.label)
        if isinstance(run, functools.partial):  # an engine in this process
            log(f"warm-up {engine.label}")
            warm_up(run, prompts)
            if engine.dtype == "float32" and not engine.quantize:
                model = run.args[1]
                tokens = greedy_tokens(engine, model, prompts[0], args.new_tokens, device)
                samples[engine.label].tokens = tokens
    for repeat in range(args.repeats):
        for engine in engines:
            if engine.label not in runs:
                continue
            log(f"repeat {repeat + 1}/{args.repeats}: {engine.label}")
            figures = one_repeat(engine, runs, prompts, args)
            for key, value in figures.items():
                samples[engine.label].add(key, value)
    for label in list(runs):
        if isinstance(runs[label], peer_client.PeerProcess):
            runs[label].close()
        del runs[label]
    gc.collect()
    return samples


def start_engines(
    engines: list[Engine],
    folder: Path,
    device: str,
    args: argparse.Namespace,
    samples: dict[str, Samples],
) -> dict[str, Any]:
    """Load every engine: a generate function for ours and transformers, a running
    PeerProcess (exported, loaded, warmed up) for a peer; a peer that fails is left out."""
    runs: dict[str, Any] = {}
    for engine in engines:
        log(f"loading {engine.label}")
        if engine.kind != PEER:
            model = engine.load(folder, device)
            runs[engine.label] = functools.partial(run_generate, engine, model, device=device)
            continue
        peer = peer_client.start(args.peers_python, engine.peer or "", folder, args, log)
        if peer is not None:
            runs[engine.label] = peer
            samples[engine.label].info = peer.info
            if engine.dtype == "float32" and not engine.quantize:
                samples[engine.label].tokens = peer.tokens
    return runs


def one_repeat(
    engine: Engine, runs: dict[str, Any], prompts: tuple[Any, Any, Any], args: argparse.Namespace
) -> dict[str, float]:
    """One repeat of one engine's workload ({} for a peer that fails now: it is dropped),
    with the memory bandwidth measured right before it on CPU (the host's moves)."""
    near = {}
    if args.device == "cpu":
        near["read_bandwidth_gbs"] = _ceiling().read_bandwidth_gbs(args.device)
    if engine.kind != PEER:
        return {**near, **repeat_samples(runs[engine.label], prompts, args)}
    try:
        return {**near, **runs[engine.label].repeat()}
    except (OSError, RuntimeError, ValueError) as exc:
        peer_client.fail(engine.peer or "", exc, log)
        runs.pop(engine.label).close()
        return {}


# ---- load time and memory in a fresh process ---------------------------------------


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB, from /proc (Linux)."""
    now = peak = 0.0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return now, peak


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def load_figures(load: Callable[[], Any], generate: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """Time `load()` and the peak RSS while loading, then while generating from the loaded
    model (a 32-token prompt): the load figures of every engine, the peers' included."""
    import torch

    gc.collect()
    before, _ = rss_mib()
    exact = reset_peak()
    start = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - start
    after, load_peak = rss_mib()
    reset_peak()
    prompt = torch.randint(0, 50000, (1, 32), generator=torch.Generator().manual_seed(2))
    generate(model, prompt)
    _, gen_peak = rss_mib()
    return {
        "load_s": load_s,
        "rss_before_mib": before,
        "load_peak_mib": load_peak,
        "load_delta_mib": load_peak - before,
        "resident_after_load_mib": after - before,
        "gen_peak_mib": gen_peak,
        "peak_exact": exact,
    }


def child_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a subprocess: import, load once, generate once; report time and memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    engine = Engine(**spec["engine"])
    device = spec["device"]
    if engine.kind == TRANSFORMERS:
        import transformers  # noqa: F401
    else:
        import gptneo_cli.fast  # noqa: F401
        import gptneo_cli.generation  # noqa: F401
        import gptneo_cli.hub  # noqa: F401

    def load() -> Any:
        model = engine.load(Path(spec["folder"]), device)
        sync(device)
        return model

    def generate(model: Any, prompt: Any) -> None:
        run_generate(engine, model, prompt, spec["gen_tokens"], device)

    out = load_figures(load, generate)
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_loads(
    engines: list[Engine], folder: Path, device: str, args: argparse.Namespace
) -> dict[str, Samples]:
    """Load figures in a fresh process per engine and repeat, alternating engines."""
    samples = {e.label: Samples() for e in engines}
    for repeat in range(args.load_repeats):
        for engine in engines:
            log(f"load {repeat + 1}/{args.load_repeats}: {engine.label} (fresh process)")
            if engine.kind == PEER:
                if engine.peer in peer_client.FAILED:
                    continue
                result = peer_client.load(args.peers_python, engine.peer or "", folder, args, log)
                if result is None:
                    continue
            else:
                result = child_load_in_subprocess(engine, folder, device, args)
            for key, value in result.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    samples[engine.label].add(key, float(value))
    return samples


def child_load_in_subprocess(
    engine: Engine, folder: Path, device: str, args: argparse.Namespace
) -> dict[str, Any]:
    spec = {
        "engine": engine.__dict__,
        "folder": str(folder),
        "device": device,
        "threads": args.threads,
        "gen_tokens": args.new_tokens,
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load subprocess failed for {engine.label}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- int8 quality ------------------------------------------------------------------


def agreement(model_dir: str, device: str, tokens: int = 4096) -> dict[str, Any]:
    """Top-1 next-token agreement of int8 (and bf16) with float32, teacher-forced on text.

    The text is this package's own Python source (code: the demo model's domain), tokenized
    with the model's own tokenizer, in windows of the model's context (at most 512).
    """
    import torch

    from gptneo_cli.fast import FastCausalLM
    from gptneo_cli.hub import resolve_model_dir
    from gptneo_cli.modeling import GPTNeoForCausalLM
    from gptneo_cli.tokenizer import load_tokenizer

    folder = resolve_model_dir(model_dir)
    tokenizer = load_tokenizer(folder)
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(REPO.glob("gptneo_cli/*.py")))
    ids = tokenizer.encode(text)[:tokens]
    reference = GPTNeoForCausalLM.from_pretrained(folder, dtype="float32", device=device)
    window = min(512, reference.config.max_position_embeddings)
    chunks = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    variants = {
        "int8 (float32 model)": FastCausalLM.from_pretrained(
            folder, dtype="float32", device=device, quantize="int8"
        ),
        "int8 (bfloat16 model)": FastCausalLM.from_pretrained(
            folder, dtype="bfloat16", device=device, quantize="int8"
        ),
        "bfloat16": FastCausalLM.from_pretrained(folder, dtype="bfloat16", device=device),
    }
    if device == "cpu":
        variants["int8-dynamic"] = FastCausalLM.from_pretrained(
            folder, dtype="float32", device=device, quantize="int8-dynamic"
        )
    agree = {name: 0 for name in variants}
    total = 0
    with torch.inference_mode():
        for chunk in chunks:
            x = torch.tensor([chunk], device=device)
            top = reference(x).logits.argmax(-1)
            total += top.numel()
            for name, model in variants.items():
                agree[name] += int((model(x).logits.argmax(-1) == top).sum())
    sizes = {name: model.weight_bytes() for name, model in variants.items()}
    ref_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    return {
        "model": str(model_dir),
        "tokens": total,
        "top1_agreement": {name: agree[name] / total for name in variants},
        "weight_bytes": {"float32": ref_bytes, **sizes},
    }


# ---- CUDA extras ---------------------------------------------------------------------


def copy_bandwidth_gbs(device: str) -> float:
    """Measured device-memory bandwidth (read + write of a 1 GiB copy)."""
    import torch

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    return 2 * src.numel() * 4 / seconds / 1e9


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed or broken: either way unavailable
        return False
    return True


# ---- planning and reporting --------------------------------------------------------


def plan(args: argparse.Namespace) -> list[tuple[str, list[Engine]]]:
    """Per dtype, the engines to compare (the first is the transformers baseline)."""
    groups: list[tuple[str, list[Engine]]] = []
    cuda = args.device.startswith("cuda")
    flash = cuda and flash_available()
    variants = set(args.variants)
    for dtype in args.dtypes:
        engines = [Engine(TRANSFORMERS, TRANSFORMERS, dtype, attn="eager")]
        if flash:
            engines.append(
                Engine("transformers-fa2", TRANSFORMERS, dtype, attn="flash_attention_2")
            )
        engines.append(Engine("gptneo", "gptneo", dtype, attn="sdpa"))
        if flash:
            engines.append(Engine("gptneo-flash", "gptneo", dtype, attn="flash"))
        if "ref" in variants:
            engines.append(Engine("gptneo-reference", "gptneo", dtype, attn="sdpa", reference=True))
        if "compile" in variants:
            engines.append(Engine("gptneo-compile", "gptneo", dtype, attn="sdpa", compile=True))
        if "int8" in variants:
            engines.append(Engine("gptneo-int8", "gptneo", dtype, attn="sdpa", quantize="int8"))
        if "int8-dynamic" in variants and dtype == "float32" and not cuda:
            engines.append(
                Engine("gptneo-int8-dynamic", "gptneo", dtype, attn="sdpa", quantize="int8-dynamic")
            )
        for peer in args.peer_engines:
            name, peer_dtype, quantize = peer_client.ROWS[peer]
            if peer_dtype == dtype:
                engines.append(Engine(name, PEER, dtype, quantize=quantize, peer=peer))
        groups.append((dtype, engines))
    return groups


def weight_bytes(config: dict[str, Any], dtype: str) -> int:
    from gptneo_cli.config import GPTNeoConfig

    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    params = GPTNeoConfig.from_dict(config).num_parameters("causal_lm")
    return params * size


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return ours / theirs


def summarize(
    shape: str,
    device: str,
    groups: list[tuple[str, list[Engine]]],
    speed: dict[str, Samples],
    loads: dict[str, Samples],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    rows = []
    config = hub_config(shape)
    baselines = {dtype: engines[0].label for dtype, engines in groups}
    for dtype, engines in groups:
        for engine in engines:
            s, ld = speed[engine.label], loads.get(engine.label, Samples())
            if engine.kind == PEER and not s.values:
                continue  # it failed to start: meta["peer_errors"] says why
            # int8 is compared with transformers float32 (the target's yardstick).
            base_label = (
                baselines.get("float32", baselines[dtype]) if engine.quantize else baselines[dtype]
            )
            base, base_ld = speed[base_label], loads.get(base_label, Samples())
            row: dict[str, Any] = {
                "shape": shape,
                "device": device,
                "engine": engine.name,
                "dtype": dtype,
                "attn": engine.attn,
                "quantize": engine.quantize,
                "compile": engine.compile,
                "peer": engine.peer,
                "baseline": base_label,
                "weights_mib": weight_bytes(config, dtype) / 2**20,
            }
            for key in (
                "decode_tok_s",
                "ttft_32_ms",
                "ttft_long_ms",
                "batch8_tok_s",
                "batch8_decode_tok_s",
            ):
                row[key] = s.median(key)
                row[key + "_x"] = ratio(row[key], base.median(key))
            for key in (
                "load_s",
                "load_delta_mib",
                "load_peak_mib",
                "rss_before_mib",
                "resident_after_load_mib",
                "gen_peak_mib",
                "cuda_peak_mib",
            ):
                row[key] = ld.median(key)
            row["load_s_x"] = ratio(row["load_s"], base_ld.median("load_s"))
            row["read_bandwidth_near_gbs"] = s.median("read_bandwidth_gbs")
            if row["load_delta_mib"] is not None:
                row["load_delta_over_weights"] = row["load_delta_mib"] / row["weights_mib"]
            if engine.kind != TRANSFORMERS and s.median("decode_tok_s"):
                row["batch8_over_own_b1"] = s.median("batch8_tok_s") / s.median("decode_tok_s")
                row["batch8_decode_over_own_b1"] = s.median("batch8_decode_tok_s") / s.median(
                    "decode_tok_s"
                )
            if engine.quantize and row["resident_after_load_mib"] is not None:
                fp32 = weight_bytes(config, "float32") / 2**20
                row["resident_over_fp32_weights"] = row["resident_after_load_mib"] / fp32
            rows.append(row)
    return rows


def token_check(speed: dict[str, Samples]) -> dict[str, Any]:
    """Are the fp32 engines' greedy tokens identical? The first engine with tokens (the
    transformers row) is the reference; a mismatch names the first differing position."""
    with_tokens = [(label, s.tokens) for label, s in speed.items() if s.tokens is not None]
    if not with_tokens:
        return {}
    reference, ref_tokens = with_tokens[0]
    out: dict[str, Any] = {
        "reference": reference,
        "tokens": len(ref_tokens),
        "identical": [reference],
        "mismatch": {},
    }
    for label, tokens in with_tokens[1:]:
        if tokens == ref_tokens:
            out["identical"].append(label)
            continue
        at = next(
            (i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b),
            min(len(tokens), len(ref_tokens)),
        )
        out["mismatch"][label] = at
        log(f"fp32 greedy tokens: {label} differs from {reference} at token {at}")
    return out


def token_lines(meta: dict[str, Any]) -> list[str]:
    """The markdown lines of the fp32 token check and the peers' settings."""
    lines = []
    for shape, check in meta.get("fp32_tokens", {}).items():
        if len(check.get("identical", [])) + len(check.get("mismatch", {})) < 2:
            continue
        same = ", ".join(check["identical"])
        text = f"{shape}: fp32 greedy tokens ({check['tokens']} after the 32-token prompt): "
        text += f"identical for {same}"
        if check["mismatch"]:
            text += "; MISMATCH: " + ", ".join(
                f"{label} differs from token {at}" for label, at in check["mismatch"].items()
            )
        lines += ["", text + "."]
    for shape, infos in meta.get("peers", {}).items():
        versions = next(iter(infos.values())).get("versions", {})
        lines += ["", f"{shape} peers: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
        for label, info in infos.items():
            lines.append(f"- {label}: {peer_client.describe(info)}")
    if meta.get("peer_errors"):
        lines.append("")
        lines += [f"- peer failed: {e}" for e in meta["peer_errors"]]
    return lines


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def with_ratio(value: float | None, x: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{fmt(value, digits)} ({fmt(x, 2, '×')})" if x is not None else fmt(value, digits)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    long = meta["args"]["long_prompt"]
    m = meta["machine"]
    lines = [
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count')} CPUs, "
        f"{m.get('memory_gib', '?')} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; {meta['args']['threads']} torch threads; torch {m['torch']}, transformers "
        f"{m.get('transformers', '?')}, Python {m['python']}; {meta.get('date', '')}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"| shape | dtype | engine | decode tok/s (×) | TTFT 32 ms (×) | TTFT {long} ms (×) | "
        f"batch-{meta['args'].get('batch', 8)} tok/s (×) | load s (×) | "
        "load peak ΔRSS MiB (÷ weights) | "
        "gen peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        engine = r["engine"] + (
            f" [{r['attn']}]" if r["attn"] not in ("auto", "sdpa", "eager") else ""
        )
        delta = r.get("load_delta_mib")
        delta_s = (
            "–"
            if delta is None
            else (f"{delta:.0f} ({r['load_delta_over_weights']:.2f}÷{r['weights_mib']:.0f})")
        )
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {engine} | "
            f"{with_ratio(r['decode_tok_s'], r['decode_tok_s_x'])} | "
            f"{with_ratio(r['ttft_32_ms'], r['ttft_32_ms_x'])} | "
            f"{with_ratio(r['ttft_long_ms'], r['ttft_long_ms_x'])} | "
            f"{with_ratio(r['batch8_tok_s'], r['batch8_tok_s_x'])} | "
            f"{with_ratio(r['load_s'], r['load_s_x'], 2)} | {delta_s} | "
            f"{fmt(r.get('gen_peak_mib'), 0)} |"
        )
    lines.append("")
    lines.append(
        "× = ratio to the transformers row of the same dtype (int8 rows: to transformers "
        "float32). For tok/s higher is better; for ms, s and MiB lower is better."
    )
    extra = [r for r in rows if r.get("batch8_over_own_b1") is not None]
    if extra:
        lines.append("")
        lines.append(
            "| shape | dtype | engine | batch-8 decode tok/s (×) | batch-8 ÷ own "
            "batch-1 (end to end / decode only) | resident after load MiB |"
        )
        lines.append("|---|---|---|---|---|---|")
        for r in extra:
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['engine']} | "
                f"{with_ratio(r['batch8_decode_tok_s'], r['batch8_decode_tok_s_x'])} | "
                f"{fmt(r['batch8_over_own_b1'], 2, '×')} / "
                f"{fmt(r['batch8_decode_over_own_b1'], 2, '×')} | "
                f"{fmt(r.get('resident_after_load_mib'), 0)} |"
            )
    if meta.get("bandwidth_gbs"):
        lines.append("")
        lines.append(
            f"Measured device copy bandwidth: {meta['bandwidth_gbs']:.0f} GB/s. "
            "Decode ceiling = bandwidth / weight bytes per token."
        )
        for r in rows:
            if r["decode_tok_s"] and r["engine"].startswith("gptneo"):
                ceiling = meta["bandwidth_gbs"] * 1e9 / (r["weights_mib"] * 2**20)
                lines.append(
                    f"- {r['shape']} {r['dtype']} {r['engine']}: "
                    f"{r['decode_tok_s']:.0f} tok/s = "
                    f"{100 * r['decode_tok_s'] / ceiling:.0f}% of {ceiling:.0f}"
                )
    lines += _ceiling().markdown_lines(rows, meta)
    lines += token_lines(meta)
    if meta.get("agreement"):
        a = meta["agreement"]
        lines.append("")
        lines.append(
            f"Top-1 next-token agreement with float32 on {a['tokens']} tokens "
            f"({a['model']}): "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in a["top1_agreement"].items())
        )
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _ceiling() -> Any:
    """benchmarks/ceiling.py: the bandwidth ceiling of decode (bytes per token, share)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import ceiling

    return ceiling


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma list of 125m, 1.3b, 2.7b (default: 125m on CPU, 1.3b,2.7b on CUDA)",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma list (default: float32,bfloat16 on CPU; float16,bfloat16 on CUDA)",
    )
    p.add_argument(
        "--variants",
        default="int8,int8-dynamic,compile",
        help="extra gptneo rows: int8, int8-dynamic, compile, ref "
        "(default int8,int8-dynamic,compile; '' for none)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens for batch-1 decode")
    p.add_argument("--batch-tokens", type=int, default=64, help="new tokens per row at batch 8")
    p.add_argument(
        "--batch",
        type=int,
        default=8,
        help="rows of the batch row (default 8; the *batch8* keys hold it)",
    )
    p.add_argument(
        "--long-prompt",
        type=int,
        default=None,
        help="the long TTFT prompt (default 512 on CPU, 2047 on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--no-load", action="store_true", help="skip the load/RSS subprocesses")
    p.add_argument(
        "--agreement-model",
        default=None,
        help="also measure int8/bf16 top-1 agreement with fp32 on this model",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where random checkpoints live (default ~/.cache/gptneo/bench)",
    )
    p.add_argument("--json", default="bench-results.json", help="JSON output file")
    p.add_argument("--markdown", default="bench-results.md", help="markdown table output file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 repeat, 16 tokens, 128-token long prompt",
    )
    p.add_argument(
        "--peers",
        default="auto",
        help="ONNX Runtime and OpenVINO rows, run in the peers' virtualenv: auto (those "
        "installed there), none, or a comma list of onnxruntime, openvino and engine names "
        f"({', '.join(peer_client.ROWS)}); see benchmarks/peers/README.md",
    )
    p.add_argument(
        "--peers-python",
        default=None,
        help="the peers' virtualenv python (default benchmarks/peers/.venv/bin/python)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.peers_python = args.peers_python or peer_client.default_python()
    args.peer_engines = []  # chosen by main() (it asks the peers' python what it has)
    cuda = args.device.startswith("cuda")
    args.shapes = (args.shapes or ("1.3b,2.7b" if cuda else "125m")).split(",")
    args.dtypes = (args.dtypes or ("float16,bfloat16" if cuda else "float32,bfloat16")).split(",")
    args.variants = [v for v in args.variants.split(",") if v]
    args.long_prompt = args.long_prompt or (2047 if cuda else 512)
    if args.quick:
        args.repeats, args.load_repeats, args.new_tokens = 1, 1, 16
        args.batch_tokens, args.long_prompt = 8, 128
    for shape in args.shapes:
        if shape not in SHAPES:
            p.error(f"unknown shape {shape!r}: use {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_load(json.loads(args.child))))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    cache_dir = Path(args.cache_dir or Path.home() / ".cache" / "gptneo" / "bench")
    started = time.perf_counter()
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    meta: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args).copy(),
        "command": " ".join(["python", str(shown), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.device.startswith("cuda"):
        meta["bandwidth_gbs"] = copy_bandwidth_gbs(args.device)
    try:
        args.peer_engines = peer_client.select(args.peers, args.peers_python, args.device, log)
    except ValueError as exc:
        log(f"error: --peers: {exc}")
        return 2
    meta["args"]["peer_engines"] = args.peer_engines
    # Measured before, between shapes and after: on a shared host it moved 48-79 GB/s within
    # minutes. The ceiling is the highest seen (the share is then never flattered).
    samples = meta["read_bandwidth_samples"] = [_ceiling().read_bandwidth_gbs(args.device)]
    log(f"memory read bandwidth: {samples[0]:.1f} GB/s")
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for shape in args.shapes:
        folder = checkpoint(shape, cache_dir)
        groups = plan(args)
        engines = [e for _, es in groups for e in es]
        speed = measure_speed(engines, folder, args.device, args)
        loads = {} if args.no_load else measure_loads(engines, folder, args.device, args)
        rows += summarize(shape, args.device, groups, speed, loads, args)
        samples.append(_ceiling().read_bandwidth_gbs(args.device))
        log(f"memory read bandwidth: {samples[-1]:.1f} GB/s")
        raw[shape] = {
            "speed": {k: v.values for k, v in speed.items()},
            "load": {k: v.values for k, v in loads.items()},
            "tokens": {k: v.tokens for k, v in speed.items() if v.tokens is not None},
        }
        meta.setdefault("fp32_tokens", {})[shape] = token_check(speed)
        peers_info = {k: v.info for k, v in speed.items() if v.info}
        if peers_info:
            meta.setdefault("peers", {})[shape] = peers_info
    near = [row["read_bandwidth_near_gbs"] for row in rows if row.get("read_bandwidth_near_gbs")]
    meta["read_bandwidth_gbs"] = max(samples + near)
    _ceiling().annotate(rows, meta["read_bandwidth_gbs"], hub_config, 32, args.new_tokens)
    if args.agreement_model:
        meta["agreement"] = agreement(args.agreement_model, args.device)
    if peer_client.ERRORS:
        meta["peer_errors"] = list(peer_client.ERRORS)
    meta["elapsed_s"] = time.perf_counter() - started
    table = markdown(rows, meta)
    Path(args.json).write_text(
        json.dumps({"meta": meta, "rows": rows, "samples": raw}, indent=2, default=str)
    )
    Path(args.markdown).write_text(table)
    print(table)
    log(f"done in {meta['elapsed_s']:.0f} s: {args.json}, {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
