"""Read checkpoint tensors: safetensors (single or sharded) first, pytorch_model.bin otherwise.

Safetensors tensors kept in the file's dtype are memory-mapped, one copy-on-write mapping
per tensor: nothing is read up front, the pages are shared with the OS page cache, and a
tensor that is transformed and dropped (the fast path packs most of them) unmaps its pages.
Tensors whose dtype changes are read with plain file reads straight into their final buffer,
in chunks, converting on the way: mapping the whole file instead would keep the touched
source pages next to the converted copy (a bf16 model from an fp32 file would cost one and a
half files, not half of one). Either way there is no second full copy. A .bin file is read
with `torch.load(weights_only=True)` only: a pickle that is more than tensors is refused.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import re
import struct
import sys
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import WeightsError
from .paths import model_file, name_problem

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"

#: safetensors dtype names -> torch dtypes (the ones a GPT-Neo checkpoint can hold).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: Bytes read per chunk when converting; bounds the extra memory a conversion needs.
CHUNK_BYTES = 16 * 2**20
_MAX_HEADER = 100 * 2**20


def weight_files(folder: Path) -> list[Path]:
    """The files holding the weights in `folder`, safetensors preferred.

    Every file, including each shard an index names, must lie inside `folder` (see
    gptneo_cli.paths); that is checked here, before any of them is opened.
    """
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_BIN_INDEX)):
        if (folder / single).is_file():
            return [_inside(folder, single, single)]
        if (folder / index).is_file():
            return _shards(_inside(folder, index, index))
    raise WeightsError(
        f"no weights in {folder}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}"
    )


def _inside(folder: Path, name: str, source: str) -> Path:
    path, problem = model_file(folder, name)
    if problem is not None:
        raise WeightsError(
            f"{source} names the file {name!r}, which {problem}: a checkpoint may only read "
            f"files inside its own folder ({folder})"
        )
    return path


def stored_names(folder: Path) -> set[str] | None:
    """The tensor names of the checkpoint in `folder`, read from safetensors headers alone;
    None when it is in .bin files (naming their tensors means loading them)."""
    names: set[str] = set()
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            return None
        header, _ = read_safetensors_header(path)
        names.update(header)
    return names


def _shards(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise WeightsError(f"cannot read shard index {index_path}: {exc}") from exc
    if not names:
        raise WeightsError(f"{index_path.name} lists no shards")
    for name in names:  # every name is checked before any shard is opened
        problem = name_problem(name)
        if problem is not None:
            raise WeightsError(
                f"{index_path.name} lists the shard {name!r}, which {problem}: a checkpoint "
                f"may only read files inside its own folder ({index_path.parent})"
            )
    shards = [_inside(index_path.parent, n, index_path.name) for n in names]
    missing = [n for n, path in zip(names, shards, strict=True) if not path.is_file()]
    if missing:
        raise WeightsError(f"{index_path.name} lists missing shard(s): {', '.join(missing)}")
    return shards


class StoredTensor:
    """A safetensors tensor not read yet: its shape, and its rows on demand.

    Lets a consumer that transforms a large tensor row block by row block (int8
    quantization of the 50k-row embedding) never hold it whole in float32.
    """

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: list[int]) -> None:
        self.path, self.offset, self.dtype = path, offset, dtype
        self.shape = torch.Size(shape)

    def read_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of the first dimension, converted to `dtype`."""
        stop = min(stop, self.shape[0])
        row = self.shape[1:].numel() * self.dtype.itemsize
        out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        try:
            with self.path.open("rb", buffering=0) as handle:
                _read_into(handle, self.offset + start * row, _bytes_of(out))
        except OSError as exc:
            raise WeightsError(
                f"{self.path.name} is not a readable safetensors file ({exc})"
            ) from exc
        return out if dtype is None else out.to(dtype)


def iter_tensors(
    files: list[Path],
    dtype: torch.dtype | None = None,
    lazy: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
    """Yield (name, tensor) for every tensor in the checkpoint files, one at a time.

    With `dtype`, floating-point tensors arrive already converted (chunk by chunk for
    safetensors, so no full-size copy in the file's dtype is ever made). Safetensors
    entries whose name satisfies `lazy` arrive as a StoredTensor instead.
    """
    for path in files:
        if path.suffix == ".safetensors":
            yield from _iter_safetensors(path, dtype, lazy)
        else:
            for name, tensor in _load_bin(path).items():
                yield name, _convert(tensor, dtype)


def _convert(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor entries, offset of the data section); checks every entry against the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise ValueError("header length out of range")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    except RecursionError:
        raise WeightsError(
            f"{path.name} is not a readable safetensors file (its header is nested too deeply)"
        ) from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path.name} is not a readable safetensors file (header not a map)")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + length, size - 8 - length
    for name, entry in header.items():
        problem = _entry_problem(entry, data_size)
        if problem:
            raise WeightsError(
                f"{path.name} is not a readable safetensors file ({name}: {problem})"
            )
    return header, data_start


def _entry_problem(entry: object, data_size: int) -> str | None:
    if not isinstance(entry, dict):
        return "entry is not a map"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ST_DTYPES:
        return f"unsupported dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return "bad shape"
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    ):
        return "bad data_offsets"
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= begin <= end <= data_size:
        return "data lies outside the file (truncated?)"
    if end - begin != numel * _ST_DTYPES[dtype].itemsize:
        return "data size does not match shape and dtype"
    return None


def _iter_safetensors(
    path: Path, dtype: torch.dtype | None, lazy: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        yield from _iter_safetensors_library(path, dtype)
        return
    header, data_start = read_safetensors_header(path)
    # File order keeps the reads sequential.
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    try:
        with path.open("rb", buffering=0) as handle:
            scratch: torch.Tensor | None = None
            for name, entry in entries:
                stored = _ST_DTYPES[entry["dtype"]]
                begin = data_start + entry["data_offsets"][0]
                if lazy is not None and entry["shape"] and lazy(name):
                    yield name, StoredTensor(path, begin, stored, entry["shape"])
                    continue
                target = stored if dtype is None or not stored.is_floating_point else dtype
                if target != stored:
                    out = torch.empty(entry["shape"], dtype=target)
                    if scratch is None:
                        scratch = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
                    _read_converting(handle, begin, stored, out, scratch)
                else:
                    out = _map_tensor(handle, begin, stored, entry["shape"])
                    if out is None:  # small, unaligned, or past the mapping budget
                        out = torch.empty(entry["shape"], dtype=stored)
                        _read_into(handle, begin, _bytes_of(out))
                yield name, out
    except OSError as exc:
        raise WeightsError(f"{path.name} is not a readable safetensors file ({exc})") from exc


#: Tensors smaller than this are read, not mapped (a mapping costs a page and a syscall).
MAP_MIN_BYTES = 64 * 2**10
#: Live per-tensor mappings. Before Python 3.13 each one holds a file descriptor.
_LIVE_MAPS = [0]
_MAPS_HOLD_FDS = sys.version_info < (3, 13)  # 3.13 added mmap(trackfd=False)


@functools.lru_cache(maxsize=1)
def _map_budget() -> int:
    """How many tensors may be mapped at once before Python 3.13: a quarter of the process's
    file-descriptor limit (macOS defaults to 256), so loading never starves other opens."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 64
    return 1024 if soft == resource.RLIM_INFINITY else soft // 4


def _may_map() -> bool:
    """Not on Windows: a mapped file cannot be replaced there, and saving a model back to
    the folder it came from renames over its file. Elsewhere, within the descriptor budget."""
    if os.name == "nt":
        return False
    return not _MAPS_HOLD_FDS or _LIVE_MAPS[0] < _map_budget()


def _unmapped() -> None:
    _LIVE_MAPS[0] -= 1


#: Live mappings by the address of the tensor that views them (`release_pages`).
_MAPPINGS: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()


def release_pages(tensor: torch.Tensor, start: int = 0, stop: int | None = None) -> bool:
    """Drop the resident pages of a tensor mapped from a checkpoint file (as `_map_tensor`
    made it), so that it stops counting in the process's memory; what is read again comes
    back from the file. For a matrix that a copy in another layout now serves (the
    embedding under the fast path's panel head: lookups touch a few rows per token). Never
    written to, so nothing is lost. Rows `start:stop` only (the whole pages inside them)
    while a copy is being made: the copied part goes before the rest is read. False where
    the tensor is no such mapping."""
    mapped = _MAPPINGS.get(tensor.data_ptr())
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mapped is None or advice is None:
        return False
    offset = tensor.data_ptr() - ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    row_bytes = tensor.stride(0) * tensor.element_size()
    stop = tensor.shape[0] if stop is None else min(stop, tensor.shape[0])
    # whole pages only: the pages at the edges also hold rows not yet copied
    first = 0 if start == 0 else -(-(offset + start * row_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    last = offset + stop * row_bytes
    last = len(mapped) if stop == tensor.shape[0] else last - last % mmap.PAGESIZE
    if last > first:
        mapped.madvise(advice, first, last - first)
    return True


def _map_tensor(
    handle: BinaryIO, begin: int, dtype: torch.dtype, shape: list[int]
) -> torch.Tensor | None:
    """One tensor's bytes as a copy-on-write memory map (writes stay private to the process),
    or None where mapping does not fit: small tensors, or data not aligned for its dtype."""
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if nbytes < MAP_MIN_BYTES or begin % dtype.itemsize or not _may_map():
        return None
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    no_fd: dict[str, Any] = {} if _MAPS_HOLD_FDS else {"trackfd": False}
    try:
        mapped = mmap.mmap(
            handle.fileno(), begin - start + nbytes, offset=start, access=mmap.ACCESS_COPY, **no_fd
        )
    except (OSError, ValueError):  # a file system that cannot map: read it instead
        return None
    _LIVE_MAPS[0] += 1
    weakref.finalize(mapped, _unmapped)  # when the last tensor viewing it is gone
    # frombuffer keeps `mapped` alive for as long as the tensor (or a view of it) lives.
    flat = torch.frombuffer(
        mapped, dtype=dtype, count=nbytes // dtype.itemsize, offset=begin - start
    )
    _MAPPINGS[flat.data_ptr()] = mapped
    return flat.view(shape)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, no numpy)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _read_into(handle: BinaryIO, offset: int, view: memoryview) -> None:
    handle.seek(offset)
    done, total = 0, len(view)
    while done < total:
        got = handle.readinto(view[done:])
        if not got:
            raise OSError("unexpected end of file")
        done += got


def _read_converting(
    handle: BinaryIO, offset: int, stored: torch.dtype, out: torch.Tensor, scratch: torch.Tensor
) -> None:
    """Read `out.numel()` values of dtype `stored` at `offset` into `out`, chunk by chunk."""
    flat = out.view(-1)
    per_chunk = max(1, scratch.numel() // stored.itemsize)
    buffer = scratch[: per_chunk * stored.itemsize]
    for start in range(0, flat.numel(), per_chunk):
        count = min(per_chunk, flat.numel() - start)
        piece = buffer[: count * stored.itemsize]
        _read_into(handle, offset + start * stored.itemsize, _bytes_of(piece))
        flat[start : start + count].copy_(piece.view(stored))


def _iter_safetensors_library(
    path: Path, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:  # pragma: no cover - big-endian hosts only
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, _convert(handle.get_tensor(name), dtype)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path.name} is not a readable safetensors file ({exc})") from exc


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # torch can memory-map only its zip format; a pre-1.6 (legacy) file is read whole.
    mappable = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch warns about some refused files, then raises
            warnings.simplefilter("ignore")
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mappable)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - random bytes raise KeyError, IndexError, ...
        raise WeightsError(_load_failure(path, exc)) from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise WeightsError(f"{path.name} does not hold a name -> tensor mapping")
    return data


def _load_failure(path: Path, exc: BaseException) -> str:
    """One line for a .bin torch refused. A pickle that asks for a Python object (code may
    run when it is built) says which; anything else is not a checkpoint at all. torch's own
    text (paragraphs, terminal escapes, advice to switch the safety check off) is not shown."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    wanted = re.search(r"GLOBAL ([\w.]+)", text)
    if wanted or "Unsupported global" in text:
        what = wanted.group(1) if wanted else "a Python object"
        return (
            f"{path.name} was refused: it is not a plain tensor checkpoint: its pickle "
            f"asks for {what} (an unsupported global: building it could run code), and "
            "gptneo loads tensors only; use a safetensors copy of the model"
        )
    why = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
    return (
        f"{path.name} is not a readable PyTorch checkpoint: it is corrupt, truncated or "
        f"another kind of file{why}"
    )


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors in the Hub's layout with the safetensors library's own writer.

    safetensors.torch.save_file goes through numpy, which is not a runtime dependency, so
    we hand `serialize_file` each tensor's memory directly (the tensors stay referenced by
    `tensors` until the file is written). The file is written beside `path` and renamed over
    it: tensors memory-mapped from the old file (a model saved back where it was loaded
    from) keep reading the old bytes, and an interrupted save leaves the old file whole.
    """
    from safetensors import TensorSpec, serialize_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    specs = {
        name: TensorSpec(
            dtype=str(t.dtype).removeprefix("torch."),
            shape=list(t.shape),
            data_ptr=t.data_ptr(),
            data_len=t.numel() * t.element_size(),
        )
        for name, t in tensors.items()
    }
    partial = path.with_name(f".{path.name}.partial")
    try:
        serialize_file(specs, str(partial), metadata={"format": "pt"})
        with partial.open("r+b") as written:  # on disk before it takes the old file's name
            os.fsync(written.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
