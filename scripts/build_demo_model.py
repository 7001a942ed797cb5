#!/usr/bin/env python
"""Rebuild the bundled demo model (`--model tiny`) from scratch.

    python scripts/build_demo_model.py            # writes gptneo_cli/data/tiny/
    python scripts/build_demo_model.py --check    # rebuilds into a temp folder and compares
                                                  # its held-out loss with the shipped one

Everything that decides the result is fixed here: the file list (Python files of the
standard library of the running interpreter, sorted, with fixed exclusions), which files
are held out, the tokenizer's vocabulary size, the model config, the seed, the optimizer
settings and the step count. The tokenizer is trained with `tokenizers` on the training
files; the model is trained by gptneo's own `finetune` from a seeded random init, in
float32 on the CPU, and shipped in float16.

The result depends on the standard library's exact files: the shipped model was built on
CPython 3.11.7, and the metadata records the Python version and a hash of the file list and
contents, so a rebuild elsewhere can tell whether it saw the same data. With the same data,
a rebuild's held-out loss is expected within TOLERANCE of the recorded one (float sums on
CPUs differ slightly with the thread count and instruction set, and training amplifies the
differences a little).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptneo_cli.config import GPTNeoConfig  # noqa: E402
from gptneo_cli.modeling import GPTNeoForCausalLM  # noqa: E402
from gptneo_cli.tokenizer import Tokenizer  # noqa: E402
from gptneo_cli.training import (  # noqa: E402
    Reporter,
    TrainConfig,
    evaluate_lm,
    finetune,
    format_eval,
    format_step,
    pack_blocks,
    read_documents,
    token_stream,
    train_bpe_tokenizer,
)

DEFAULT_OUTPUT = REPO / "gptneo_cli" / "data" / "tiny"
METADATA = "demo_model.json"

SEED = 1234
VOCAB_SIZE = 2048
#: Path parts never used: third-party packages, test suites, codec tables, the pydoc topic
#: dump (one huge string) and the interpreter's build configuration.
EXCLUDE = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
    "__pycache__",
}
#: Every VAL_EVERY-th file of the sorted list is held out for validation.
VAL_EVERY = 25
#: Held-out files whose first EVAL_BLOCKS blocks form the small check the tests recompute.
EVAL_FILES = 3
EVAL_BLOCKS = 8
TOLERANCE = 0.05  # nats per token
#: One thread: on a shared machine two OpenMP threads fighting for one free core ran 6x
#: slower than one thread, and one thread also fixes the order of float reductions.
THREADS = 1

MODEL = dict(
    max_position_embeddings=256,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    window_size=128,
    attention_types=[[["global", "local"], 2]],
    intermediate_size=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
)
TRAIN = TrainConfig(
    block_size=256,
    batch_size=8,
    grad_accum=1,
    lr=2e-3,
    weight_decay=0.1,
    warmup_steps=100,
    min_lr_ratio=0.1,
    max_steps=2400,
    eval_every=400,
    precision="float32",
    seed=SEED,
    log_every=10,
)


def stdlib_files() -> tuple[Path, list[str]]:
    """The standard library folder and its Python files (relative, sorted, POSIX style)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts) & EXCLUDE or rel.parts[0].startswith("config-"):
            continue
        files.append(rel.as_posix())
    return root, files


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PrintReporter(Reporter):
    def step(self, stats):  # type: ignore[no-untyped-def]
        print(format_step(stats), file=sys.stderr, flush=True)

    def evaluated(self, stats):  # type: ignore[no-untyped-def]
        print(format_eval(stats), file=sys.stderr, flush=True)


def eval_subset_loss(folder: Path, root: Path, files: list[str]) -> float:
    """Loss of the model in `folder` (read in float32) on the first EVAL_BLOCKS blocks of
    the given held-out files: the number the test suite recomputes."""
    tokenizer = Tokenizer.from_folder(folder)
    model = GPTNeoForCausalLM.from_pretrained(folder)
    docs = read_documents([root / f for f in files])
    block = model.config.max_position_embeddings
    blocks = pack_blocks(token_stream(docs, tokenizer), block, keep_tail=True)[:EVAL_BLOCKS]
    return evaluate_lm(model, [torch.tensor(b) for b in blocks], batch_size=EVAL_BLOCKS)


def build(output: Path, max_steps: int) -> dict:
    root, files = stdlib_files()
    val_files = files[::VAL_EVERY]
    train_files = [f for f in files if f not in set(val_files)]
    print(
        f"{len(files)} files under {root}: {len(train_files)} train, {len(val_files)} held out",
        file=sys.stderr,
    )
    started = time.perf_counter()

    work = Path(tempfile.mkdtemp(prefix="gptneo-demo-"))
    init = work / "init"
    train_texts = [d.text for d in read_documents([root / f for f in train_files])]
    tokenizer = train_bpe_tokenizer(train_texts, VOCAB_SIZE)
    tokenizer.model_max_length = MODEL["max_position_embeddings"]
    tokenizer.save(init)
    eos = tokenizer.eos_id
    config = GPTNeoConfig(
        vocab_size=tokenizer.vocab_size, bos_token_id=eos, eos_token_id=eos, **MODEL
    )
    config.save(init)
    print(
        f"tokenizer: {tokenizer.vocab_size} ids ({time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
    )

    train = dataclasses.replace(TRAIN, max_steps=max_steps)
    staged = work / "tiny"
    result = finetune(
        init,
        [root / f for f in train_files],
        staged,
        train,
        val_data=[root / f for f in val_files],
        from_scratch=True,
        device="cpu",
        reporter=PrintReporter(),
        save_dtype=torch.float16,
    )
    training = json.loads((staged / "training.json").read_text())
    (staged / "training.json").unlink()

    eval_files = val_files[:EVAL_FILES]
    shipped_model = GPTNeoForCausalLM.from_pretrained(staged)
    shipped_tok = Tokenizer.from_folder(staged)
    val_docs = read_documents([root / f for f in val_files])
    val_blocks = [
        torch.tensor(b)
        for b in pack_blocks(token_stream(val_docs, shipped_tok), train.block_size, keep_tail=True)
    ]
    metadata = {
        "name": "tiny",
        "description": "Demo GPT-Neo trained from scratch on the Python standard library's "
        "source by scripts/build_demo_model.py. For demos and offline tests, "
        "not a substitute for the real checkpoints.",
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seed": SEED,
        "data": {
            "root": "sysconfig.get_paths()['stdlib']",
            "exclude": sorted(EXCLUDE),
            "files": len(files),
            "train_files": len(train_files),
            "val_files": val_files,
            "file_list": files,
            "file_list_sha256": sha256_text("\n".join(files)),
            "content_sha256": _content_hash(root, files),
            "train_tokens": training["train_tokens"],
            "val_tokens": training["val_tokens"],
        },
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)",
            "vocab_size": tokenizer.vocab_size,
            "special": "<|endoftext|> = bos = eos = unk = pad",
        },
        "config": config.to_dict(),
        "parameters": shipped_model.config.num_parameters(),
        "train": training["config"],
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "train_time_s": round(result.train_time_s, 1),
        "build_time_s": round(time.perf_counter() - started, 1),
        "history": training["history"],
        "held_out": {
            "loss_float32": result.best_val_loss,
            "loss_shipped_float16": evaluate_lm(shipped_model, val_blocks, batch_size=16),
            "best_step": result.best_step,
            "tolerance": TOLERANCE,
        },
        "eval_subset": {
            "files": {f: file_sha256(root / f) for f in eval_files},
            "blocks": EVAL_BLOCKS,
            "block_size": train.block_size,
            "loss": eval_subset_loss(staged, root, eval_files),
        },
    }
    for path in staged.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    metadata["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(staged.iterdir())
        if p.is_file()
    }
    (staged / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staged, output)
    shutil.rmtree(work)
    return metadata


def _content_hash(root: Path, files: list[str]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.encode() + b"\0" + (root / f).read_bytes() + b"\0")
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temp folder and compare with the shipped metadata",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=TRAIN.max_steps,
        help="for experiments only: the shipped model uses the default",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch CPU threads (default {THREADS}; see THREADS)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        shipped = json.loads((DEFAULT_OUTPUT / METADATA).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            rebuilt = build(Path(tmp) / "tiny", args.max_steps)
        same_data = rebuilt["data"]["content_sha256"] == shipped["data"]["content_sha256"]
        diff = rebuilt["held_out"]["loss_float32"] - shipped["held_out"]["loss_float32"]
        print(
            json.dumps(
                {
                    "same_data": same_data,
                    "shipped_held_out_loss": shipped["held_out"]["loss_float32"],
                    "rebuilt_held_out_loss": rebuilt["held_out"]["loss_float32"],
                    "difference": diff,
                    "tolerance": TOLERANCE,
                    "rebuild_train_time_s": rebuilt["train_time_s"],
                    "torch_threads": torch.get_num_threads(),
                },
                indent=2,
            )
        )
        if not same_data:
            print(
                "note: this standard library differs from the one the shipped model saw; "
                "the losses are not comparable",
                file=sys.stderr,
            )
            return 0
        return 0 if abs(diff) <= TOLERANCE else 1
    meta = build(args.output, args.max_steps)
    print(
        json.dumps(
            {k: meta[k] for k in ("parameters", "steps", "train_time_s", "held_out")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
