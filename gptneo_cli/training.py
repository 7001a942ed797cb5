"""Causal-LM training (fine-tuning, or from scratch), and the pieces every trainer shares.

A run reads and splits the data, packs it into blocks, steps AdamW with linear warmup and
cosine decay, evaluates on the held-out split and keeps the best model (by validation loss)
in a Hub-format folder that our loader and transformers both read. Classifier training
(gptneo_cli.classifier_training) reuses the optimizer, schedule, precision and reporting.

Causal-LM runs checkpoint their full state (weights, optimizer, step, data position, RNG) so
that an interrupted run resumes exactly: GPT-Neo has no dropout and the data order is a pure
function of (seed, epoch), so a resumed run on the same machine takes the same steps as one
that was never stopped.

Progress goes to a `Reporter`; the library never prints. The CLI supplies a Rich or a plain
reporter.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import GPTNeoConfig
from .device import resolve_device
from .errors import GPTNeoError
from .modeling import GPTNeoForCausalLM

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
TRAINING_INFO = "training.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
#: Folders skipped when a data folder is walked (caches, VCS metadata, virtualenvs).
SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".venv", "venv", "node_modules"}
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


class TrainingInterrupted(GPTNeoError):
    """Training stopped early (Ctrl-C or a cancel request) after saving a checkpoint."""

    def __init__(self, message: str, checkpoint: Path, step: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


# =====================================================================================
# Reading data
# =====================================================================================


@dataclass
class Document:
    """One training text and where it came from (a file, or file:line for jsonl)."""

    source: str
    text: str


def _read_text(path: Path) -> str | None:
    """A file's text, or None for binary files (NUL bytes or invalid UTF-8)."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def walk_files(folder: Path, suffixes: Sequence[str] | None = None) -> list[Path]:
    """Files under `folder` in a fixed (sorted) order, skipping hidden and cache folders."""
    found = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(p in SKIP_DIRS or p.startswith(".") for p in parts):
            continue
        if path.is_file() and (not suffixes or path.suffix in suffixes):
            found.append(path)
    return found


def read_documents(
    paths: Sequence[str | Path], suffixes: Sequence[str] | None = None
) -> list[Document]:
    """Documents from text files, folders (walked recursively) and jsonl files.

    A `.jsonl` file holds one `{"text": ...}` object per line, each its own document; any
    other file is one document. Binary files inside folders are skipped; a binary file named
    directly is an error. `suffixes` (e.g. [".py"]) filters the files found in folders.
    """
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for file in walk_files(path, suffixes):
                docs.extend(_file_documents(file, strict=False))
        elif path.is_file():
            docs.extend(_file_documents(path, strict=True))
        else:
            raise ValueError(f"data: {raw} does not exist; give text files, folders or .jsonl")
    docs = [d for d in docs if d.text]
    if not docs:
        raise ValueError("data: no text found in " + ", ".join(map(str, paths)))
    return docs


def _file_documents(path: Path, strict: bool) -> list[Document]:
    if path.suffix == ".jsonl":
        return [Document(f"{path}:{n}", row["text"]) for n, row in read_jsonl(path, ("text",))]
    text = _read_text(path)
    if text is None:
        if strict:
            raise ValueError(f"data: {path} is not a UTF-8 text file")
        return []
    return [Document(str(path), text)]


def read_jsonl(
    path: Path, required: Sequence[str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line, checking the required string keys."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data: {path}:{number} is not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"data: {path}:{number} must be a JSON object")
            for key in required:
                if key not in row or row[key] is None:
                    raise ValueError(f"data: {path}:{number} has no {key!r} field")
            if "text" in required and not isinstance(row["text"], str):
                raise ValueError(f"data: {path}:{number}: 'text' must be a string")
            yield number, row


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents (a seeded shuffle picks them), so validation text is unseen.

    With a single document nothing is held out here; `prepare_lm_data` then holds out the
    end of its token stream instead.
    """
    if val_fraction <= 0 or len(docs) < 2:
        return list(docs), []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    held = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val


# =====================================================================================
# Packing
# =====================================================================================


@dataclass
class LMData:
    """Token blocks ready for training.

    train: [N, block_size + 1]; each row gives inputs row[:-1] and targets row[1:], and rows
    overlap by one token so every token of the stream is a target once.
    val: blocks of up to block_size + 1 tokens (the last one may be shorter).
    """

    train: torch.Tensor
    val: list[torch.Tensor]
    block_size: int
    train_documents: int = 0
    val_documents: int = 0

    @property
    def train_tokens(self) -> int:
        return int(self.train.shape[0] * self.block_size)

    @property
    def val_tokens(self) -> int:
        return sum(int(b.numel()) - 1 for b in self.val)

    def fingerprint(self) -> str:
        """A hash of the exact tokens, so a resume can refuse different data."""
        digest = hashlib.sha256()
        for tensor in (self.train, *self.val):
            _hash_tensor(digest, tensor)
        return digest.hexdigest()[:16]


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Feed a CPU tensor's bytes to `digest` without numpy (not a runtime dependency)."""
    data = tensor.detach().cpu().contiguous()
    size = data.numel() * data.element_size()
    if size:
        digest.update((ctypes.c_char * size).from_address(data.data_ptr()))


def token_stream(docs: Sequence[Document], tokenizer: Any) -> list[int]:
    """All documents' ids, each followed by eos so the model learns where texts end."""
    eos = tokenizer.eos_id
    ids: list[int] = []
    texts = [d.text for d in docs]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    encoded = encode_batch(texts) if encode_batch else [tokenizer.encode(t) for t in texts]
    for doc_ids in encoded:
        ids.extend(doc_ids)
        if eos is not None:
            ids.append(eos)
    return ids


def pack_blocks(ids: Sequence[int], block_size: int, keep_tail: bool = False) -> list[list[int]]:
    """Cut a stream into rows of block_size + 1 tokens that overlap by one.

    The tail that does not fill a block is dropped for training and kept (if it has at least
    one target) for validation, so every held-out token counts.
    """
    rows = []
    start = 0
    while start + block_size + 1 <= len(ids):
        rows.append(list(ids[start:start + block_size + 1]))
        start += block_size
    if keep_tail and len(ids) - start >= 2:
        rows.append(list(ids[start:]))
    return rows


def prepare_lm_data(
    docs: Sequence[Document],
    tokenizer: Any,
    block_size: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    val_docs: Sequence[Document] | None = None,
) -> LMData:
    """Split (unless `val_docs` are given), tokenize and pack into blocks."""
    if val_docs is None:
        train_docs, val_list = split_documents(docs, val_fraction, seed)
    else:
        train_docs, val_list = list(docs), list(val_docs)
    train_ids = token_stream(train_docs, tokenizer)
    val_ids = token_stream(val_list, tokenizer) if val_list else []
    if not val_list and val_fraction > 0:
        cut = len(train_ids) - max(2, int(len(train_ids) * val_fraction))
        train_ids, val_ids = train_ids[:cut], train_ids[cut:]
    train_rows = pack_blocks(train_ids, block_size)
    if not train_rows:
        raise ValueError(
            f"block_size: the training text has {len(train_ids)} tokens, fewer than one block "
            f"of {block_size + 1}; give more text or a smaller --block-size"
        )
    return LMData(
        train=torch.tensor(train_rows, dtype=torch.long),
        val=[torch.tensor(r, dtype=torch.long) for r in pack_blocks(val_ids, block_size, True)],
        block_size=block_size,
        train_documents=len(train_docs),
        val_documents=len(val_list),
    )


# =====================================================================================
# Options, schedule, precision
# =====================================================================================


@dataclass
class TrainConfig:
    """Options of a causal-LM run. Invalid values raise ValueError naming the option."""

    block_size: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    """None: 5% of the steps."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr x this at the last step."""
    epochs: int = 1
    max_steps: int | None = None
    """Overrides epochs when given (the data repeats as needed)."""
    max_grad_norm: float = 1.0
    eval_every: int | None = None
    """None: ten evaluations over the run."""
    val_fraction: float = 0.05
    precision: str = "auto"
    seed: int = 0
    log_every: int = 10
    keep_checkpoint: bool = False
    """Keep the resumable checkpoint folder after a run that finished."""

    def validate(self) -> None:
        for name in ("block_size", "batch_size", "grad_accum", "epochs", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables), got {self.max_grad_norm}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warmup from
    1/warmup to 1, then a cosine from 1 down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain float32.

    Weights and optimizer state stay float32 (mixed precision). "auto" picks bf16 on CUDA
    GPUs that have it (else fp16 with loss scaling) and float32 on CPU and MPS, where
    autocast measured slower than float32 on this project's machines.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "float32":
        return None
    if precision == "float16" and device.type == "cpu":
        raise ValueError("precision: float16 autocast needs a CUDA or MPS device; "
                         "use bfloat16 or float32 on CPU")
    if precision == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision: this GPU has no bfloat16; use float16 or float32")
    return torch.bfloat16 if precision == "bfloat16" else torch.float16


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(
    params: Sequence[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95, as in GPT-style recipes) with weight decay on matrices,
    embeddings included, and none on biases and LayerNorm parameters."""
    decay = [p for _, p in params if p.dim() >= 2]
    plain = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """named_parameters() already drops the tied lm_head duplicate; keep trainable ones."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# =====================================================================================
# Progress reporting
# =====================================================================================


@dataclass
class StepStats:
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass
class EvalStats:
    step: int
    loss: float
    accuracy: float | None = None
    best: bool = False

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


class Reporter:
    """Receives progress; every method is a no-op here (subclass what you need)."""

    def start(self, total_steps: int, info: dict[str, Any]) -> None: ...

    def step(self, stats: StepStats) -> None: ...

    def evaluated(self, stats: EvalStats) -> None: ...

    def message(self, text: str) -> None: ...

    def end(self) -> None: ...


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_step(stats: StepStats) -> str:
    """The plain progress line (also used by the CLI off a terminal)."""
    return (f"step {stats.step}/{stats.total_steps}  loss {stats.loss:.4f}  lr {stats.lr:.2e}  "
            f"{stats.tokens_per_s:,.0f} tok/s  elapsed {format_duration(stats.elapsed_s)}  "
            f"eta {format_duration(stats.eta_s)}")


def format_eval(stats: EvalStats) -> str:
    text = f"eval step {stats.step}: val_loss {stats.loss:.4f} (ppl {stats.perplexity:.2f})"
    if stats.accuracy is not None:
        text = f"eval step {stats.step}: val_loss {stats.loss:.4f}  accuracy {stats.accuracy:.4f}"
    return text + ("  best" if stats.best else "")


# =====================================================================================
# Saving
# =====================================================================================


def export_model(
    model: torch.nn.Module,
    folder: Path,
    dtype: torch.dtype | None = None,
    tokenizer_source: Path | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write a Hub-format folder: config.json, model.safetensors and the tokenizer files.

    Tokenizer files are copied from `tokenizer_source` when it has them (byte-identical to
    the base model's), else written from `tokenizer`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = model
    if dtype is not None and dtype != model.dtype:
        target = copy.deepcopy(model).to(dtype)
        target.config = copy.deepcopy(model.config)
    target.config.torch_dtype = str(target.dtype).removeprefix("torch.")
    target.save_pretrained(folder)
    copied = False
    if tokenizer_source is not None and tokenizer_source.resolve() != folder.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_source / name).is_file():
                shutil.copyfile(tokenizer_source / name, folder / name)
                copied = True
    if not copied and tokenizer is not None and not (folder / "tokenizer.json").is_file():
        tokenizer.save(folder)
    return folder


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainerState:
    """Where a run is: enough to resume it exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed."""
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_train_loss: float | None = None
    train_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    state: TrainerState,
    extra: dict[str, Any],
) -> Path:
    """Write model, optimizer, scaler, RNG and trainer state; replaces `folder` atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(),
        },
        tmp / OPTIMIZER_STATE,
    )
    write_json(tmp / TRAINER_STATE, {"state": asdict(state), **extra})
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint folder, with a clear error if it is not one."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file() or not (Path(folder) / OPTIMIZER_STATE).is_file():
        raise GPTNeoError(f"{folder} is not a training checkpoint (no {TRAINER_STATE} or "
                          f"{OPTIMIZER_STATE}); pass the 'checkpoint' folder of an earlier run")
    return json.loads(path.read_text(encoding="utf-8"))


# =====================================================================================
# Causal-LM training
# =====================================================================================


@dataclass
class TrainResult:
    output: Path
    steps: int
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    tokens_seen: int
    train_time_s: float
    history: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def evaluate_lm(
    model: torch.nn.Module,
    blocks: Sequence[torch.Tensor],
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
) -> float:
    """Mean cross-entropy (nats per token) over every target of `blocks`."""
    if not blocks:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    by_length: dict[int, list[torch.Tensor]] = {}
    for block in blocks:
        by_length.setdefault(int(block.numel()), []).append(block)
    with torch.no_grad():
        for group in by_length.values():
            for i in range(0, len(group), batch_size):
                batch = torch.stack(group[i:i + batch_size]).to(device)
                with autocast_context(device, autocast):
                    logits = model(batch[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                                       reduction="sum")
                total += float(loss)
                count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled block order of one epoch: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def train_causal_lm(
    model: GPTNeoForCausalLM,
    data: LMData,
    config: TrainConfig,
    output: str | Path,
    *,
    tokenizer: Any = None,
    tokenizer_source: str | Path | None = None,
    resume_from: str | Path | None = None,
    reporter: Reporter | None = None,
    save_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
    info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` (on its current device) and write the best model to `output`.

    `output/checkpoint/` holds the latest resumable state, written at every evaluation and
    on interruption; pass it as `resume_from` to continue. `should_stop` is polled after each
    optimizer step (tests and UIs use it to interrupt). Ctrl-C saves a checkpoint too; both
    raise TrainingInterrupted naming the checkpoint.
    """
    config.validate()
    reporter = reporter or Reporter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = output / CHECKPOINT_DIR
    device = model.device
    amp = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    if data.block_size > model.config.max_position_embeddings:
        raise ValueError(f"block_size: {data.block_size} exceeds the model's "
                         f"{model.config.max_position_embeddings} positions")

    n_blocks = data.train.shape[0]
    micro_per_epoch = math.ceil(n_blocks / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    warmup = (config.warmup_steps if config.warmup_steps is not None
              else max(1, round(0.05 * total_steps)))
    warmup = min(warmup, total_steps)
    eval_every = config.eval_every or max(1, total_steps // 10)
    fingerprint = data.fingerprint()

    model.train()
    optimizer = build_optimizer(trainable_parameters(model), config.lr, config.weight_decay)
    state = TrainerState()
    if resume_from is not None:
        state = _resume(Path(resume_from), model, optimizer, scaler, fingerprint, device)
    run_info = {
        **(info or {}),
        "train_blocks": n_blocks,
        "train_tokens": data.train_tokens,
        "val_tokens": data.val_tokens,
        "train_documents": data.train_documents,
        "val_documents": data.val_documents,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "eval_every": eval_every,
        "autocast": str(amp).removeprefix("torch.") if amp else "float32",
        "device": str(device),
        "resumed_from_step": state.step if resume_from is not None else None,
    }
    extra = {"config": asdict(config), "fingerprint": fingerprint, "info": run_info}
    tok_source = Path(tokenizer_source) if tokenizer_source is not None else None

    def save_best(val_loss: float) -> bool:
        if state.best_val_loss is not None and val_loss >= state.best_val_loss:
            return False
        state.best_val_loss, state.best_step = val_loss, state.step
        export_model(model, output, save_dtype, tok_source, tokenizer)
        return True

    def evaluate_and_keep() -> None:
        if data.val:
            val_loss = evaluate_lm(model, data.val, config.batch_size, amp)
            best = save_best(val_loss)
            state.history.append({"step": state.step, "val_loss": val_loss,
                                  "train_loss": state.last_train_loss})
            reporter.evaluated(EvalStats(state.step, val_loss, best=best))
        save_checkpoint(checkpoint_dir, model, optimizer, scaler, state, extra)

    reporter.start(total_steps, run_info)
    if data.val and state.step == 0:
        # The starting point, for comparison; it is not a candidate for the best model.
        initial = evaluate_lm(model, data.val, config.batch_size, amp)
        state.history.append({"step": 0, "val_loss": initial, "train_loss": None})
        reporter.evaluated(EvalStats(0, initial))
    first_step = state.step
    window_tokens, window_time = 0, 0.0
    try:
        while state.step < total_steps:
            tick = time.perf_counter()
            micro, epoch, position = _next_batches(data.train, state, config, micro_per_epoch)
            targets = sum(b[:, 1:].numel() for b in micro)
            lr = config.lr * lr_factor(state.step, warmup, total_steps, config.min_lr_ratio)
            step_loss = _optimizer_step(model, optimizer, scaler, micro, targets, lr, amp,
                                        config.max_grad_norm)
            # The step is complete only now: a Ctrl-C before this line leaves `state` at the
            # previous step, which is what the checkpoint then records.
            state.epoch, state.batch_in_epoch = epoch, position
            state.step += 1
            state.tokens_seen += targets
            state.last_train_loss = step_loss
            elapsed = time.perf_counter() - tick
            state.train_time_s += elapsed
            window_tokens += targets
            window_time += elapsed
            if state.step % config.log_every == 0 or state.step in (1, total_steps):
                per_step = state.train_time_s / max(1, state.step - first_step)
                reporter.step(StepStats(
                    state.step, total_steps, state.epoch, step_loss, lr,
                    window_tokens / window_time if window_time > 0 else 0.0,
                    state.train_time_s, per_step * (total_steps - state.step)))
                window_tokens, window_time = 0, 0.0
            if state.step % eval_every == 0 and state.step < total_steps:
                evaluate_and_keep()
            if should_stop is not None and state.step < total_steps and should_stop():
                raise _StopRequested
        evaluate_and_keep()
    except (KeyboardInterrupt, _StopRequested):
        optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is discarded
        save_checkpoint(checkpoint_dir, model, optimizer, scaler, state, extra)
        reporter.end()
        raise TrainingInterrupted(
            f"training stopped at step {state.step}/{total_steps}; continue it with "
            f"--resume {checkpoint_dir}", checkpoint_dir, state.step) from None
    reporter.end()
    if not data.val:  # nothing to choose by: the last model is the result
        export_model(model, output, save_dtype, tok_source, tokenizer)
    result = TrainResult(output, state.step, state.best_val_loss, state.best_step,
                         state.last_train_loss, state.tokens_seen, state.train_time_s,
                         state.history, run_info)
    write_json(output / TRAINING_INFO, {
        "task": "causal-lm",
        "steps": state.step,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "final_train_loss": state.last_train_loss,
        "tokens_seen": state.tokens_seen,
        "train_time_s": round(state.train_time_s, 2),
        "history": state.history,
        "config": asdict(config),
        **run_info,
    })
    if not config.keep_checkpoint and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    return result


class _StopRequested(Exception):
    """`should_stop` asked for a stop; handled like Ctrl-C."""


def _next_batches(
    blocks: torch.Tensor, state: TrainerState, config: TrainConfig, micro_per_epoch: int
) -> tuple[list[torch.Tensor], int, int]:
    """The micro-batches of the next optimizer step and the (epoch, position) after them.

    An optimizer step never spans two epochs, so the last step of an epoch may have fewer
    micro-batches; the order inside an epoch comes from `_epoch_order`.
    """
    epoch, position = state.epoch, state.batch_in_epoch
    if position >= micro_per_epoch:
        epoch, position = epoch + 1, 0
    order = epoch_order(blocks.shape[0], config.seed, epoch)
    micro = []
    while len(micro) < config.grad_accum and position < micro_per_epoch:
        lo = position * config.batch_size
        micro.append(blocks[order[lo:lo + config.batch_size]])
        position += 1
    return micro, epoch, position


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    micro: Sequence[torch.Tensor],
    targets: int,
    lr: float,
    amp: torch.dtype | None,
    max_grad_norm: float,
) -> float:
    """Accumulate the gradients of `micro` (loss = sum over all their targets / targets),
    clip, step; returns the step's mean loss per token."""
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = 0.0
    for batch in micro:
        batch = batch.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                               reduction="sum") / targets
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += float(loss.detach())
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def _resume(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    fingerprint: str,
    device: torch.device,
) -> TrainerState:
    """Load a checkpoint's weights, optimizer, scaler and RNG state into this run."""
    saved = read_checkpoint(folder)
    if saved.get("fingerprint") != fingerprint:
        raise GPTNeoError(f"{folder} was trained on different data (or a different "
                          "--block-size / --val-fraction / --seed): resume with the same data "
                          "and options")
    resumed = GPTNeoForCausalLM.from_pretrained(folder, device=device)
    model.load_state_dict(resumed.state_dict())
    del resumed
    blob = torch.load(folder / OPTIMIZER_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    return TrainerState(**saved["state"])


# =====================================================================================
# Tokenizer training (for models trained from scratch, such as the demo model)
# =====================================================================================


def train_bpe_tokenizer(texts: Sequence[str] | Iterator[str], vocab_size: int,
                        min_frequency: int = 2) -> Any:
    """A GPT-2-style byte-level BPE trained on `texts`, with `<|endoftext|>` as id 0 and as
    bos, eos, unk and pad. Returns our Tokenizer (save it with `.save(folder)`)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from .tokenizer import ENDOFTEXT, Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)


def fresh_model(config: GPTNeoConfig, seed: int,
                device: str | torch.device | None = None) -> GPTNeoForCausalLM:
    """A randomly initialised causal LM (GPT-Neo's N(0, 0.02) init), reproducible by seed."""
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(config)
    return model.to(resolve_device(device) if device is not None else torch.device("cpu"))


# =====================================================================================
# Whole runs from names and files (what the CLI and the demo-model script call)
# =====================================================================================


def finetune(
    model_name: str | Path,
    data: Sequence[str | Path],
    output: str | Path,
    config: TrainConfig,
    *,
    val_data: Sequence[str | Path] | None = None,
    suffixes: Sequence[str] | None = None,
    from_scratch: bool = False,
    device: str | torch.device | None = None,
    revision: str | None = None,
    resume_from: str | Path | None = None,
    reporter: Reporter | None = None,
    save_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune a model (name, alias or folder) on text files, folders or jsonl.

    `from_scratch` ignores any weights and starts from a seeded random init of the folder's
    config.json (the tokenizer still comes from the folder): that is how the demo model is
    made. Weights train in float32 whatever the checkpoint's dtype; see `autocast_dtype`.
    """
    from .hub import resolve_model_dir
    from .tokenizer import Tokenizer

    config.validate()
    if resume_from is not None:
        read_checkpoint(Path(resume_from))  # fail before any heavy work
    folder = resolve_model_dir(model_name, revision=revision)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.eos_id is None:
        raise GPTNeoError(f"the tokenizer of {model_name} has no eos token to separate documents")
    dev = resolve_device(device)
    autocast_dtype(config.precision, dev)  # reject e.g. float16 on CPU before loading
    docs = read_documents(data, suffixes)
    val_docs = read_documents(val_data, suffixes) if val_data else None
    lm_data = prepare_lm_data(docs, tokenizer, config.block_size, config.val_fraction,
                              config.seed, val_docs)
    if from_scratch:
        model = fresh_model(GPTNeoConfig.from_json_file(folder), config.seed, dev)
    else:
        model = GPTNeoForCausalLM.from_pretrained(folder, device=dev)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GPTNeoError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size} embeddings")
    info = {"base_model": str(model_name), "from_scratch": from_scratch,
            "parameters": sum(p.numel() for p in model.parameters())}
    return train_causal_lm(model, lm_data, config, output, tokenizer=tokenizer,
                           tokenizer_source=folder, resume_from=resume_from, reporter=reporter,
                           save_dtype=save_dtype, should_stop=should_stop, info=info)
