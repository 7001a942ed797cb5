"""The fast path for causal LMs: the same model with faster linear layers, int8, compile.

`FastCausalLM` is `GPTNeoForCausalLM` (modeling.py) with its linear layers swapped, while
the checkpoint is read, for modules that hold their weights in the layout that runs fastest
on the device, in the spirit of gpt-fast's WeightOnlyInt8Linear swap. The embedding, the
blocks, the attention dispatch, the final norm and the forward are the reference's own code.

What changes, and why (numbers in docs/PERFORMANCE.md):
- q, k and v become one fused [3h, h] matrix (`qkv_proj`): one product instead of three.
- On CPU, each matrix shape gets the layout that ran fastest on this machine, measured at
  first load and cached (gptneo_cli.kernels): prepacked for oneDNN (`PackedLinear`), plain
  rows through F.linear, or transposed (`ColumnLinear`). Measured so far: bf16 F.linear on a
  plain matrix reorders it on every call (packed: ~1.5x as fast); float32 F.linear goes to
  MKL, 2.2-2.4x slower than oneDNN on AMD EPYC but fast on Intel. Where packing is
  unavailable, float32 matrices are stored transposed. Elsewhere (CUDA, MPS) they stay
  nn.Linear.
- The lm_head is the embedding matrix itself (never copied), see `TiedHead`.
- `quantize="int8"`: weight-only int8 with one scale per output channel (`Int8Linear`),
  computed from the checkpoint while it is read (no full-precision copy is kept). The tied
  embedding / lm_head is quantized too (`Int8Embedding`): it is 38.6M of gpt-neo-125M's
  125M parameters. Activations, LayerNorms, attention and the KV cache keep the model dtype.
  `quantize="int8-dynamic"` also rounds activations to 8 bits (faster on CPU, less exact).
- `compile=True`: torch.compile of the one-token decode step (see `compile_decode`), which
  runs the same model body with a static-shape cache (`StaticStepCache`).

`optimize_for_inference` turns a loaded reference model into a fast one and consumes it
(its weights move over, to the meta device) so memory is not held twice.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .attention import AttentionPlan
from .cache import KVCache
from .checkpoint import frozen
from .device import cpu_has_fast_bf16
from .errors import BackendError, GPTNeoError
from .kernels import DEFAULT as DEFAULT_LAYOUT
from .kernels import STEP_MARGIN, KernelChooser, cpu_flags
from .modeling import (
    AttentionStep,
    GPTNeoAttention,
    GPTNeoBlock,
    GPTNeoForCausalLM,
    GPTNeoMLP,
    GPTNeoOutput,
    GPTNeoSelfAttention,
)
from .weights import StoredTensor, iter_tensors, release_pages

QUANTIZE_CHOICES = ("none", "int8", "int8-dynamic")


# ---- linear layers: how a matrix is held and multiplied ------------------------------------


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ W.T + b through oneDNN: W prepacked (PackedLinear) or a plain [out, in] matrix,
    which oneDNN reads in place for float32."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _optional(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else frozen(tensor)


class FastLinear(nn.Module):
    """y = x @ W.T + b, with W held in some layout; subclasses say which."""

    #: Bytes held outside parameters (packed library objects), for `weight_bytes`.
    extra_bytes = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Straight to `forward`: these modules are inference-only and never hooked, and
        nn.Module's call machinery (hook checks, tracing state) costs about a microsecond
        for each of the ~50 products of every decoded token. For the same reason forward
        methods read their tensors from `self._parameters` (one dict lookup) rather than
        through nn.Module.__getattr__."""
        return self.forward(x)


class FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm called straight into torch's kernel (inference-only, never hooked): the
    module and functional wrappers cost more than the kernel itself for one decoded row,
    25 times a token for gpt-neo-125M. The fast path swaps it in for every LayerNorm."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _direct_call(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` with calls going straight to its forward, for the same reason as FastLinear's
    (each decoded token calls these modules 4 times per block)."""
    doc = f"{cls.__name__} called straight into forward (fast path, inference only)."
    return type(f"Direct{cls.__name__}", (cls,), {"__call__": cls.forward, "__doc__": doc})


#: The model's own modules that the fast path calls directly (same parameters and forward).
_DIRECT_CALL = {
    cls: _direct_call(cls) for cls in (GPTNeoBlock, GPTNeoAttention, GPTNeoSelfAttention, GPTNeoMLP)
}


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """nn.Linear around existing tensors, [out, in] as in checkpoints (CUDA, MPS)."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = frozen(weight)
    linear.bias = _optional(bias)
    return linear


class TiedHead(FastLinear):
    """The lm_head: the token embedding matrix itself, [vocab, hidden], never copied.

    float32 on x86-64 CPUs reads it in place through oneDNN (`onednn`). Otherwise which
    product is faster depends on rows and dtype (measured on CPU, 2 threads): for fp32 with
    MKL, W @ x.T beats x @ W.T by ~25 % at 8 rows; for bf16 it wins slightly at one row only.
    A packed (oneDNN) copy would be ~1.6x faster in bf16 but costs a second embedding-sized
    copy (+32 % of a bf16 125M model), so the head stays unpacked.
    """

    def __init__(self, weight: nn.Parameter, onednn: bool = False, native: bool = False) -> None:
        super().__init__()
        self.weight = weight  # the embedding's own parameter
        #: One row (a decode step) through our own kernel (gptneo_cli/native.py).
        self.native = native
        #: fp32 on CPU: oneDNN reads the plain [vocab, hidden] matrix in place, 2.6x faster
        #: than MKL's product on an AMD EPYC (3.4 vs 9.0 ms per token for gpt-neo-125M).
        self.onednn = onednn
        fp32 = weight.dtype == torch.float32
        self.column_rows = (lambda rows: rows > 1) if fp32 else (lambda rows: rows == 1)
        if weight.device.type != "cpu":
            self.column_rows = lambda rows: False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight = self._parameters["weight"]
        rows = flat.shape[0]
        if self.native and rows == 1:
            out = native.gemv(flat, weight, None).to(flat.dtype)
        elif self.onednn:
            out = onednn_linear(flat, weight)
        elif self.column_rows(flat.shape[0]):
            out = torch.mm(weight, flat.t()).t()
        else:
            out = F.linear(flat, weight)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class ColumnLinear(FastLinear):
    """W transposed, [in, out] contiguous: MKL's float32 products run faster on this layout
    (the CPU float32 fallback where oneDNN packing is unavailable, and for --compile)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_t = frozen(weight.t().contiguous())
        self.bias = _optional(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        params = self._parameters
        bias = params.get("bias")
        if bias is None:
            out = torch.mm(flat, params["weight_t"])
        else:
            out = torch.addmm(bias, flat, params["weight_t"])
        return out.view(*x.shape[:-1], out.shape[-1])


class NativeLinear(FastLinear):
    """W (float32 or bf16) as the checkpoint's plain [out, in] rows: one row (a decode step)
    runs our own row kernel (gptneo_cli/native.py; float32 1.1-1.7x oneDNN's one-row
    product, measured per shape), more rows run oneDNN reading the same matrix in place (no
    second copy; for bf16 oneDNN reorders it per call, which the measurement weighs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = frozen(weight.contiguous())
        self.bias = _optional(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        params = self._parameters
        weight, bias = params["weight"], params.get("bias")
        rows = flat.shape[0]
        if rows == 1:
            out = native.gemv(flat, weight, bias).to(flat.dtype)
        else:
            out = onednn_linear(flat, weight, bias)
        return out.view(*x.shape[:-1], out.shape[-1])


class PanelLinear(FastLinear):
    """W repacked into column panels (`native.panel_weights`, a copy) and multiplied by our
    panel kernels at every row count, float32 sums (csrc/gemv.c).

    For float32 it beat both our row kernel and oneDNN on every gpt-neo-125M matrix
    measured: one row 1.2-1.3x the row kernel, 8 rows (a batched step, a verify) about the
    cost of one, 32-512 rows (prompts) 1.1-1.4x oneDNN (docs/PERFORMANCE.md). bf16 runs as
    pairs through AVX512-BF16 dot products where the CPU has them (prompts 0.96-1.4x
    oneDNN's bf16 GEMM), else float32 FMAs. As the tied head its panels are the embedding
    matrix's one copy: lookups read them (PanelEmbedding)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        copied: Callable[[int], object] | None = None,
    ) -> None:
        super().__init__()
        self.panels = frozen(native.panel_weights(weight.detach(), copied))
        self.bias = _optional(None if bias is None else bias.float())
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        params = self._parameters
        out = native.panels(flat, params["panels"], self.out_features, None, params.get("bias"))
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class PackedLinear(FastLinear):
    """W reordered once into oneDNN's blocked layout (CPU: float32, bf16, fp16).

    F.linear on a plain bf16 matrix makes oneDNN reorder the weight on every call; the
    prepacked one skips that. For float32 it replaces MKL, which is much slower on AMD CPUs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = frozen(torch.ops.mkldnn._reorder_linear_weight(weight, 1))
        self.bias = _optional(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        return onednn_linear(x, params["packed"], params.get("bias"))


class PackedHead(PackedLinear):
    """A bf16/fp16 lm_head as a oneDNN-packed copy of the embedding matrix (the embedding
    keeps its own plain rows for lookups). It costs a second embedding-sized matrix (+77 MB
    for gpt-neo-125M in bf16) and reads it about 3x as fast for one row as TiedHead's
    products, which made the head more than a third of a bf16 decode step
    (docs/PERFORMANCE.md); the kernel measurement chooses it only where it wins."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight.detach(), None)


class Int8Linear(FastLinear):
    """int8 W [out, in] with a float scale per output row; inputs run in `act_dtype`.

    For a few rows (decoding) torch._weight_int8pack_mm does the product without ever
    materialising a float W. For many rows (a prefill) the product dominates and that kernel
    is slow, so the int8 matrix is converted for the call, the float GEMM runs on it and the
    scales multiply the output columns (`gemm_dtype`: bf16 on CPUs with native bf16, where
    it ran 2.5-3.5x the float32 dequantize-and-multiply at 64-512 rows; int8 values are
    exact in bf16, so only the output is rounded, as the int8 kernel's is). The same happens
    where the kernel is missing (older torch, some devices) or cannot take the shape (its
    CPU kernel reads garbage unless the input width is a multiple of 16).

    `panels` (CPU, where our kernels are built and measured faster): the matrix is held as
    panels only and runs our panel kernels at every row count: below PANEL_BF16_ROWS tokens
    a sequence (decode steps, verifies, however many rows a batch has) in float32,
    exact to float32 rounding (no bf16 activations or output), 1.4-1.8x the int8 kernel at
    1-8 rows; from PANEL_BF16_ROWS rows (a prompt) with bf16 activations through AVX512-BF16
    dot products where the CPU has them, as fast as the bf16 GEMM on converted rows, with no
    rows kept.
    """

    #: From this many rows on, dequantize + float GEMM beats the int8 kernel (measured).
    DEQUANT_ROWS = 64
    #: Panels: from this many rows on (more than a decode step's), bf16 activations through
    #: the dot-product kernel: 1.4x the float32 products at 17-24 rows, 1.6x at 32 (the
    #: four matrices of gpt-neo-125M, 2 threads, AMD EPYC); as the 64+ rows of a prompt,
    #: only the activations are rounded.
    PANEL_BF16_ROWS = 17

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        act_dtype: torch.dtype,
        panels: bool = False,
    ) -> None:
        super().__init__()
        #: Products through our panel kernel (class docstring).
        self.panels = panels and qweight.device.type == "cpu" and native.quads_supported()
        if self.panels:
            self.qpanels = frozen(native.pack_quads(qweight))
            self.colsum = frozen(native.quad_sums(qweight))
        else:
            self.qweight = frozen(qweight)
        self.out_features, self.in_features = qweight.shape
        self.scales = frozen(scales.to(act_dtype))
        #: The scales in float32, for exact products (the panel kernel, Int8Head's refine).
        self.scales32 = frozen(scales.float())
        self.bias = _optional(bias)
        self.act_dtype = act_dtype
        self.packed = qweight.shape[1] % 16 == 0 and _int8pack_works(qweight.device, act_dtype)
        cpu = qweight.device.type == "cpu"
        fast_bf16 = act_dtype == torch.bfloat16 and cpu_has_fast_bf16()
        #: The many-rows product's dtype (class docstring).
        self.gemm_dtype = act_dtype if not cpu or fast_bf16 else torch.float32
        self.onednn = (
            self.gemm_dtype == torch.float32 and cpu and _mkldnn_packing_works(torch.float32)
        )

    def prompt_rows(self, x: torch.Tensor) -> bool:
        """Whether the panels take `x` [..., tokens, hidden] as a prompt's (bf16 activations):
        PANEL_BF16_ROWS tokens of a sequence or more. A batch of decode steps is not a
        prompt, however many rows it has."""
        return x.dim() > 1 and self.prompt_tokens(x.shape[-2])

    @classmethod
    def prompt_tokens(cls, tokens: int) -> bool:
        """`prompt_rows` for `tokens` new tokens a sequence (the native step asks too)."""
        return tokens >= cls.PANEL_BF16_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        params = self._parameters
        scales, bias = params["scales"], params.get("bias")
        if self.panels:
            qpanels, scales32 = params["qpanels"], params["scales32"]
            # a prompt's rows: bf16 activations, as the float GEMM below would round them
            prompt = self.prompt_rows(x)
            out = native.panels(
                flat, qpanels, self.out_features, scales32, None, prompt, params["colsum"]
            )
        elif self.packed and flat.shape[0] < self.DEQUANT_ROWS:
            out = torch._weight_int8pack_mm(flat.to(self.act_dtype), params["qweight"], scales)
        else:
            qweight = params["qweight"]
            gemm = self.gemm_dtype
            product = onednn_linear if self.onednn else F.linear
            out = product(flat.to(gemm), qweight.to(gemm)) * scales.to(gemm)
        out = out.to(dtype)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])


class Int8Head(Int8Linear):
    """The weight-only int8 lm_head (over the int8 embedding rows), whose largest logits are
    recomputed in float32.

    Its product runs with bf16 activations and output on CPU, which rounds a logit of 16 to
    steps of 0.125: enough to swap near-tied tokens. So the `REFINE` largest logits of each
    row are computed again from the same int8 rows in the model's float dtype: the choice of
    greedy decoding, and the top of a sampled distribution, are what a float output gives.
    Measured on the demo model (teacher-forced Python source), top-1 agreement with float32
    went from 97.8 % to 98.7 % on the decode path (tests/test_fast_paths.py).
    """

    REFINE = 8

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        act_dtype: torch.dtype,
        panels: bool = False,
    ) -> None:
        # With panels, the embedding reads its rows from them (PanelEmbedding) and so does
        # the refine; without, the int8 rows are shared with an Int8Embedding.
        super().__init__(qweight, scales, None, act_dtype, panels)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """int8 rows `index` of the matrix, from wherever it is held."""
        params = self._parameters
        if "qweight" in params:
            return params["qweight"][index]
        return native.panel_rows(params["qpanels"], index, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.act_dtype == x.dtype and self.gemm_dtype == x.dtype:
            return out  # nothing was rounded
        if self.panels and not self.prompt_rows(x) and x.dtype == torch.float32:
            return out  # float32 rows through the panel kernel: float32 products and output
        flat = out.reshape(-1, out.shape[-1])
        top = flat.topk(min(self.REFINE, flat.shape[-1]), dim=-1).indices  # [rows, R]
        rows = self.rows(top).to(x.dtype)  # [rows, R, in]
        exact = torch.bmm(rows, x.reshape(-1, x.shape[-1], 1)).squeeze(-1)
        exact = exact * self._parameters["scales32"][top].to(x.dtype)
        return flat.scatter(-1, top, exact).view(out.shape)


class DynamicInt8Linear(FastLinear):
    """W8A8: int8 W per output row (fbgemm-packed) and activations quantized to uint8 on
    every call, one scale per call (`quantize="int8-dynamic"`, CPU only).

    Not weight-only: the activation rounding costs some accuracy (measured in
    docs/PERFORMANCE.md), in exchange for integer dot products (VNNI), about twice as fast
    as the weight-only kernel here.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        reduce_range: bool,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():  # the quantized-tensor constructors are deprecated
            warnings.simplefilter("ignore")
            zeros = torch.zeros(scales.shape[0], dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zeros, 0)
            float_bias = None if bias is None else bias.float()
            self.packed = torch.ops.quantized.linear_prepack(qw, float_bias)
        self.bias = _optional(bias)  # kept for accounting; the packed object adds it
        self.reduce_range = reduce_range
        self.extra_bytes = qweight.numel() + 8 * scales.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        out = torch.ops.quantized.linear_dynamic(flat, self.packed, self.reduce_range)
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


class PanelEmbedding(nn.Module):
    """The token embedding read back from the tied head's panels (`native.panel_rows`): the
    [vocab, hidden] matrix is held once, in the head's layout, instead of once per layout
    (74 MiB saved for a bf16 gpt-neo-125M, 37 MiB for int8). A lookup reads every PANEL-th
    element, a few hundred cache lines per token. int8 quads come with a scale per row."""

    def __init__(
        self,
        panels: nn.Parameter,
        shape: tuple[int, int],
        dtype: torch.dtype,
        scales: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.panels = panels  # the head's own parameter, shared
        (self.rows, self.width), self.dtype = shape, dtype
        self.scales = None if scales is None else frozen(scales.to(dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # The panels are padded to whole panels, and a negative index would wrap: panel_rows
        # refuses both (bounded by our rows) as nn.Embedding does, rather than return a
        # padding row or another token's.
        panels = self._parameters["panels"]
        rows = native.panel_rows(panels, ids, self.width, self.dtype, self.rows)
        if self.scales is None:
            return rows
        return rows * F.embedding(ids, self.scales[:, None])


class Int8Embedding(nn.Module):
    """The token embedding as int8 rows and a scale per row (shared with the int8 head where
    it keeps rows: no panels)."""

    def __init__(self, qweight: nn.Parameter, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight = qweight
        self.scales = frozen(scales.to(dtype))
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).to(self.dtype)
        return rows * F.embedding(ids, self.scales[:, None])


def _mkldnn_packing_works(dtype: torch.dtype) -> bool:
    """oneDNN weight prepacking on this build and CPU, checked once on a tiny matrix.

    float32 only on x86-64 (oneDNN measured 2.1-2.4x faster than MKL on an AMD EPYC; not
    measured on Intel, where MKL is fast, see docs/PERFORMANCE.md); elsewhere (ARM builds
    link other BLAS libraries) float32 keeps the transposed MKL/BLAS layout.
    """
    key = ("mkldnn", dtype)
    if dtype == torch.float32 and platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if key not in _PROBES:
        try:
            w = torch.arange(64, dtype=torch.float32).view(4, 16).to(dtype)
            x = torch.ones(1, 16, dtype=dtype)
            got = PackedLinear(w, None)(x)
            _PROBES[key] = bool(torch.equal(got, F.linear(x, w)))
        except (RuntimeError, AttributeError, NotImplementedError):
            _PROBES[key] = False
    return _PROBES[key]


def _cpu_has_vnni() -> bool:
    """Integer dot-product instructions: without them fbgemm's uint8 x int8 sums can
    saturate, so activations must use 7 bits (reduce_range)."""
    return not cpu_flags().isdisjoint(("avx512_vnni", "avx_vnni", "amx_int8"))


def dynamic_int8_available() -> bool:
    key = ("fbgemm", torch.float32)
    if key not in _PROBES:
        try:
            q = torch.ones(4, 16, dtype=torch.int8)
            dense = DynamicInt8Linear(q, torch.full((4,), 0.5), None, True)
            got = dense(torch.ones(1, 16))
            _PROBES[key] = bool(torch.allclose(got, torch.full((1, 4), 8.0), rtol=0.05))
        except (RuntimeError, AttributeError, NotImplementedError):
            _PROBES[key] = False
    return _PROBES[key]


_PROBES: dict[tuple[str, torch.dtype], bool] = {}


def _int8pack_works(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _PROBES:
        try:
            w = torch.ones(8, 32, dtype=torch.int8, device=device)
            out = torch._weight_int8pack_mm(
                torch.ones(1, 32, dtype=dtype, device=device),
                w,
                torch.ones(8, dtype=dtype, device=device),
            )
            _PROBES[key] = bool(torch.allclose(out.float().cpu(), torch.full((1, 8), 32.0)))
        except (RuntimeError, AttributeError, NotImplementedError):
            _PROBES[key] = False
    return _PROBES[key]


def quantize_rows(weight: torch.Tensor | StoredTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 values, float32 scales) with W ~= q * scale[:, None].

    Rows are done in blocks, read straight from the file for a StoredTensor, so a large
    matrix (the 50k-row embedding) never needs a full float copy.
    """
    rows = weight.shape[0]
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    q = torch.empty(weight.shape, dtype=torch.int8, device=device)
    scales = torch.empty(rows, dtype=torch.float32, device=device)
    step = max(1, (4 * 2**20) // max(1, weight.shape[1]))
    for start in range(0, rows, step):
        if isinstance(weight, StoredTensor):
            part = weight.read_rows(start, start + step, torch.float32)
        else:
            part = weight[start : start + step].float()
        scale = part.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        rounded = torch.round(part / scale[:, None]).clamp_(-127, 127)
        q[start : start + step] = rounded.to(torch.int8)
        scales[start : start + step] = scale
    return q, scales


# ---- the model -----------------------------------------------------------------------------


class FastCausalLM(GPTNeoForCausalLM):
    """GPTNeoForCausalLM for inference, its linear layers swapped for faster ones.

    Build it with `FastCausalLM.from_pretrained(folder, quantize=..., compile=...)` (streams
    the checkpoint straight into the fast layout), `gptneo_cli.load(name)`, or
    `optimize_for_inference(model)`. It cannot be trained or saved.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.quantize: str | None = None
        self.compiled = False
        self._dtype, self._device = torch.float32, torch.device("cpu")
        self._step: Any = None
        #: The native decode step (gptneo_cli/step.py): None until the first decode step
        #: builds it, False where the model cannot run it.
        self._native: Any = None

    # ---- what callers look at -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, KV cache); int8 weights report it too."""
        return self._dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """float32 for a bf16/fp16 model on CPU: torch's CPU attention kernel ran a decode
        step (one query per row) 3.5-8x faster over float32 keys and values than over bf16
        ones, batched steps too (docs/PERFORMANCE.md), for twice the cache's memory; the
        model's dtype elsewhere."""
        low = self._dtype in (torch.bfloat16, torch.float16)
        return torch.float32 if low and self._device.type == "cpu" else self._dtype

    def new_cache(self, batch_size: int, max_length: int, spare: int = 0) -> KVCache:
        kwargs = dict(dtype=self.cache_dtype, device=self.device, spare=spare)
        if not (self.compiled and batch_size == 1):
            return KVCache(self.config, batch_size, max_length, **kwargs)
        # Static shapes: a few capacities only.
        bucket = -(-max_length // COMPILE_BUCKET) * COMPILE_BUCKET
        max_length = min(bucket, self.config.max_position_embeddings)
        cache = KVCache(self.config, 1, max_length, **kwargs)
        if self.device.type == "cuda":
            # The CUDA graph writes the cache in place: its buffers must be static inputs
            # (else inductor skips the graph for "mutated inputs"). No guard: a new cache
            # re-records the graph instead of recompiling the step.
            for buffer in (*cache.keys, *cache.values):
                torch._dynamo.mark_static_address(buffer, guard=False)
        return cache

    def weight_bytes(self) -> int:
        """Bytes held by the weights (what a decode step reads, plus wpe)."""
        extra = sum(getattr(m, "extra_bytes", 0) for m in self.modules())
        return extra + sum(p.numel() * p.element_size() for p in self.parameters())

    def tie_weights(self) -> None:
        """The skeleton ties like the reference; once loaded, the fast head is built on the
        embedding's own tensors and there is nothing left to tie."""
        if type(self.lm_head) is nn.Linear:
            super().tie_weights()

    def save_pretrained(self, folder: str | Path) -> Path:
        raise GPTNeoError(
            "a fast (packed/quantized) model cannot be saved: save the reference "
            "GPTNeoForCausalLM loaded without optimization"
        )

    # ---- loading ------------------------------------------------------------------------
    def _load(
        self,
        files: list[Path],
        device: torch.device,
        dtype: torch.dtype,
        source: str,
        *,
        quantize: str | None,
        compile: bool,
    ) -> None:
        """Read the checkpoint straight into the fast layout, one tensor at a time."""
        quantize = check_quantize(quantize)
        packer = _Packer(self, device, dtype, quantize, compile, from_file=True)
        # int8 quantizes from the file's precision; the embedding is read row block by row
        # block, so loading never holds it whole in float32.
        read_dtype = None if quantize else dtype
        lazy = (lambda name: name.endswith("wte.weight")) if quantize else None
        with native.huge_arena(native.HugeArena()):  # the panels share huge pages
            self.match_checkpoint(iter_tensors(files, read_dtype, lazy), packer.add, source)
            packer.finish()
        if compile:
            self.compile_decode()

    # ---- forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
    ) -> GPTNeoOutput:
        """GPTNeoForCausalLM.forward; once compiled, one unpadded token after a prefill
        (batch 1) goes through the compiled step instead; otherwise a few unpadded tokens
        per row (decode steps, verifies) go through the native step where the model has one
        (step.py)."""
        if self._step is None and cache is not None and not output_hidden_states:
            native_step = self._native_step()
            if native_step and native_step.ready(input_ids, attention_mask, position_ids, cache):
                if native_step.runs_head(input_ids.shape[1]):
                    logits = native_step(input_ids, cache, logits=True)
                    return GPTNeoOutput(logits=logits, cache=cache)
                hidden = native_step(input_ids, cache)
                if logits_to_keep:
                    hidden = hidden[:, -logits_to_keep:]
                logits = self.lm_head(hidden.to(self._dtype))
                return GPTNeoOutput(logits=logits, cache=cache)
        if (
            self._step is not None
            and cache is not None
            and cache.length > 0
            and tuple(input_ids.shape) == (1, 1)
            and not output_hidden_states
        ):
            _, key_valid, position_ids = self.transformer.prepare_inputs(
                self.config, input_ids, attention_mask, position_ids, cache
            )
            if key_valid is None:
                cuda = self.device.type == "cuda"
                if cuda:  # a new graph replay: the previous step's outputs were consumed
                    torch.compiler.cudagraph_mark_step_begin()
                with _freezing():
                    logits = self._step(
                        input_ids, position_ids.view(1, 1), cache.keys, cache.values
                    )
                if cuda:  # the graph's output buffer is overwritten by the next replay
                    logits = logits.clone()
                cache.advance(1)
                return GPTNeoOutput(logits=logits, cache=cache)
            # Padding: the eager forward below records the same padding again (idempotent).
        return super().forward(
            input_ids, attention_mask, position_ids, cache, logits_to_keep, output_hidden_states
        )

    def _native_step(self) -> Any:
        if self._native is None:
            from . import step

            built = not step.disabled() and step.NativeStep.build(self)
            self.__dict__["_native"] = built or False
        return self._native

    # ---- compile --------------------------------------------------------------------------
    def compile_decode(self) -> None:
        """torch.compile the one-token decode step (batch 1, no padding) with static shapes.

        Static shapes need a fixed cache size, so while compiled, `new_cache` rounds the
        capacity up to a multiple of COMPILE_BUCKET: one compilation serves every prompt
        length in a bucket. Prefill and batches stay eager. The first decode step of each
        bucket pays the compilation (tens of seconds on a small CPU). On CPU inductor's
        "freezing" turns the weights into constants it prepacks for oneDNN/MKL (a second copy
        of the layer weights); on CUDA the step is captured as a CUDA graph.
        """
        options = {} if self.device.type == "cpu" else {"triton.cudagraphs": True}
        step = torch.compile(_DecodeStep(self), dynamic=False, fullgraph=True, options=options)
        # Not registered as a submodule: it holds this model, which would make a cycle.
        self.__dict__["_step"] = step
        self.compiled = True

    def _static_step(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """Decode one token at position `pos` ([1, 1]): the model body (`run`) over whole
        cache buffers, slots not yet written masked out, and on a local layer whose ring is
        larger than the window (speculative decoding) the slots outside the window too."""
        cache = StaticStepCache(keys, values, pos.view(1))
        plans: dict[str, AttentionPlan] = {}
        for index, kind in enumerate(self.config.attention_layers):
            if kind not in plans:
                window = self.config.window_size if kind == "local" else None
                mask = cache.visible(index, window)
                plans[kind] = AttentionPlan(mask, causal=False, window=None)
        x = self.transformer.run(ids, pos, AttentionStep(plans, "sdpa", cache))
        return self.lm_head(x)


COMPILE_BUCKET = 256


class StaticStepCache:
    """The compiled step's view of a KVCache: whole buffers, written at a tensor position,
    so the traced graph has the same shapes at every step."""

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], step: torch.Tensor
    ) -> None:
        self.keys, self.values, self.step = keys, values, step

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        slot = torch.remainder(self.step, keys.shape[2])
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        return keys, values

    def visible(self, layer: int, window: int | None = None) -> torch.Tensor:
        """bool [1, 1, 1, capacity]: the slots of `layer` written so far (this step's too)
        whose step is inside `window` (None: any step). Slot s holds the step
        pos - (pos - s) % capacity; a negative one was never written."""
        capacity = self.keys[layer].shape[2]
        slots = torch.arange(capacity, device=self.step.device)
        held = self.step - torch.remainder(self.step - slots, capacity)
        seen = held >= 0
        if window is not None and window < capacity:
            seen = seen & (held > self.step - window)
        return seen.view(1, 1, 1, capacity)


class _DecodeStep(nn.Module):
    """The compiled unit. A module (not a bound method) so that inductor sees the weights
    as parameters, which freezing needs."""

    def __init__(self, model: FastCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        return self.model._static_step(ids, pos, keys, values)


def _freezing() -> Any:
    """Inductor's freezing, for compilations that happen inside this block only (passing it
    through torch.compile(options=...) does not reach the step that decides it)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def _trim_heap() -> None:
    """Give the loading temporaries back to the OS (glibc keeps freed blocks otherwise, and
    resident memory would stay above the weights' size)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to do
        pass


def check_quantize(quantize: str | None) -> str | None:
    """None/"none" -> None; "int8" -> "int8"; anything else is a ValueError."""
    if quantize is None:
        return None
    key = str(quantize).strip().lower()
    if key not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}: use {' or '.join(QUANTIZE_CHOICES)}")
    return None if key == "none" else key


# ---- packing -------------------------------------------------------------------------------


class _Packer:
    """Receives checkpoint tensors one at a time (our names) and swaps each linear layer of
    a meta-device FastCausalLM for its fast form as soon as all its pieces have arrived."""

    def __init__(
        self,
        model: FastCausalLM,
        device: torch.device,
        dtype: torch.dtype,
        quantize: str | None,
        compile: bool = False,
        from_file: bool = False,
    ) -> None:
        #: Tensors come straight from the checkpoint file, never written to (not a reference
        #: model's parameters, which fine-tuning may have changed in their mapped pages).
        self.from_file = from_file
        self.model = model
        self.modules = dict(model.named_modules())
        self.device, self.dtype, self.quantize = device, dtype, quantize
        cpu = device.type == "cpu"
        # torch.compile cannot trace oneDNN's opaque packed tensors; it packs weights itself.
        self.packed = quantize is None and cpu and not compile and _mkldnn_packing_works(dtype)
        self.columns = quantize is None and cpu and dtype == torch.float32 and not self.packed
        #: Where packing works, the layout of each shape is measured (or cached, or forced).
        self.kernels = KernelChooser(dtype) if self.packed else None
        #: int8 on CPU: whether products run the panel kernel, measured the same way (not
        #: under torch.compile, which cannot trace a call into our library).
        int8_panels = quantize == "int8" and cpu and not compile
        int8_panels = int8_panels and native.available() and native.quads_supported()
        self.int8_kernels = KernelChooser(torch.float32) if int8_panels else None
        #: Whether the native decode step can run this model once its blocks are panels
        #: (step.py): their layouts are then measured against the step's gain too.
        from . import step

        self.step_possible = (
            not compile
            and not step.disabled()
            and native.available()
            and step.supports(model.config, device)
        )
        #: Linear layers waiting for their other pieces: module name -> {"weight"/"bias": tensor}
        self.pending: dict[str, dict[str, Any]] = {}
        self.swaps = 0
        self.vnni = False
        if quantize == "int8-dynamic":
            if not cpu or not dynamic_int8_available():
                raise BackendError(
                    "quantize='int8-dynamic' needs a CPU with torch's fbgemm kernels; use "
                    "quantize='int8'",
                    cli="--quantize int8-dynamic needs a CPU with torch's fbgemm kernels; "
                    "use --quantize int8",
                )
            self.vnni = _cpu_has_vnni()

    def _put(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def _int8_act(self) -> torch.dtype:
        """Activation dtype into the weight-only int8 kernel: bf16 on CPU (its fp32 path is
        ~10x slower), the model dtype elsewhere."""
        return torch.bfloat16 if self.device.type == "cpu" else self.dtype

    def _linear(self, weight: torch.Tensor | StoredTensor, bias: torch.Tensor | None) -> nn.Module:
        """The fast module for one matrix, in the layout chosen for this device and dtype."""
        if self.quantize == "int8":
            q, scales = quantize_rows(weight)
            on = self._int8_panels("int8 linear", q.shape)
            return Int8Linear(q.to(self.device), scales.to(self.device), bias, self._int8_act(), on)
        if self.quantize == "int8-dynamic":
            q, scales = quantize_rows(weight)
            return DynamicInt8Linear(q, scales, bias, reduce_range=not self.vnni)
        assert isinstance(weight, torch.Tensor)
        if self.columns:
            return ColumnLinear(self._put(weight), bias)
        if self.kernels is not None:
            builders = _layer_builders(self.dtype)
            shape = (weight.shape[0], weight.shape[1])
            # float32, and bf16 with its dot-product kernel: our panel kernels never measured
            # slower than oneDNN's or our row kernel's, at any row count (PanelLinear); they
            # are kept unless beaten.
            ours = self.dtype == torch.float32 or native.pairs_supported()
            incumbent = "panels" if "panels" in builders and ours else "onednn"
            step_rule = incumbent == "panels"
            layout = self._layout(self.kernels, "linear", shape, builders, step_rule, incumbent)
            return _LAYER_LAYOUTS[layout](self._put(weight), bias)
        return plain_linear(self._put(weight), bias)

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.modules[owner_name]
        if name == "transformer.wte.weight":
            self._embedding(tensor)
        elif isinstance(owner, nn.Linear):
            self.pending.setdefault(owner_name, {})[leaf] = tensor
            self._try_swap(owner_name, owner)
        else:  # LayerNorms, position embeddings: kept as they are, in the model dtype
            assert isinstance(tensor, torch.Tensor)
            setattr(owner, leaf, frozen(self._put(tensor)))

    def _embedding(self, tensor: torch.Tensor | StoredTensor) -> None:
        """The token embedding and the head tied to it (one copy of the matrix)."""
        model = self.model
        if self.quantize is None:
            assert isinstance(tensor, torch.Tensor)
            weight = frozen(self._put(tensor))
            model.transformer.wte.weight = weight
            head = model.lm_head = self._head(weight)
            if isinstance(head, PanelLinear):  # lookups read the head's panels
                model.transformer.wte = PanelEmbedding(head.panels, weight.shape, self.dtype)
            return
        q, scales = quantize_rows(tensor)
        if self.quantize == "int8-dynamic":
            model.transformer.wte = Int8Embedding(frozen(q.to(self.device)), scales, self.dtype)
            model.lm_head = DynamicInt8Linear(q, scales, None, not self.vnni)
            return
        on = self._int8_panels("int8 head", q.shape)
        head = Int8Head(frozen(q.to(self.device)), scales.to(self.device), self._int8_act(), on)
        model.lm_head = head
        if head.panels:  # one int8 matrix for both: the head's quads, or rows shared
            model.transformer.wte = PanelEmbedding(head.qpanels, q.shape, self.dtype, scales)
        else:
            model.transformer.wte = Int8Embedding(head.qweight, scales, self.dtype)

    def _int8_panels(self, kind: str, shape: torch.Size) -> bool:
        """Whether an int8 matrix runs the panel kernel (measured against torch's)."""
        if self.int8_kernels is None:
            return False
        builders = _INT8_BUILDERS[kind]
        step_rule = kind == "int8 linear"  # a block's matrix; the head is not the step's
        shape2 = (shape[0], shape[1])
        return self._layout(self.int8_kernels, kind, shape2, builders, step_rule) == "panels"

    def _layout(
        self,
        chooser: KernelChooser,
        kind: str,
        shape: tuple[int, int],
        builders: Any,
        step_rule: bool,
        incumbent: str = DEFAULT_LAYOUT,
    ) -> str:
        """The measured layout; for a block's matrix where the native step can run, panels
        (which the step needs for every such matrix) unless beaten by STEP_MARGIN."""
        if step_rule and self.step_possible:
            return chooser.layout(kind, shape, builders, "panels", STEP_MARGIN)
        return chooser.layout(kind, shape, builders, incumbent)

    def _head(self, weight: nn.Parameter) -> nn.Module:
        """The lm_head over the embedding matrix, in the layout measured fastest: read in
        place (oneDNN for float32, TiedHead's own products or, for one row, the row kernel),
        or a copy of it (`PanelLinear` panels; bf16/fp16: `PackedHead`, oneDNN's layout)."""
        if self.kernels is None:
            return TiedHead(weight)
        shape = (weight.shape[0], weight.shape[1])
        fp32 = self.dtype == torch.float32
        layout = self.kernels.layout("head", shape, _head_builders(self.dtype))
        if layout == "panels":
            if not self.from_file:
                return PanelLinear(weight, None)
            # The embedding's pages may go as the copy passes them (never the whole matrix
            # twice in memory); lookups then read the head's panels (PanelEmbedding).
            head = PanelLinear(weight, None, lambda rows: release_pages(weight, 0, rows))
            release_pages(weight)  # the pages at the stretches' edges
            return head
        if layout == "onednn" and not fp32:
            return PackedHead(weight)
        onednn = fp32 and layout != "linear"  # oneDNN in place for more rows
        return TiedHead(weight, onednn=onednn, native=layout == "native")

    def _try_swap(self, name: str, linear: nn.Linear) -> None:
        """Swap a linear layer once its weight (and bias) are in; q, k and v once all three
        are in, fused into one `qkv_proj`."""
        parts = self.pending[name]
        if "weight" not in parts or (linear.bias is not None and "bias" not in parts):
            return
        parent_name, _, attr = name.rpartition(".")
        parent = self.modules[parent_name]
        if attr in ("q_proj", "k_proj", "v_proj"):
            names = [f"{parent_name}.{p}_proj" for p in "qkv"]
            if all("weight" in self.pending.get(n, {}) for n in names):
                fused = torch.cat([self.pending.pop(n)["weight"] for n in names], dim=0)
                parent.qkv_proj = self._linear(fused, None)
                for p in "qkv":
                    delattr(parent, f"{p}_proj")
            return
        del self.pending[name]
        bias = self._put(parts["bias"]) if "bias" in parts else None
        setattr(parent, attr, self._linear(parts["weight"], bias))
        self.swaps += 1
        if self.swaps % 3 == 0:  # about once per block (qkv, out, fc, proj)
            _trim_heap()  # the block's temporaries would otherwise pile up in the heap

    def finish(self) -> None:
        if self.pending:  # pragma: no cover - match_checkpoint reports missing tensors
            raise GPTNeoError(f"incomplete checkpoint: {', '.join(sorted(self.pending))}")
        model = self.model
        model._dtype, model._device, model.quantize = self.dtype, self.device, self.quantize
        for module in model.modules():
            if type(module) is nn.LayerNorm:
                module.__class__ = FastLayerNorm  # same parameters, a cheaper call
            elif type(module) in _DIRECT_CALL:
                module.__class__ = _DIRECT_CALL[type(module)]
        _trim_heap()


#: The CPU layer layouts gptneo_cli.kernels chooses between, by name.
_LAYER_LAYOUTS: dict[str, Any] = {
    "onednn": PackedLinear,
    "linear": plain_linear,
    "columns": ColumnLinear,
    "native": NativeLinear,
    "panels": PanelLinear,
}
#: The tied head: oneDNN reading the plain embedding in place, or TiedHead's own products
#: (bf16 heads are never oneDNN: it would reorder the matrix on every call).
_HEAD_BUILDERS = {
    "onednn": lambda w: TiedHead(nn.Parameter(w, requires_grad=False), onednn=True),
    "linear": lambda w: TiedHead(nn.Parameter(w, requires_grad=False), onednn=False),
}


#: bf16/fp16 heads: a packed copy of the embedding (oneDNN reorders a plain bf16 matrix on
#: every call), or the plain matrix read in place.
_PACKED_HEAD_BUILDERS = {
    "onednn": lambda w: PackedHead(w),
    "linear": _HEAD_BUILDERS["linear"],
}


def _head_builders(dtype: torch.dtype) -> dict[str, Any]:
    """float32 heads: oneDNN in place or TiedHead's products; bf16/fp16: a packed copy or
    TiedHead's products; both: the native kernel for one row (reading the embedding in
    place) where it could be built and takes the dtype."""
    fp32 = dtype == torch.float32
    builders = _HEAD_BUILDERS if fp32 else _PACKED_HEAD_BUILDERS
    if not native.available() or dtype not in native.DTYPES:
        return builders
    native_head = lambda w: TiedHead(nn.Parameter(w, requires_grad=False), fp32, True)  # noqa: E731
    return {**builders, "native": native_head, "panels": lambda w: PanelLinear(w, None)}


def _layer_builders(dtype: torch.dtype) -> dict[str, Any]:
    """The layouts measured for a layer matrix: float32 has MKL, oneDNN and (where they could
    be built) our row and panel kernels competing; bf16 oneDNN packed or plain, or our row
    and panel kernels; fp16 oneDNN packed or plain."""
    names = LAYER_CHOICES if dtype == torch.float32 else ("onednn", "linear")
    if dtype in native.DTYPES and native.available():
        names = (*names, "native", "panels")
    return {name: (lambda w, cls=_LAYER_LAYOUTS[name]: cls(w, None)) for name in names}


LAYER_CHOICES = ("onednn", "linear", "columns")


def _int8_builder(cls: type[Int8Linear], panels: bool) -> Any:
    """An int8 module of a float matrix (the kernel measurement hands float matrices)."""

    def build(weight: torch.Tensor) -> Int8Linear:
        q, scales = quantize_rows(weight)
        if cls is Int8Head:
            return Int8Head(q, scales, torch.bfloat16, panels)
        return Int8Linear(q, scales, None, torch.bfloat16, panels)

    return build


#: int8 matrices: our panel kernel or torch's int8 kernel (prompts: a float GEMM in both).
_INT8_BUILDERS = {
    kind: {"panels": _int8_builder(cls, True), "linear": _int8_builder(cls, False)}
    for kind, cls in (("int8 linear", Int8Linear), ("int8 head", Int8Head))
}


def optimize_for_inference(
    model: GPTNeoForCausalLM,
    *,
    quantize: str | None = None,
    compile: bool = False,
) -> FastCausalLM:
    """Turn a loaded reference causal LM into a FastCausalLM on the same device and dtype.

    The reference model is consumed: each weight moves to the meta device once packed, so
    peak memory stays near one copy. int8 scales come from the weights as they are.
    """
    if not isinstance(model, GPTNeoForCausalLM) or isinstance(model, FastCausalLM):
        raise TypeError("optimize_for_inference takes a (reference) GPTNeoForCausalLM")
    quantize = check_quantize(quantize)
    with torch.device("meta"):
        fast = FastCausalLM(model.config)
    fast.transformer.attn_backend = model.attn_implementation
    packer = _Packer(fast, model.device, model.dtype, quantize, compile)
    modules = dict(model.named_modules())
    with native.huge_arena(native.HugeArena()):  # the panels share huge pages
        for name, param in list(model.named_parameters()):
            packer.add(name, param.detach())
            owner, _, attr = name.rpartition(".")
            meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
            setattr(modules[owner], attr, nn.Parameter(meta, requires_grad=False))
        model.tie_weights()
        packer.finish()
    if compile:
        fast.compile_decode()
    return fast.eval()
