"""Our one C file (csrc/gemv.c): matrix products at memory speed, built on first use.

Why we wrote kernels: batch-1 decoding is one activation row times every weight matrix, so
its speed is the speed of reading the weights. None of torch's CPU kernels reaches memory
speed for that shape (measured per matrix in docs/PERFORMANCE.md: oneDNN's float32 product
30-48 GB/s, MKL's 17-25, the weight-only int8 kernel ~30, on a machine whose memory streams
77 GB/s); our row kernels reach 58-72 GB/s there. The panel kernels (a repacked copy) read
faster still and serve any number of rows: a batched step or a verify costs about what
one row costs, and prompts ran 1.1-1.4x oneDNN's float32 GEMM. `decode_step` runs a whole
decoded token of a panel-held model in one call (gptneo_cli/step.py says why).

How it ships: the C source is package data. The first load on a machine compiles it with the
system C compiler (`$CC`, else `cc`/`gcc`; under a second) into the user cache dir
(`$XDG_CACHE_HOME/gptneo/native/`, keyed by a hash of the source, the flags and the
compiler), and later loads only open that file. It needs an x86-64 CPU with AVX-512 and a
compiler; without either, or with `GPTNEO_NATIVE=0`, nothing is built and the fast path
uses torch's kernels as before. A build that fails, or a library whose products disagree
with torch's on a check matrix, is not used either (a one-line warning on the log).

The loops run on OpenMP threads: the library links the same OpenMP runtime torch loaded (it
is already in the process, so its thread pool is shared), with torch's thread count.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .kernels import cpu_flags
from .settings import user_cache_dir

log = logging.getLogger("gptneo")

ENV = "GPTNEO_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-fPIC")
#: Names of OpenMP runtimes torch may have loaded (GNU, LLVM, Intel).
OPENMP_NAMES = ("libgomp", "libomp", "libiomp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")

_F32 = ctypes.c_void_p
_ARGS_F32 = [_F32, _F32, _F32, _F32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
_ARGS_GEMM = [_F32] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]


_I64 = ctypes.c_int64
#: decode_step(layers, count, keys, values, capacity, x, rows, new, pos (one per row), heads,
#: dim, inner, eps, lnf_w, lnf_b, scratch, threads, prompt, head, logits, embed, ids, at):
#: pointers are passed as integers.
_ARGS_STEP = [_F32, _I64, *[_F32] * 4, _I64, _I64, _F32, *[_I64] * 3, ctypes.c_float]
_ARGS_STEP += [*[_F32] * 3, ctypes.c_int, ctypes.c_int, _F32, _F32, _F32, _F32, _I64]


class Mat(ctypes.Structure):
    """csrc/gemv.c's Mat: one matrix of the decode step, as panels."""

    _fields_ = [
        ("panels", _F32),
        ("scale", _F32),
        ("bias", _F32),
        ("colsum", _F32),
        ("m", _I64),
        ("n", _I64),
        ("inputs", _I64),
        ("kind", _I64),
    ]


class Layer(ctypes.Structure):
    """csrc/gemv.c's Layer: one block of the decode step."""

    _fields_ = [
        ("ln1_w", _F32),
        ("ln1_b", _F32),
        ("ln2_w", _F32),
        ("ln2_b", _F32),
        ("qkv", Mat),
        ("out", Mat),
        ("fc", Mat),
        ("proj", Mat),
        ("window", _I64),
    ]


class Embed(ctypes.Structure):
    """csrc/gemv.c's Embed: the decode step's token embedding (the tied head's panels) and
    float32 position embeddings."""

    _fields_ = [
        ("panels", _F32),
        ("scale", _F32),
        ("kind", _I64),
        ("vocab", _I64),
        ("wpe", _F32),
        ("places", _I64),
    ]


#: Mat.kind of each panel dtype (int32: bf16 pairs).
STEP_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int32: 2, torch.int8: 3}


def disabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


def cpu_supported() -> bool:
    """x86-64 with the AVX-512 subsets the loops use (from /proc/cpuinfo's flags)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return cpu_flags().issuperset(CPU_FLAGS)


def compiler(environ: Mapping[str, str] = os.environ) -> str | None:
    name = environ.get("CC", "").strip()
    if name:
        return shutil.which(name)
    return shutil.which("cc") or shutil.which("gcc")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be used (module docstring). Cached for
    the process: one build or load, one check."""
    if disabled() or not cpu_supported():
        return None
    cc = compiler()
    if cc is None:
        return None
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("native kernels unavailable (%s); using torch's", str(exc).splitlines()[0])
        return None
    lib.gemv_f32.argtypes, lib.gemv_f32.restype = _ARGS_F32, None
    lib.gemv_bf16.argtypes, lib.gemv_bf16.restype = _ARGS_F32, None
    for name in _PANEL_KERNELS.values():
        function = getattr(lib, name)
        function.argtypes, function.restype = _ARGS_GEMM, None
    lib.panels_quads.argtypes = [_F32] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.panels_quads.restype = ctypes.c_int
    lib.step_scratch.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int]
    lib.step_scratch.restype = ctypes.c_int64
    lib.decode_step.argtypes, lib.decode_step.restype = _ARGS_STEP, ctypes.c_int
    lib.panel_rows_f32.argtypes = [_F32, ctypes.c_int, ctypes.c_int64, _F32, ctypes.c_int64, _F32]
    lib.panel_rows_f32.restype = None
    if lib.panel_width() != PANEL or not _agrees(lib):
        log.warning("native kernels disagree with torch's on a check matrix; using torch's")
        return None
    return lib


def available() -> bool:
    return library() is not None


def status() -> str:
    """One line for `gptneo info`, without building anything."""
    if disabled():
        return f"off ({ENV}=0)"
    if not cpu_supported():
        return "unavailable (needs an x86-64 CPU with AVX-512)"
    cc = compiler()
    if cc is None:
        return "unavailable (no C compiler: set CC or install gcc)"
    try:
        built = _library_path(cc).is_file()
    except OSError as exc:  # the C source is missing from this installation
        return f"unavailable ({exc.strerror or exc})"
    if built:
        return "built"
    return f"not built yet (built with {Path(cc).name} at the first model load)"


def _library_path(cc: str) -> Path:
    """Where the library built from SOURCE with `cc`, FLAGS and the OpenMP runtime lives
    (the key is a hash)."""
    key = " ".join((cc, *FLAGS, *_link_openmp()))
    digest = hashlib.sha256(SOURCE.read_bytes() + key.encode()).hexdigest()
    return user_cache_dir() / "native" / f"gemv-{digest[:16]}.so"


@functools.cache
def _link_openmp() -> tuple[str, ...]:
    """Link against the OpenMP runtime torch loaded (found in /proc/self/maps), so that the
    kernels share its thread pool: wheels may ship it under another name than the system's
    libgomp.so.1, and two runtimes would each keep spinning threads on the same cores.
    The compiler's own runtime (-fopenmp) where none is found."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ("-fopenmp",)
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if Path(path).name.startswith(OPENMP_NAMES) and Path(path).is_file():
            return (path, f"-Wl,-rpath,{Path(path).parent}")
    return ()


def _build(cc: str) -> Path:
    """Compile SOURCE once per (source, flags, compiler) into the user cache dir."""
    path = _library_path(cc)
    if path.is_file():
        return path
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".gemv-", suffix=".so")
    os.close(fd)
    try:
        objects = f"{tmp}.o"
        for step in (
            [cc, *FLAGS, "-c", str(SOURCE), "-o", objects],
            [cc, "-shared", objects, *_link_openmp(), "-o", tmp],
        ):
            subprocess.run(step, check=True, capture_output=True, timeout=120)
        os.replace(tmp, path)  # whole or not at all, also with concurrent first loads
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip() or f"exit {exc.returncode}"
        raise OSError(f"{Path(cc).name} failed: {detail}") from None
    finally:
        for leftover in (tmp, f"{tmp}.o"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return path


def _agrees(lib: ctypes.CDLL) -> bool:
    """The library's products match torch's on a small matrix with a ragged width."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(21, 37, generator=gen)
    x = torch.randn(1, 37, generator=gen)
    b = torch.randn(21, generator=gen)
    q = torch.randint(-127, 128, (21, 37), generator=gen, dtype=torch.int8)
    s = torch.rand(21, generator=gen)
    wb = w.bfloat16()
    got_f32 = _call_f32(lib, x, w, b)
    got_bf16 = _call_f32(lib, x, wb, b, lib.gemv_bf16)
    xs = torch.randn(11, 37, generator=gen)  # a whole block of 8 rows and 3 more
    exact = torch.addmm(b, xs, w.t())
    cases = [
        (pack_panels(w), xs, None, exact),
        (pack_panels(wb), xs, None, torch.addmm(b, xs, wb.float().t())),
    ]
    if pairs_supported():
        xb = xs.bfloat16()
        cases.append((_pack_pairs(wb), xb, None, torch.addmm(b, xb.float(), wb.float().t())))
    panels_agree = all(
        torch.allclose(_call_panels(lib, x, packed, 21, s, b), want, atol=1e-3)
        for packed, x, s, want in cases
    )
    if quads_supported():
        quads, sums = pack_quads(q), quad_sums(q)
        for rows in (xs, xs[:1]):  # float32 FMAs, the digits
            want = (rows @ q.float().t()) * s + b
            got = _call_panels(lib, rows, quads, 21, s, b, colsum=sums)
            panels_agree = panels_agree and torch.allclose(got, want, atol=1e-3)
        if pairs_supported():
            want = (xs.bfloat16().float() @ q.float().t()) * s + b
            got = _call_panels(lib, xs, quads, 21, s, b, True, sums)
            panels_agree = panels_agree and torch.allclose(got, want, atol=1e-3)
    return (
        panels_agree
        and torch.allclose(got_f32, torch.addmm(b, x, w.t()), atol=1e-4)
        and torch.allclose(got_bf16, torch.addmm(b, x, wb.float().t()), atol=1e-4)
    )


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _call_f32(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    function: Any = None,
) -> torch.Tensor:
    """gemv_f32, or `function` (gemv_bf16) with the same arguments."""
    y = torch.empty(1, w.shape[0], dtype=torch.float32)
    threads = torch.get_num_threads()
    call = function or lib.gemv_f32
    call(w.data_ptr(), x.data_ptr(), _ptr(bias), y.data_ptr(), *w.shape, threads)
    return y


def gemv_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[1, n] float32 x times a contiguous float32 [m, n] weight (+ bias [m]) -> [1, m].
    The caller checks `available()` and the dtypes; x is made contiguous here."""
    lib = library()
    assert lib is not None
    return _call_f32(lib, x.contiguous(), weight, bias)


#: The weight dtypes `gemv` (the row kernels) takes.
DTYPES = (torch.float32, torch.bfloat16)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One row times a float32 or bf16 weight (+ bias): float32 [1, m]."""
    if weight.dtype == torch.bfloat16:
        return gemv_bf16(x, weight, bias)
    return gemv_f32(x, weight, bias)


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[1, n] x times a contiguous bf16 [m, n] weight (+ bias [m]), in float32 -> [1, m]
    float32; x and bias are converted to float32 here."""
    lib = library()
    assert lib is not None
    x32 = x.float().contiguous()
    bias32 = None if bias is None else bias.float()
    return _call_f32(lib, x32, weight, bias32, lib.gemv_bf16)


#: Outputs per panel in the panel layout (csrc/gemv.c's PANEL; the library is checked).
PANEL = 48

#: A transparent huge page (x86-64 Linux), and madvise's advice asking for them.
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
#: GPTNEO_HUGE_PAGES=1 holds panels in huge pages, 0 never; unset: HUGE_PAGES_DEFAULT.
HUGE_ENV = "GPTNEO_HUGE_PAGES"
#: Off for one-shot commands, on where the model stays loaded (serve, batch, chat: the CLI's
#: load_model). Decode gains up to 1.2x, but on a VM the first touch of fresh 2 MiB pages
#: can cost ~1 s per 500 MB at load (docs/PERFORMANCE.md): a 100-token `generate` loses.
HUGE_PAGES_DEFAULT = False


def huge_pages(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `huge_empty` asks for huge pages (HUGE_ENV, else HUGE_PAGES_DEFAULT)."""
    value = environ.get(HUGE_ENV, "").strip().lower()
    if value in ("1", "on", "yes", "true"):
        return True
    if value in ("0", "off", "no", "false"):
        return False
    return HUGE_PAGES_DEFAULT


def huge_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for weights that every token streams: on Linux CPUs where
    `huge_pages()` says so, in memory madvise(MADV_HUGEPAGE)d before its first touch, so
    that the kernel backs it with 2 MiB pages where transparent huge pages are on
    ("madvise", the common default, or "always"). In 4 KiB pages the stream needs a page
    walk every 4 KiB (two levels of them in a VM): a plain read of a model's panels ran
    ~18 % slower than of a fresh buffer, and decode gained up to 1.2x with huge pages
    (docs/PERFORMANCE.md). Inside `huge_arena()` (a model's load) tensors under
    HugeArena.CHUNK share chunks, so that the many matrices under 2 MiB (int8's) get huge
    pages too; otherwise each tensor of 2 MiB or more starts at a 2 MiB boundary. Small
    tensors, other devices and systems get torch.empty."""
    nbytes = math.prod(shape) * dtype.itemsize
    arena = _ARENA.get()
    usable = device.type == "cpu" and sys.platform.startswith("linux") and huge_pages()
    if usable and arena is not None and 0 < nbytes < HugeArena.CHUNK:
        region = arena.take(nbytes)
    elif usable and nbytes >= HUGE_PAGE:
        region = huge_region(nbytes)
    else:
        return torch.empty(shape, dtype=dtype, device=device)
    return region.view(dtype).view(shape)


class HugeArena:
    """Chunks of CHUNK bytes in huge-page-advised memory that tensors are carved from, one
    after another at 4 KiB boundaries (one model's panels: they live and die together; a
    chunk's memory goes when its last tensor does). Untouched room costs nothing, beyond
    the one huge page the last tensor ends in."""

    CHUNK = 32 << 20

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None
        self._used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """uint8 room for `nbytes` (under CHUNK)."""
        if self._chunk is None or self._used + nbytes > self.CHUNK:
            self._chunk, self._used = huge_region(self.CHUNK), 0
        region = self._chunk[self._used : self._used + nbytes]
        self._used += -(-nbytes // 4096) * 4096
        return region


_ARENA: contextvars.ContextVar[HugeArena | None] = contextvars.ContextVar("arena", default=None)


@contextlib.contextmanager
def huge_arena(arena: HugeArena | None) -> Iterator[None]:
    """`huge_empty` carves from `arena` inside (None: every tensor on its own, as for the
    kernel measurement's throwaway candidates)."""
    token = _ARENA.set(arena)
    try:
        yield
    finally:
        _ARENA.reset(token)


def huge_region(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] from a 2 MiB boundary, advised to be huge pages (untouched so far),
    whatever `huge_pages()` says (`huge_empty` asks it; benchmarks/ceiling.py does not)."""
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched: no pages yet
    start = -raw.data_ptr() % HUGE_PAGE
    region = raw[start : start + nbytes]
    # The advice may fail (THP off, an old kernel): the pages then stay small.
    _libc().madvise(ctypes.c_void_p(region.data_ptr()), ctypes.c_size_t(nbytes), MADV_HUGEPAGE)
    return region


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def pack_panels(
    weight: torch.Tensor, copied: Callable[[int], object] | None = None
) -> torch.Tensor:
    """A [m, n] matrix (float32, bf16 or int8) as csrc/gemv.c's column panels:
    [ceil(m / PANEL), n, PANEL] with panel[b, i, j] = weight[b * PANEL + j, i], zeros past m.
    One copy of the matrix, written panel by panel (no padded temporary). `copied(rows)`
    hears how many leading rows are done after each stretch (to drop their source pages)."""
    m, n = weight.shape
    whole, tail = divmod(m, PANEL)
    out = huge_empty((whole + (tail > 0), n, PANEL), weight.dtype, weight.device)
    stretch = max(1, 2**23 // max(1, n * PANEL * weight.element_size()))  # ~8 MiB at a time
    for b in range(0, whole, stretch):
        end = min(whole, b + stretch)
        rows = weight[b * PANEL : end * PANEL].view(end - b, PANEL, n)
        out[b:end].copy_(rows.transpose(1, 2))
        if copied is not None:
            copied(end * PANEL)
    if tail:
        out[whole].zero_()
        out[whole, :, :tail].copy_(weight[whole * PANEL :].t())
    return out


#: The panel kernel for each panel dtype (int32: bf16 pairs; int8 quads: panels_quads).
_PANEL_KERNELS = {
    torch.float32: "panels_f32",
    torch.bfloat16: "panels_bf16",
    torch.int32: "panels_pairs",
}


def quads_supported() -> bool:
    """int8 matrices as quads (csrc/gemv.c): the one-row loop needs AVX512-VNNI."""
    return {"avx512_vnni", "avx512dq"} <= cpu_flags()


def pack_quads(weight: torch.Tensor) -> torch.Tensor:
    """An int8 [m, n] matrix as csrc/gemv.c's quads: [ceil(m / PANEL), ceil(n / 4), PANEL, 4]
    with quads[b, q, j, t] = weight[b * PANEL + j, 4q + t], zeros past m and n."""
    m, n = weight.shape
    count, n4 = -(-m // PANEL), -(-n // 4)
    out = huge_empty((count, n4, PANEL, 4), torch.int8, weight.device).zero_()
    for b in range(count):  # panel by panel: no padded copy of the whole matrix
        block = weight[b * PANEL : (b + 1) * PANEL]
        padded = torch.zeros(PANEL, n4 * 4, dtype=torch.int8, device=weight.device)
        padded[: block.shape[0], :n] = block
        out[b].copy_(padded.view(PANEL, n4, 4).transpose(0, 1))
    return out


def quad_sums(weight: torch.Tensor) -> torch.Tensor:
    """int32 [m]: each output's sum of its int8 weights (the digits' offset correction).
    Summed in row blocks: a whole-matrix sum widens every weight to int32 first (4x the
    matrix: 147 MiB for the 125M embedding, the largest transient of an int8 load)."""
    sums = torch.empty(weight.shape[0], dtype=torch.int32, device=weight.device)
    step = max(1, 2**20 // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        sums[start : start + step] = weight[start : start + step].sum(dim=1, dtype=torch.int32)
    return sums


def _call_panels(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    panels: torch.Tensor,
    out_features: int,
    scales: torch.Tensor | None,
    bias: torch.Tensor | None,
    bf16_activations: bool = False,
    colsum: torch.Tensor | None = None,
) -> torch.Tensor:
    rows, n = x.shape[0], panels.shape[1]
    threads = torch.get_num_threads()
    if panels.dtype == torch.int8:  # quads: the width is x's
        assert scales is not None and colsum is not None
        x = x.float().contiguous()
        y = torch.empty(rows, out_features, dtype=torch.float32)
        pairs = bf16_activations and pairs_supported()
        args = (panels.data_ptr(), x.data_ptr(), scales.data_ptr(), _ptr(bias), colsum.data_ptr())
        if lib.panels_quads(*args, y.data_ptr(), out_features, x.shape[1], rows, pairs, threads):
            raise MemoryError("panels_quads: no memory for a panel's buffer")
        return y
    if panels.dtype == torch.int32:  # x as bf16 pairs (zero-padded to even)
        x = _even(x.to(torch.bfloat16)).view(torch.int32)
    else:
        x = x.float().contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    args = (panels.data_ptr(), x.data_ptr(), _ptr(scales), _ptr(bias), y.data_ptr())
    function = getattr(lib, _PANEL_KERNELS[panels.dtype])
    function(*args, out_features, n, rows, threads)
    return y


def pairs_supported() -> bool:
    """bf16 panels as pairs for the AVX512-BF16 dot-product kernel (csrc/gemv.c)."""
    return "avx512_bf16" in cpu_flags()


def _even(matrix: torch.Tensor) -> torch.Tensor:
    """A contiguous copy or view of `matrix` with a zero column appended if its width is odd."""
    if matrix.shape[-1] % 2:
        matrix = torch.nn.functional.pad(matrix, (0, 1))
    return matrix.contiguous()


def _pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 [m, n] matrix as panels of adjacent input pairs (int32 words of two bf16)."""
    return pack_panels(_even(weight).view(torch.int32))


def panel_weights(
    weight: torch.Tensor, copied: Callable[[int], object] | None = None
) -> torch.Tensor:
    """The panels our kernels read for a float32, bf16 or int8 matrix: bf16 as pairs for the
    dot-product kernel where the CPU has it (twice the FMA kernel's rate on prompts), int8
    as quads (`pack_quads`; the caller checks `quads_supported`). `copied`: `pack_panels`'s
    (float32 and plain bf16 panels)."""
    if weight.dtype == torch.int8:
        return pack_quads(weight)
    if weight.dtype == torch.bfloat16 and pairs_supported():
        return _pack_pairs(weight)
    return pack_panels(weight, copied)


def panel_rows(
    packed: torch.Tensor,
    index: torch.Tensor,
    width: int,
    dtype: torch.dtype | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Rows `index` (any shape) of the [rows, width] matrix held as `packed` (`panel_weights`'s
    float32 or bf16 panels, bf16 pairs, int8 quads) -> [*index.shape, width] in `dtype`
    (default: the matrix's own): a tied embedding's lookups read the head's panels, so the
    matrix is held once. An index outside [0, rows) (default: every panel column, padding
    included) is nn.Embedding's IndexError. Row r is column r % PANEL of panel r // PANEL,
    every PANEL-th element: the native library reads such a row with its cache misses
    overlapped (csrc/gemv.c panel_rows_f32), torch's indexing where it is not available."""
    flat = index.reshape(-1)
    if flat.numel():
        low, high = torch.aminmax(flat)
        if low < 0 or high >= (packed.shape[0] * PANEL if rows is None else rows):
            raise IndexError("index out of range in self")
    own = torch.bfloat16 if packed.dtype == torch.int32 else packed.dtype
    height = {torch.int32: (width + 1) // 2, torch.int8: (width + 3) // 4}.get(packed.dtype, width)
    usable = packed.device.type == "cpu" and packed.is_contiguous() and packed.shape[1] == height
    lib = library() if usable and flat.numel() else None
    if lib is not None:
        ids = flat.to(torch.int64).contiguous()
        got = torch.empty(ids.numel(), width, dtype=torch.float32)
        kind = STEP_KINDS[packed.dtype]
        lib.panel_rows_f32(
            packed.data_ptr(), kind, width, ids.data_ptr(), ids.numel(), got.data_ptr()
        )
    else:
        block, column = flat // PANEL, flat % PANEL
        if packed.dim() == 4:  # quads [b, q, j, t] = W[b * PANEL + j, 4q + t]
            got = packed[block, :, column, :].reshape(flat.shape[0], -1)
        else:
            got = packed[block, :, column]
            if packed.dtype == torch.int32:  # bf16 pairs: the words hold the row's bf16 in order
                got = got.contiguous().view(torch.bfloat16)
        got = got[:, :width]
    return got.to(dtype or own).reshape(*index.shape, width)


def panels(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bf16_activations: bool = False,
    colsum: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [rows, n] times the matrix held as `packed` panels (`panel_weights`: float32, bf16,
    bf16 pairs, or int8 quads with float32 `scales` per output and `colsum`, `quad_sums`),
    + float32 `bias` -> float32 [rows, out_features]. Sums are float32 (int8 quads: exact
    integer sums for one row); x is converted here (to float32, or for bf16 pairs to bf16:
    the dot-product kernel multiplies bf16 pairs). `bf16_activations`: int8 quads may run
    the dot-product kernel too (x rounded to bf16; where the CPU has it), twice as fast
    for a prompt's rows."""
    lib = library()
    assert lib is not None
    if x.shape[0] == 0:
        return x.new_empty(0, out_features, dtype=torch.float32)
    return _call_panels(lib, x, packed, out_features, scales, bias, bf16_activations, colsum)
