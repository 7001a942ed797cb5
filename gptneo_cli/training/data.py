"""Reading training text: files, folders (walked in a fixed order) and jsonl, split into
training and held-out documents. Pure Python: no torch, no tokenizer."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

#: Folders skipped when a data folder is walked (caches, VCS metadata, virtualenvs).
SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".venv", "venv", "node_modules"}
T = TypeVar("T")


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
        elif path.exists():  # a FIFO or a device: reading it could block or never end
            raise ValueError(
                f"data: {raw} is not a regular file; give text files, folders or .jsonl"
            )
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


def read_jsonl(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line, checking the required string keys."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data: {path}:{number} is not valid JSON ({exc.msg})") from exc
            except RecursionError:
                raise ValueError(f"data: {path}:{number} is JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise ValueError(f"data: {path}:{number} must be a JSON object")
            for key in required:
                if key not in row or row[key] is None:
                    raise ValueError(f"data: {path}:{number} has no {key!r} field")
            if "text" in required and not isinstance(row["text"], str):
                raise ValueError(f"data: {path}:{number}: 'text' must be a string")
            yield number, row


def hold_out(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded share of `items` held out (at least one, never all); nothing below two."""
    if val_fraction <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: min(len(items) - 1, max(1, round(len(items) * val_fraction)))])
    return (
        [x for i, x in enumerate(items) if i not in held],
        [x for i, x in enumerate(items) if i in held],
    )


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents (a seeded shuffle picks them), so validation text is unseen.

    With a single document nothing is held out here; `prepare_lm_data` then holds out the
    end of its token stream instead.
    """
    return hold_out(docs, val_fraction, seed)
