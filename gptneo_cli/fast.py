"""The inference-only fast path for causal LMs: packed weights, a flat forward, int8.

`modeling.py` stays the readable reference with the Hub's parameter names. This module
turns those weights, once, into the layout that runs fastest on the device, and runs them
with the same forward contract (same inputs, KV cache, padding rules and outputs), so
`generation.py`, the tasks and the CLI take either model.

What changes, and why (numbers in docs/PERFORMANCE.md):
- q, k and v become one fused [3h, h] matrix: one matrix product instead of three.
- On CPU, layer matrices are prepacked for oneDNN. bf16: F.linear on a plain bf16 matrix
  reorders it on every call, the packed one runs the product about 1.5x as fast. float32:
  F.linear goes to MKL, whose products run 2.2-2.4x slower than oneDNN's on AMD EPYC
  (MKL takes a generic code path there), at every row count from 1 to 512. Where packing
  is unavailable, float32 matrices are stored transposed ([in, out]) for MKL instead.
- The lm_head is the embedding matrix itself (never copied), see `TiedHead`.
- The forward is one flat loop over plain tensors, without nn.Module calls per layer:
  decoding one token is ~200 small ops, so Python overhead counts.
- `quantize="int8"`: weight-only int8 with one scale per output channel, computed from the
  checkpoint while it is read (no full-precision copy is kept). The tied embedding / lm_head
  is quantized too: it is 38.6M of gpt-neo-125M's 125M parameters. Activations, LayerNorms,
  attention and the KV cache keep the model dtype. `quantize="int8-dynamic"` also rounds
  activations to 8 bits (faster on CPU, less exact).
- `compile=True`: torch.compile of the one-token decode step (see `compile_decode`).

The reference model is consumed: `optimize_for_inference` moves its weights over (to the
meta device) so memory is not held twice.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import build_plan, choose_backend, eager_attention, flash_attention, sdpa_attention
from .cache import KVCache
from .config import GPTNeoConfig
from .device import resolve_device, resolve_dtype
from .errors import BackendError, GPTNeoError
from .modeling import _ACTIVATIONS, GPTNeoForCausalLM, GPTNeoModel, GPTNeoOutput
from .preflight import preflight
from .weights import StoredTensor, iter_tensors, weight_files

log = logging.getLogger("gptneo")

QUANTIZE_CHOICES = ("none", "int8", "int8-dynamic")


# ---- packed matrices -------------------------------------------------------------------


class Dense:
    """y = x @ W.T + b, with W kept in the layout that is fastest where it runs."""

    #: The attributes holding tensors (registered as frozen parameters of the model).
    TENSORS: tuple[str, ...] = ()
    #: Bytes held outside those tensors (packed library objects).
    extra_bytes = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ W.T + b through oneDNN: W prepacked (PackedDense) or a plain [out, in] matrix,
    which oneDNN reads in place for float32."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class RowDense(Dense):
    """W as stored in checkpoints, [out, in] (CUDA and MPS, and CPU where packing is off)."""

    TENSORS = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)



class TiedHead(Dense):
    """The lm_head: the token embedding matrix itself, [vocab, hidden], never copied.

    float32 on x86-64 CPUs reads it in place through oneDNN (`onednn`). Otherwise which
    product is faster depends on rows and dtype (measured on CPU, 2 threads): for fp32 with
    MKL, W @ x.T beats x @ W.T by ~25 % at 8 rows; for bf16 it wins slightly at one row only.
    A packed (oneDNN) copy would be ~1.6x faster in bf16 but costs a second embedding-sized
    copy (+32 % of a bf16 125M model), so the head stays unpacked.
    """

    TENSORS = ("weight",)

    def __init__(self, weight: torch.Tensor, onednn: bool = False) -> None:
        self.weight = weight
        #: fp32 on CPU: oneDNN reads the plain [vocab, hidden] matrix in place, 2.6x faster
        #: than MKL's product on an AMD EPYC (3.4 vs 9.0 ms per token for gpt-neo-125M).
        self.onednn = onednn
        fp32 = weight.dtype == torch.float32
        self.column_rows = (lambda rows: rows > 1) if fp32 else (lambda rows: rows == 1)
        if weight.device.type != "cpu":
            self.column_rows = lambda rows: False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.onednn:
            out = onednn_linear(flat, self.weight)
        elif self.column_rows(flat.shape[0]):
            out = torch.mm(self.weight, flat.t()).t()
        else:
            out = F.linear(flat, self.weight)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class ColDense(Dense):
    """W transposed, [in, out] contiguous: MKL's float32 products run faster on this layout
    (the CPU float32 fallback where oneDNN packing is unavailable, and for --compile)."""

    TENSORS = ("weight_t", "bias")

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight_t, self.bias = weight_t, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.bias is None:
            out = torch.mm(flat, self.weight_t)
        else:
            out = torch.addmm(self.bias, flat, self.weight_t)
        return out.view(*x.shape[:-1], out.shape[-1])



class PackedDense(Dense):
    """W reordered once into oneDNN's blocked layout (CPU: float32, bf16, fp16).

    F.linear on a plain bf16 matrix makes oneDNN reorder the weight on every call; the
    prepacked one skips that. For float32 it replaces MKL, which is much slower on AMD CPUs.
    """

    TENSORS = ("packed", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.packed, self.bias)



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
            got = PackedDense(w, None)(x)
            _PROBES[key] = bool(torch.equal(got, F.linear(x, w)))
        except (RuntimeError, AttributeError, NotImplementedError):
            _PROBES[key] = False
    return _PROBES[key]


class Int8Dense(Dense):
    """int8 W [out, in] with a float scale per output row; inputs run in `act_dtype`.

    For a few rows (decoding) torch._weight_int8pack_mm does the product without ever
    materialising a float W. For many rows (a prefill) the product dominates and that kernel
    is slow, so the matrix is dequantized for the call and the float GEMM runs (float32 on
    CPU, through oneDNN where it works, like PackedDense). The same happens where the kernel
    is missing (older torch, some devices) or cannot take the shape (its CPU kernel reads
    garbage unless the input width is a multiple of 16).
    """

    TENSORS = ("qweight", "scales", "bias")
    #: From this many rows on, dequantize + float GEMM beats the int8 kernel (measured).
    DEQUANT_ROWS = 64

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        act_dtype: torch.dtype,
    ) -> None:
        self.qweight, self.bias, self.act_dtype = qweight, bias, act_dtype
        self.scales = scales.to(act_dtype)
        self.packed = qweight.shape[1] % 16 == 0 and _int8pack_works(qweight.device, act_dtype)
        cpu = qweight.device.type == "cpu"
        self.onednn = cpu and _mkldnn_packing_works(torch.float32)  # see PackedDense

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        if self.packed and flat.shape[0] < self.DEQUANT_ROWS:
            out = torch._weight_int8pack_mm(flat.to(self.act_dtype), self.qweight, self.scales)
        else:
            gemm = torch.float32 if flat.device.type == "cpu" else self.act_dtype
            weight = self.qweight.to(gemm) * self.scales.to(gemm)[:, None]
            product = onednn_linear if self.onednn else F.linear
            out = product(flat.to(gemm), weight)
        out = out.to(dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])



class DynamicInt8Dense(Dense):
    """W8A8: int8 W per output row (fbgemm-packed) and activations quantized to uint8 on
    every call, one scale per call (`--quantize int8-dynamic`, CPU only).

    Not weight-only: the activation rounding costs some accuracy (measured in
    docs/PERFORMANCE.md), in exchange for integer dot products (VNNI), about twice as fast
    as the weight-only kernel here.
    """

    TENSORS = ("bias",)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 reduce_range: bool) -> None:
        with warnings.catch_warnings():  # the quantized-tensor constructors are deprecated
            warnings.simplefilter("ignore")
            zeros = torch.zeros(scales.shape[0], dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zeros, 0)
            float_bias = None if bias is None else bias.float()
            self.packed = torch.ops.quantized.linear_prepack(qw, float_bias)
        self.bias = bias  # kept for accounting; the packed object adds it
        self.reduce_range = reduce_range
        self.extra_bytes = qweight.numel() + 8 * scales.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        out = torch.ops.quantized.linear_dynamic(flat, self.packed, self.reduce_range)
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


def _cpu_has_vnni() -> bool:
    """Integer dot-product instructions: without them fbgemm's uint8 x int8 sums can
    saturate, so activations must use 7 bits (reduce_range)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def dynamic_int8_available() -> bool:
    key = ("fbgemm", torch.float32)
    if key not in _PROBES:
        try:
            q = torch.ones(4, 16, dtype=torch.int8)
            dense = DynamicInt8Dense(q, torch.full((4,), 0.5), None, True)
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
                torch.ones(1, 32, dtype=dtype, device=device), w, torch.ones(8, dtype=dtype,
                                                                             device=device)
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


# ---- the model -------------------------------------------------------------------------


class _Layer:
    """One block's tensors, as plain attributes (no nn.Module lookups on the hot path)."""

    __slots__ = ("kind", "ln1_w", "ln1_b", "qkv", "out", "ln2_w", "ln2_b", "fc", "proj")

    def __init__(self, kind: str) -> None:
        self.kind = kind


class FastCausalLM(nn.Module):
    """GPT-Neo causal LM for inference only, with the forward contract of GPTNeoForCausalLM.

    Build it with `FastCausalLM.from_pretrained(...)` (streams the checkpoint straight into
    the packed layout) or `optimize_for_inference(model)`. It cannot be trained or saved.
    """

    def __init__(
        self,
        config: GPTNeoConfig,
        dtype: torch.dtype,
        device: torch.device,
        attn: str,
        quantize: str | None,
    ) -> None:
        super().__init__()
        self.config = config
        self._dtype, self._device, self._attn = dtype, device, attn
        self.quantize = quantize
        self.compiled = False
        self.layers: list[_Layer] = [_Layer(k) for k in config.attention_layers]
        self.act = _ACTIVATIONS[config.activation_function]
        self.eps = config.layer_norm_epsilon
        self.hidden = config.hidden_size
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.wte: torch.Tensor | None = None  # float embedding (also the lm_head), or None
        self.wte_q: torch.Tensor | None = None  # int8 embedding rows
        self.wte_scale: torch.Tensor | None = None
        self.lm_head: Dense | None = None
        self.wpe = self.ln_f_w = self.ln_f_b = torch.empty(0)
        self._step: Any = None

    # ---- what callers look at -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, KV cache); int8 weights report it too."""
        return self._dtype

    @property
    def attn_implementation(self) -> str:
        return self._attn

    @attn_implementation.setter
    def attn_implementation(self, name: str) -> None:
        choose_backend(name, self.device, self.dtype)
        self._attn = name

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        if not (self.compiled and batch_size == 1):
            return KVCache(
                self.config, batch_size, max_length, dtype=self.dtype, device=self.device
            )
        # Static shapes: a few capacities only.
        bucket = -(-max_length // COMPILE_BUCKET) * COMPILE_BUCKET
        max_length = min(bucket, self.config.max_position_embeddings)
        cache = KVCache(self.config, 1, max_length, dtype=self.dtype, device=self.device)
        if self.device.type == "cuda":
            # The CUDA graph writes the cache in place: its buffers must be static inputs
            # (else inductor skips the graph for "mutated inputs"). No guard: a new cache
            # re-records the graph instead of recompiling the step.
            for buffer in (*cache.keys, *cache.values):
                torch._dynamo.mark_static_address(buffer, guard=False)
        return cache

    def weight_bytes(self) -> int:
        """Bytes held by the packed weights (what a decode step reads, plus wpe)."""
        extra = self.lm_head.extra_bytes if self.lm_head is not None else 0
        for layer in self.layers:
            extra += sum(getattr(layer, s).extra_bytes for s in ("qkv", "out", "fc", "proj"))
        return extra + sum(p.numel() * p.element_size() for p in self.parameters())

    def save_pretrained(self, folder: str | Path) -> Path:
        raise GPTNeoError(
            "a fast (packed/quantized) model cannot be saved: save the reference "
            "GPTNeoForCausalLM loaded without optimization"
        )

    def _register(self) -> None:
        """Turn every tensor into a frozen parameter registered on this module, in place.

        .parameters(), memory accounting and torch.compile (which treats parameters as
        constants) then see them; the hot path keeps reading plain attributes.
        """
        made: dict[int, nn.Parameter] = {}

        def param(name: str, tensor: torch.Tensor | None) -> nn.Parameter | None:
            if tensor is None:
                return None
            if id(tensor) not in made:
                made[id(tensor)] = nn.Parameter(tensor, requires_grad=False)
                self.register_parameter(name, made[id(tensor)])
            return made[id(tensor)]

        for attr in ("wte", "wte_q", "wte_scale", "wpe", "ln_f_w", "ln_f_b"):
            tensor = self.__dict__.pop(attr)
            wrapped = param(attr, tensor)
            if wrapped is None:
                self.__dict__[attr] = None
        holders: list[tuple[str, Any, tuple[str, ...]]] = []
        if self.lm_head is not None:
            holders.append(("lm_head", self.lm_head, self.lm_head.TENSORS))
        for i, layer in enumerate(self.layers):
            holders.append((f"h{i}", layer, ("ln1_w", "ln1_b", "ln2_w", "ln2_b")))
            for slot in ("qkv", "out", "fc", "proj"):
                dense = getattr(layer, slot)
                holders.append((f"h{i}_{slot}", dense, dense.TENSORS))
        for prefix, holder, attrs in holders:
            for attr in attrs:
                setattr(holder, attr, param(f"{prefix}_{attr}", getattr(holder, attr)))

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        attn: str = "auto",
        revision: str | None = None,
        quantize: str | None = None,
        compile: bool = False,
    ) -> FastCausalLM:
        """Read a checkpoint straight into the packed layout (same arguments as
        GPTNeoForCausalLM.from_pretrained, plus `quantize` and `compile`)."""
        from .hub import resolve_model_dir

        quantize = check_quantize(quantize)
        folder = resolve_model_dir(name_or_path, revision=revision)
        config = GPTNeoConfig.from_json_file(folder / "config.json")
        files = weight_files(folder)
        dev = resolve_device(device) if device is not None else torch.device("cpu")
        dt = resolve_dtype(dtype, dev, quantize)
        choose_backend(attn, dev, dt)
        preflight(config, files, dt, dev, folder.name or str(folder), quantize)
        with torch.device("meta"):
            skeleton = GPTNeoForCausalLM(config, attn=attn)
        packer = _Packer(config, dev, dt, quantize, compile)
        # int8 quantizes from the file's precision; the embedding is read row block by row
        # block, so loading never holds it whole in float32.
        read_dtype = None if quantize else dt
        lazy = (lambda name: name.endswith("wte.weight")) if quantize else None
        tensors = iter_tensors(files, read_dtype, lazy)
        skeleton._match_checkpoint(tensors, packer.add, folder.name or str(folder))
        model = packer.build(attn)
        _trim_heap()
        if compile:
            model.compile_decode()
        return model.eval()

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
        """Same contract and results as GPTNeoForCausalLM.forward."""
        past, key_valid, position_ids = GPTNeoModel.prepare_inputs(
            self.config, input_ids, attention_mask, position_ids, cache
        )
        batch, new = input_ids.shape
        if (
            self._step is not None and cache is not None and past > 0 and batch == 1
            and new == 1 and key_valid is None and not output_hidden_states
        ):
            cuda = self.device.type == "cuda"
            if cuda:  # a new graph replay: the previous step's outputs were consumed
                torch.compiler.cudagraph_mark_step_begin()
            with _freezing():
                logits = self._step(input_ids, position_ids.view(1, 1), cache.keys, cache.values)
            if cuda:  # the graph's output buffer is overwritten by the next replay
                logits = logits.clone()
            cache.advance(1)
            return GPTNeoOutput(logits=logits, cache=cache)
        x = self._embed(input_ids) + F.embedding(position_ids, self.wpe)
        backend = choose_backend(self._attn, x.device, x.dtype)
        plans = {
            kind: build_plan(kind, past, new, self.config.window_size, key_valid, x.device)
            for kind in set(self.config.attention_layers)
        }
        flash_valid = key_valid if past == 0 else None
        hidden: list[torch.Tensor] = []
        h, eps = (self.hidden,), self.eps
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(x)
            a = F.layer_norm(x, h, layer.ln1_w, layer.ln1_b, eps)
            q, k, v = (
                layer.qkv(a).view(batch, new, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            )
            prefill = cache is None or past == 0
            if cache is not None:
                k, v = cache.update(index, k, v)
            plan = plans[layer.kind]
            if backend == "flash" and prefill:
                a = flash_attention(q, k, v, plan, flash_valid)
            elif backend == "eager":
                a = eager_attention(q, k, v, plan)
            else:
                a = sdpa_attention(q, k, v, plan)
            x = x + layer.out(a.transpose(1, 2).reshape(batch, new, self.hidden))
            m = F.layer_norm(x, h, layer.ln2_w, layer.ln2_b, eps)
            x = x + layer.proj(self.act(layer.fc(m)))
        x = F.layer_norm(x, h, self.ln_f_w, self.ln_f_b, eps)
        if cache is not None:
            cache.advance(new)
        if output_hidden_states:
            hidden.append(x)
        assert self.lm_head is not None
        return GPTNeoOutput(
            logits=self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x),
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            cache=cache,
        )

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.wte is not None:
            return F.embedding(ids, self.wte)
        assert self.wte_q is not None and self.wte_scale is not None
        rows = F.embedding(ids, self.wte_q).to(self.dtype)
        return rows * F.embedding(ids, self.wte_scale[:, None])

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
        """Decode one token at position `pos` ([1, 1]) attending over whole cache buffers.

        Slots not yet written are masked out; for a local layer's ring every slot is a step
        inside the window once it is full, so `slot <= pos` is the mask for both kinds.
        """
        h, eps = (self.hidden,), self.eps
        x = self._embed(ids) + F.embedding(pos, self.wpe)
        step = pos.view(1)
        for index, layer in enumerate(self.layers):
            a = F.layer_norm(x, h, layer.ln1_w, layer.ln1_b, eps)
            q, k, v = layer.qkv(a).view(1, 1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            cache_k, cache_v = keys[index], values[index]
            capacity = cache_k.shape[2]
            slot = torch.remainder(step, capacity)
            cache_k.index_copy_(2, slot, k)
            cache_v.index_copy_(2, slot, v)
            visible = torch.arange(capacity, device=x.device) <= step
            a = F.scaled_dot_product_attention(
                q, cache_k, cache_v, attn_mask=visible.view(1, 1, 1, capacity), scale=1.0
            )
            x = x + layer.out(a.transpose(1, 2).reshape(1, 1, self.hidden))
            m = F.layer_norm(x, h, layer.ln2_w, layer.ln2_b, eps)
            x = x + layer.proj(self.act(layer.fc(m)))
        x = F.layer_norm(x, h, self.ln_f_w, self.ln_f_b, eps)
        assert self.lm_head is not None
        return self.lm_head(x)


COMPILE_BUCKET = 256


class _DecodeStep(nn.Module):
    """The compiled unit. A module (not a bound method) so that inductor sees the weights
    as parameters, which freezing needs."""

    def __init__(self, model: FastCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
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


# ---- packing ---------------------------------------------------------------------------


class _Packer:
    """Receives checkpoint tensors one at a time (our names) and packs them as they come."""

    def __init__(
        self,
        config: GPTNeoConfig,
        device: torch.device,
        dtype: torch.dtype,
        quantize: str | None,
        compile: bool = False,
    ) -> None:
        self.model = FastCausalLM(config, dtype, device, "auto", quantize)
        self.device, self.dtype, self.quantize = device, dtype, quantize
        cpu = device.type == "cpu"
        # torch.compile cannot trace oneDNN's opaque packed tensors; it packs weights itself.
        self.packed = quantize is None and cpu and not compile and _mkldnn_packing_works(dtype)
        self.columns = quantize is None and cpu and dtype == torch.float32 and not self.packed
        self.pending: dict[str, torch.Tensor] = {}
        self.vnni = False
        if quantize == "int8-dynamic":
            if not cpu or not dynamic_int8_available():
                raise BackendError(
                    "--quantize int8-dynamic needs a CPU with torch's fbgemm kernels; "
                    "use --quantize int8"
                )
            self.vnni = _cpu_has_vnni()

    def _put(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def _int8_act(self) -> torch.dtype:
        """Activation dtype into the weight-only int8 kernel: bf16 on CPU (its fp32 path is
        ~10x slower), the model dtype elsewhere."""
        return torch.bfloat16 if self.device.type == "cpu" else self.dtype

    def _dense(self, weight: torch.Tensor | StoredTensor, bias: torch.Tensor | None) -> Dense:
        if self.quantize == "int8":
            q, scales = quantize_rows(weight)
            return Int8Dense(q.to(self.device), scales.to(self.device), bias, self._int8_act())
        if self.quantize == "int8-dynamic":
            q, scales = quantize_rows(weight)
            return DynamicInt8Dense(q, scales, bias, reduce_range=not self.vnni)
        assert isinstance(weight, torch.Tensor)
        if self.columns:
            return ColDense(self._put(weight.t()), bias)
        if self.packed:
            return PackedDense(self._put(weight), bias)
        return RowDense(self._put(weight), bias)

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        model = self.model
        if name == "transformer.wte.weight":
            if self.quantize is not None:
                q, scales = quantize_rows(tensor)
                model.wte_q, model.wte_scale = q.to(self.device), self._put(scales)
                if self.quantize == "int8-dynamic":
                    model.lm_head = DynamicInt8Dense(q, scales, None, not self.vnni)
                else:
                    model.lm_head = Int8Dense(
                        model.wte_q, scales.to(self.device), None, self._int8_act()
                    )
            else:
                model.wte = self._put(tensor)
                onednn = self.packed and self.dtype == torch.float32
                model.lm_head = TiedHead(model.wte, onednn=onednn)
            return
        if name == "transformer.wpe.weight":
            model.wpe = self._put(tensor)
            return
        if name == "transformer.ln_f.weight":
            model.ln_f_w = self._put(tensor)
            return
        if name == "transformer.ln_f.bias":
            model.ln_f_b = self._put(tensor)
            return
        parts = name.split(".")  # transformer.h.{i}.<module path>
        if parts[:2] != ["transformer", "h"]:
            raise GPTNeoError(f"fast path cannot place tensor {name}")
        layer = model.layers[int(parts[2])]
        key = ".".join(parts[3:])
        simple = {"ln_1.weight": "ln1_w", "ln_1.bias": "ln1_b",
                  "ln_2.weight": "ln2_w", "ln_2.bias": "ln2_b"}
        if key in simple:
            setattr(layer, simple[key], self._put(tensor))
            return
        self.pending[name] = tensor
        prefix = ".".join(parts[:3])
        self._try_pack(prefix, layer)

    def _try_pack(self, prefix: str, layer: _Layer) -> None:
        """Pack a matrix once all its pieces (weight, bias; q, k and v) have arrived."""
        pending = self.pending
        att = f"{prefix}.attn.attention."
        qkv = [f"{att}{p}_proj.weight" for p in "qkv"]
        if all(n in pending for n in qkv):
            fused = torch.cat([pending.pop(n) for n in qkv], dim=0)
            layer.qkv = self._dense(fused, None)
        for slot, stem in (("out", f"{att}out_proj"), ("fc", f"{prefix}.mlp.c_fc"),
                           ("proj", f"{prefix}.mlp.c_proj")):
            w, b = f"{stem}.weight", f"{stem}.bias"
            if w in pending and b in pending:
                weight = pending.pop(w)
                setattr(layer, slot, self._dense(weight, self._put(pending.pop(b))))
        if all(getattr(layer, s, None) is not None for s in ("qkv", "out", "fc", "proj")):
            _trim_heap()  # the layer's temporaries would otherwise pile up in the heap

    def build(self, attn: str) -> FastCausalLM:
        if self.pending:  # pragma: no cover - _match_checkpoint reports missing tensors
            raise GPTNeoError(f"incomplete checkpoint: {', '.join(sorted(self.pending))}")
        model = self.model
        model._attn = attn
        model._register()
        return model


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
    if not isinstance(model, GPTNeoForCausalLM):
        raise TypeError("optimize_for_inference takes a GPTNeoForCausalLM")
    quantize = check_quantize(quantize)
    packer = _Packer(model.config, model.device, model.dtype, quantize, compile)
    modules = dict(model.named_modules())
    for name, param in list(model.named_parameters()):
        packer.add(name, param.detach())
        owner, _, attr = name.rpartition(".")
        meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
        setattr(modules[owner], attr, nn.Parameter(meta, requires_grad=False))
    model.tie_weights()
    fast = packer.build(model.attn_implementation)
    _trim_heap()
    if compile:
        fast.compile_decode()
    return fast.eval()
