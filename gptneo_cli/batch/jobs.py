"""The files of a batch job: reading requests lazily, checking ids with bounded memory,
finding what a previous run finished, and appending results crash-safely.

Input lines are OpenAI Batch API requests (`custom_id`, `method`, `url`, `body`), or the
shorthands: a `.txt` file (one prompt a line) or `{"prompt": ...}` lines; shorthand lines
get the custom_id `line-N` (N counts from 1, blank lines included). Output lines are
OpenAI Batch output records. Nothing here imports torch.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

URLS = ("/v1/completions", "/v1/chat/completions", "/v1/classify")


class BatchInputError(ValueError):
    """The input or output file cannot be used at all (a ValueError: the CLI exits 2)."""


@dataclass
class Item:
    """One input line: a request to run, or the reason it cannot run (`error`)."""

    line: int
    custom_id: str
    url: str = "/v1/completions"
    body: dict[str, Any] | None = None
    error: str | None = None


def line_id(line: int) -> str:
    return f"line-{line}"


def parse_line(text: str, line: int, *, plain: bool) -> Item | None:
    """The request of one input line (None for a blank line). Never raises: a bad line
    becomes an Item with `error` set."""
    if plain:
        prompt = text.rstrip("\r\n")
        if not prompt.strip():
            return None
        return Item(line, line_id(line), body={"prompt": prompt})
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return Item(line, line_id(line), error=f"line {line}: not valid JSON ({exc.msg})")
    if not isinstance(record, dict):
        return Item(line, line_id(line), error=f"line {line}: not a JSON object")
    return _parse_record(record, line)


def _parse_record(record: dict[str, Any], line: int) -> Item:
    """A JSON object line: the Batch API request shape, or the `{"prompt": ...}` shorthand."""
    if "custom_id" not in record:
        if "prompt" in record:  # the shorthand: the line is the completion body
            return Item(line, line_id(line), body=record)
        return Item(
            line,
            line_id(line),
            error=f'line {line}: needs "custom_id", "url" and "body" (or "prompt")',
        )
    custom_id = record["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return Item(line, line_id(line), error=f"line {line}: custom_id must be a non-empty string")
    method = record.get("method", "POST")
    url = record.get("url")
    body = record.get("body")
    if method != "POST":
        return Item(line, custom_id, error=f"line {line}: method must be POST, got {method!r}")
    if url not in URLS:
        return Item(
            line, custom_id, error=f"line {line}: url must be one of {', '.join(URLS)}, got {url!r}"
        )
    if not isinstance(body, dict):
        return Item(line, custom_id, url=url, error=f"line {line}: body must be a JSON object")
    return Item(line, custom_id, url=url, body=body)


def _id_of(text: str, line: int, plain: bool) -> str | None:
    """Just the custom_id of a line (the first pass), or None for a blank line."""
    item = parse_line(text, line, plain=plain)
    return None if item is None else item.custom_id


def id_hash(custom_id: str) -> int:
    """64 bits of BLAKE2b: what the duplicate check and the resume set keep per id."""
    return int.from_bytes(
        hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little", signed=True
    )


class BatchInput:
    """An input file read line by line, as often as needed (stdin is spooled to a
    temporary file first, so it can be read twice without holding it in memory)."""

    def __init__(self, source: str | Path, *, stdin: IO[str] | None = None) -> None:
        self._spool: str | None = None
        if str(source) == "-":
            stream = stdin or sys.stdin
            fd, self._spool = tempfile.mkstemp(prefix="gptneo-batch-", suffix=".jsonl")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                shutil.copyfileobj(stream, out)
            self.path = Path(self._spool)
            self.name = "stdin"
        else:
            self.path = Path(source)
            self.name = str(source)
            if not self.path.is_file():
                raise BatchInputError(f"no such input file: {source}")
        self.plain = self._is_plain(str(source))

    def _is_plain(self, source: str) -> bool:
        if source != "-":
            return self.path.suffix.lower() == ".txt"
        with self._open() as f:  # stdin: text unless the first non-blank line is JSON
            for text in f:
                if text.strip():
                    return not text.lstrip().startswith("{")
        return False

    def _open(self) -> IO[str]:
        try:
            return open(self.path, encoding="utf-8", newline="")
        except OSError as exc:
            raise BatchInputError(f"cannot read {self.name}: {exc.strerror or exc}") from None

    def lines(self) -> Iterator[tuple[int, str]]:
        """(line number from 1, text) lazily; undecodable bytes are replaced."""
        try:
            with open(self.path, encoding="utf-8", errors="replace", newline="") as f:
                yield from enumerate(f, 1)
        except OSError as exc:
            raise BatchInputError(f"cannot read {self.name}: {exc.strerror or exc}") from None

    def items(self) -> Iterator[Item]:
        for number, text in self.lines():
            item = parse_line(text, number, plain=self.plain)
            if item is not None:
                yield item

    def check_ids(self) -> int:
        """Count the requests; raise BatchInputError on a duplicate custom_id.

        Memory: 8 bytes per line (a 64-bit hash in an array) plus the same again while
        sorting; a hash seen twice is confirmed on the strings in a second pass, so a
        hash collision is never reported as a duplicate.
        """
        hashes = array("q")
        for number, text in self.lines():
            custom_id = _id_of(text, number, self.plain)
            if custom_id is not None:
                hashes.append(id_hash(custom_id))
        twice = _repeated(hashes)
        if twice:
            seen: dict[str, int] = {}
            for number, text in self.lines():
                custom_id = _id_of(text, number, self.plain)
                if custom_id is None or id_hash(custom_id) not in twice:
                    continue
                if custom_id in seen:
                    raise BatchInputError(
                        f"{self.name}: custom_id {custom_id!r} appears twice (lines "
                        f"{seen[custom_id]} and {number}); custom_ids must be unique"
                    )
                seen[custom_id] = number
        return len(hashes)

    def close(self) -> None:
        if self._spool is not None:
            with _quiet():
                os.unlink(self._spool)
            self._spool = None

    def __enter__(self) -> BatchInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *rest: object) -> bool:
        return kind is not None and issubclass(kind, OSError)


def _sorted(hashes: array) -> array:
    """The hashes sorted in place (torch sorts the array's own buffer: no list of Python
    ints, which would take ~36 bytes per line instead of 8)."""
    if len(hashes) > 1:
        import torch

        view = torch.frombuffer(hashes, dtype=torch.int64)
        view.copy_(view.sort().values)
    return hashes


def _repeated(hashes: array) -> set[int]:
    ordered = _sorted(hashes)
    return {ordered[i] for i in range(1, len(ordered)) if ordered[i] == ordered[i - 1]}


class DoneSet:
    """The custom_ids a previous run wrote, as sorted 64-bit hashes (8 bytes each)."""

    def __init__(self, hashes: array) -> None:
        self._hashes = _sorted(hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, custom_id: object) -> bool:
        if not isinstance(custom_id, str):
            return False
        key = id_hash(custom_id)
        at = bisect.bisect_left(self._hashes, key)
        return at < len(self._hashes) and self._hashes[at] == key


@dataclass
class Previous:
    """What the output file already holds."""

    done: DoneSet
    failed: int
    torn: bool  # a torn last line was cut off (it will be redone)


def scan_output(path: Path) -> Previous:
    """Read a previous run's output: the ids it finished; cut a torn last line.

    A run killed mid-write can leave a last line without its newline or cut inside its
    JSON: that line is removed, so its request runs again. Any other line that is not a
    batch output record means the file is not ours: an error, not a guess.
    """
    hashes = array("q")
    failed = 0
    torn = False
    if not path.exists():
        return Previous(DoneSet(hashes), 0, False)
    try:
        f = open(path, "rb+")
    except OSError as exc:
        raise BatchInputError(f"cannot open {path}: {exc.strerror or exc}") from None
    with f:
        good_end = 0
        number = 0
        while True:
            raw = f.readline()
            if not raw:
                break
            number += 1
            record = _record(raw) if raw.endswith(b"\n") else None
            if record is None:
                if f.read(1):  # not the last line: the file is damaged or not ours
                    raise BatchInputError(
                        f"{path} line {number} is not a batch output record: fix the file "
                        "or start over with --restart"
                    )
                torn = True
                break
            hashes.append(id_hash(record["custom_id"]))
            if record.get("error") is not None:
                failed += 1
            good_end = f.tell()
        if torn:
            f.truncate(good_end)
    return Previous(DoneSet(hashes), failed, torn)


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        return None
    return record


def result_record(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Batch output line. A failed request (status >= 400) also sets `error`."""
    error = None
    if status >= 400:
        detail = body.get("error", {}) if isinstance(body, dict) else {}
        error = {
            "code": detail.get("code") or detail.get("type") or "request_failed",
            "message": detail.get("message", "the request failed"),
        }
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": error,
    }


def bad_line_record(item: Item) -> dict[str, Any]:
    """The output line of an input line that is not a usable request."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": item.custom_id,
        "response": None,
        "error": {"code": "invalid_request", "message": item.error, "line": item.line},
    }


class OutputWriter:
    """Appends records, one whole line per write, flushed at once and fsynced at least every
    `sync_every` seconds: SIGKILL loses nothing written, a power cut at most that long."""

    def __init__(self, path: Path, *, sync_every: float = 1.0) -> None:
        try:
            self._f = open(path, "ab")
        except OSError as exc:
            raise BatchInputError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.sync_every = sync_every
        self._synced = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False).encode() + b"\n"
        self._f.write(line)
        self._f.flush()
        if time.monotonic() - self._synced >= self.sync_every:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._f.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
