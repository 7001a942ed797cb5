"""The native step: every block of a fast model for the new tokens of each row (one when
decoding, the drafts and one more in a speculative verify, a prompt of up to MAX_NEW
tokens), in one call into our C library (csrc/gemv.c, `decode_step`).

Why: through torch, the ~150 small ops of a decoded token (layer norms, attention, GELU,
adds, the Python around ~50 products) cost ~1.3 ms on gpt-neo-125M with 2 threads: a
fifth of a bf16 token and a third of an int8 one, time in which no weight is read. The C
step runs them between the panel products in one OpenMP region (bias, residual and GELU
fused into the products' epilogues), so decoding runs closer to memory speed
(docs/PERFORMANCE.md). A prompt's small ops grow with its length: the step ran 8-255
token prompts 1.12-1.40x as fast as the torch path.

When it runs: a FastCausalLM on CPU whose four matrices per block are all panels (the
float32/bf16 `PanelLinear`, int8 `Int8Linear(panels=True)`), with a tanh-GELU activation,
up to MAX_NEW tokens per row (MAX_TOKENS in all) with a `KVCache` held in float32 whose
local rings keep every key the new tokens see, no padding anywhere and positions
following the cache; or one token for each of the scheduler's rows (a `RowCache` decode
call, every row at its own position). Anything else (longer prompts, padded batches, the
scheduler's prompts and verifies, a compiled step) runs the torch path, as does every
model where the library is missing. Activations are float32 (a bf16 model's are rounded
to bf16 where they enter a bf16 product, as are an int8 model's in a prompt of
Int8Linear.PANEL_BF16_ROWS tokens or more, as on the torch path); tests/test_step.py
compares it with the torch path and with transformers.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from . import native
from .cache import KVCache
from .fast import Int8Linear, PanelEmbedding, PanelLinear
from .rowcache import RowCache

#: GPTNEO_NATIVE_STEP=0 keeps decoding on the torch path (A/B measurements, a suspected bug).
ENV = "GPTNEO_NATIVE_STEP"

#: The most new tokens per row the step takes: decode steps, verifies (drafts of up to 15)
#: and prompts. Measured against the torch path (gpt-neo-125M, 2 threads, AMD EPYC): 8-255
#: token prompts 1.12-1.40x as fast in float32, bf16 and int8; a local ring of the window
#: holds at most 256 new steps anyway, and longer prompts are for torch's SDPA.
MAX_NEW = 256
#: The most tokens of all rows together (the scratch holds every intermediate of a call at
#: once, ~29 KiB a token at 125M): a batch of long prompts runs the torch path, layer by
#: layer.
MAX_TOKENS = 2048

#: The activations the C step computes (GELU's tanh form); others run the torch path.
TANH_GELU = {"gelu_new", "gelu_fast", "gelu_accurate", "gelu_pytorch_tanh", "gelu_python_tanh"}


def disabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


def supports(config: Any, device: torch.device) -> bool:
    """Whether the step runs this kind of model on this device, once its blocks are held as
    panels: on the CPU, with GELU's tanh form (the kernel's epilogue)."""
    return device.type == "cpu" and config.activation_function in TANH_GELU


class NativeStep:
    """A model's blocks as csrc/gemv.c `Layer`s, built once; `ready` says whether a call
    can run here, `__call__` runs it. `NativeStep.build(model)` is None where the model's
    layers are not all panels (module docstring)."""

    def __init__(
        self, model: Any, lib: ctypes.CDLL, layers: list[native.Layer], keep: list[torch.Tensor]
    ) -> None:
        config = model.config
        self.model, self.lib = model, lib
        self.layers = (native.Layer * len(layers))(*layers)
        self.count = len(layers)
        self.heads, self.dim, self.inner = config.num_heads, config.head_dim, config.inner_size
        self.width = config.hidden_size
        self.eps = config.layer_norm_epsilon
        ln_f = model.transformer.ln_f
        keep += [ln_f.weight.detach().float(), ln_f.bias.detach().float()]
        self.lnf = keep[-2].data_ptr(), keep[-1].data_ptr()
        self._keep = keep  # the float32 copies the structures point into
        #: Whether the CPU has the bf16 dot-product kernel that int8 prompts run.
        self.pairs = native.pairs_supported()
        #: (tokens, threads, largest capacity) and the scratch buffer sized for them.
        self._scratch: tuple[tuple[int, int, int], torch.Tensor] | None = None
        #: The head as a Mat where the step can run it too (`_head_mat`), else None.
        self.head = _head_mat(model, keep)
        #: The embeddings where the step looks them up itself (`_embed`), else None.
        self.embed = _embed(model, keep)

    @classmethod
    def build(cls, model: Any) -> NativeStep | None:
        config = model.config
        lib = native.library()
        if lib is None or not supports(config, model.device):
            return None
        keep: list[torch.Tensor] = []
        layers = []
        for block in model.transformer.h:
            attention = block.attn.attention
            mats = [
                _mat(module, inputs, keep)
                for module, inputs in (
                    (attention.qkv_proj, config.hidden_size),
                    (attention.out_proj, config.hidden_size),
                    (block.mlp.c_fc, config.hidden_size),
                    (block.mlp.c_proj, config.inner_size),
                )
            ]
            if any(mat is None for mat in mats):
                return None
            norms = []
            for norm in (block.ln_1, block.ln_2):
                keep += [norm.weight.detach().float(), norm.bias.detach().float()]
                norms += [keep[-2].data_ptr(), keep[-1].data_ptr()]
            window = config.window_size if attention.kind == "local" else 0
            layers.append(native.Layer(*norms, *mats, window))
        return cls(model, lib, layers, keep)

    def ready(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Any,
    ) -> bool:
        """Up to MAX_NEW new tokens per row, no padding, positions from the cache, a float32
        KVCache with room for them (a local ring: the window and the new steps); anything
        else is the torch path's (which also raises the errors)."""
        if type(cache) is not KVCache or cache.key_valid is not None or position_ids is not None:
            return False
        if input_ids.dim() != 2 or input_ids.shape[0] != cache.batch_size:
            return False
        new, past = input_ids.shape[1], cache.length
        if not 1 <= new <= MAX_NEW or past + new > cache.max_length:
            return False
        if new > 1 and input_ids.shape[0] * new > MAX_TOKENS:
            return False
        ring_short = cache.ring < min(cache.window + new - 1, cache.max_length)
        if new > 1 and ring_short and past + new > cache.ring:
            return False  # the new steps would overwrite keys that some of them still see
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0]:
                return False
            if attention_mask.shape[1] not in (new, past + new):
                return False
            if not bool(attention_mask[:, -new:].all()):
                return False
        return _cache_pointers(cache, input_ids.shape[0], self.heads, self.dim) is not None

    def ready_rows(self, input_ids: torch.Tensor, cache: Any) -> bool:
        """A scheduler's decode call: one token for each row of a float32 RowCache whose
        `begin_decode` announced their positions (grown to hold them)."""
        if type(cache) is not RowCache or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return False
        positions = cache.decode_positions()
        if positions is None or positions.shape != (input_ids.shape[0],):
            return False
        return _cache_pointers(cache, input_ids.shape[0], self.heads, self.dim) is not None

    def runs_head(self, new: int) -> bool:
        """Whether a call of `new` tokens a row can return logits (`__call__(logits=True)`):
        decode steps, where the head is held as the step's panels."""
        return self.head is not None and new == 1

    def __call__(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        positions: torch.Tensor | None = None,
        logits: bool = False,
    ) -> torch.Tensor:
        """The final hidden states [rows, new, width] (float32) of the new tokens, or with
        `logits` (where `runs_head`) the head's [rows, new, vocab] in the model's dtype, as
        the torch path's head gives them (float32 sums, rounded once); the cache
        holds their keys and values and has advanced. `positions` [rows]: each row's first
        new position (a RowCache's rows); by default every row is at the cache's length."""
        rows, new = input_ids.shape
        logits = logits and self.runs_head(new)
        out = torch.empty(rows, new, self.head.m) if logits else None
        base = self.model.transformer
        at = cache.length
        if positions is not None:
            positions = positions.to(torch.int64).contiguous()
        ids = input_ids
        if self.embed is not None:
            # The lookups in C too: after the weights' stream every torch call runs cold
            # (~50 us each), so a decode step makes as few of them as it can.
            if ids.dtype != torch.int64 or not ids.is_contiguous():
                ids = ids.to(torch.int64).contiguous()
            x = torch.empty(rows, new, self.width)
        elif positions is None:
            x = base.wte(input_ids).float() + base.wpe.weight[at : at + new].float()
        else:
            steps = positions[:, None] + torch.arange(new)
            x = base.wte(input_ids).float() + base.wpe.weight[steps].float()
        held = _cache_pointers(cache, rows, self.heads, self.dim)
        assert held is not None  # `ready` said so
        threads = torch.get_num_threads()
        scratch = self._scratch_for(rows * new, threads, held.most)
        failed = self.lib.decode_step(
            ctypes.addressof(self.layers), self.count, held.keys, held.values, held.capacity,
            x.data_ptr(), rows, new, native._ptr(positions), self.heads, self.dim, self.inner,
            self.eps, *self.lnf, scratch.data_ptr(), threads, self._prompt(new),
            ctypes.addressof(self.head) if logits else None, native._ptr(out),
            ctypes.addressof(self.embed) if self.embed is not None else None,
            ids.data_ptr(), at,
        )  # fmt: skip
        if failed == -1:
            raise IndexError("index out of range in self")  # nn.Embedding's error
        if failed:
            raise MemoryError("the decode step could not allocate its positions")
        cache.advance(new)
        if out is None:
            return x
        dtype = self.model.dtype  # a no-op .to() still costs a cold torch call
        return out if dtype == torch.float32 else out.to(dtype)

    def _prompt(self, new: int) -> bool:
        """Whether int8 products take `new` tokens a row as a prompt's: bf16 activations
        through the dot-product kernel, as Int8Linear's do on the torch path."""
        return self.pairs and Int8Linear.prompt_tokens(new)

    def _scratch_for(self, tokens: int, threads: int, most: int) -> torch.Tensor:
        """The intermediates' buffer, kept while the shapes stay (one size at a time)."""
        key = (tokens, threads, most)
        if self._scratch is None or self._scratch[0] != key:
            size = self.lib.step_scratch(tokens, self.width, self.inner, most, threads)
            self._scratch = (key, torch.empty(size, dtype=torch.float32))
        return self._scratch[1]


def _mat(module: Any, inputs: int, keep: list[torch.Tensor]) -> native.Mat | None:
    """A csrc/gemv.c Mat for a panel-held linear layer, or None for any other layout."""
    colsum = None
    bias = module._parameters.get("bias")
    if type(module) is PanelLinear:
        panels, scale = module.panels, None
        width = (inputs + 1) // 2 if panels.dtype == torch.int32 else inputs
        if panels.dim() != 3 or panels.shape[1] != width or panels.shape[2] != native.PANEL:
            return None
    elif isinstance(module, Int8Linear) and module.panels:
        panels, scale, colsum = module.qpanels, module.scales32, module.colsum
        width = -(-inputs // 4)  # quads
        if panels.shape[1:] != (width, native.PANEL, 4):
            return None
    else:
        return None
    if bias is not None:
        keep.append(bias.detach().float().contiguous())
        bias = keep[-1]
    pointers = [native._ptr(t) for t in (panels, scale, bias, colsum)]
    kind = native.STEP_KINDS[panels.dtype]
    return native.Mat(*pointers, module.out_features, width, inputs, kind)


def _head_mat(model: Any, keep: list[torch.Tensor]) -> native.Mat | None:
    """The head as a Mat where the step's product gives what the torch path's does: its
    input is the final hidden state in the model's dtype, so float32 panels and int8 quads
    of a float32 model (float32 inputs there too), or bf16 pairs (inputs rounded to bf16 in
    both). Anything else runs the head through torch after the step."""
    kinds = {native.STEP_KINDS[torch.int32]}
    if model.dtype == torch.float32:
        kinds |= {native.STEP_KINDS[torch.float32], native.STEP_KINDS[torch.int8]}
    mat = _mat(model.lm_head, model.config.hidden_size, keep)
    return mat if mat is not None and mat.kind in kinds else None


def _embed(model: Any, keep: list[torch.Tensor]) -> native.Embed | None:
    """The token embedding as an Embed where it reads the head's panels (PanelEmbedding)
    with float32 results the step can reproduce: float32 or bf16 rows, or int8 rows times
    float32 scales; and float32 position embeddings (a copy for bf16). Else None: the
    embeddings are looked up through torch before the step."""
    base = model.transformer
    wte = base.wte
    if type(wte) is not PanelEmbedding:
        return None
    panels = wte._parameters["panels"]
    kind = native.STEP_KINDS.get(panels.dtype)
    if kind is None or not panels.is_contiguous():
        return None
    scale = None
    if wte.scales is not None:
        if wte.dtype != torch.float32:
            return None
        scale = wte.scales.contiguous()
        keep.append(scale)
    keep.append(base.wpe.weight.detach().float().contiguous())
    wpe = keep[-1]
    pointers = panels.data_ptr(), native._ptr(scale)
    return native.Embed(*pointers, kind, wte.rows, wpe.data_ptr(), wpe.shape[0])


class CachePointers(NamedTuple):
    """What decode_step reads of a KVCache or RowCache: the addresses of arrays of its key
    and value buffers and of their capacities, and the largest capacity (the scores'
    room)."""

    buffers: tuple[torch.Tensor, ...]  # the keys' and values' buffers they were built from
    arrays: tuple[Any, ...]  # the ctypes arrays, kept alive
    keys: int
    values: int
    capacity: int
    most: int


def _cache_pointers(cache: Any, rows: int, heads: int, dim: int) -> CachePointers | None:
    """The cache's CachePointers, built once per set of buffers (KVCache.keep_rows and
    RowCache.ensure replace them); None where a buffer is not a contiguous float32 [rows
    (or more), heads, capacity, dim]."""
    buffers = (*cache.keys, *cache.values)
    held = getattr(cache, "_native_pointers", None)
    fresh = held is not None and len(held.buffers) == len(buffers)
    if fresh and all(a is b for a, b in zip(held.buffers, buffers, strict=True)):
        return held if held.buffers[0].shape[0] >= rows else None
    count = len(cache.keys)
    for t in buffers:
        shape_ok = t.dim() == 4 and (t.shape[1], t.shape[3]) == (heads, dim)
        if not (shape_ok and t.shape[0] >= rows and t.is_contiguous()):
            return None
        if t.dtype != torch.float32:
            return None
    capacities = [t.shape[2] for t in cache.keys]
    arrays = (
        (ctypes.c_void_p * count)(*[t.data_ptr() for t in cache.keys]),
        (ctypes.c_void_p * count)(*[t.data_ptr() for t in cache.values]),
        (ctypes.c_int64 * count)(*capacities),
    )
    addresses = [ctypes.addressof(array) for array in arrays]
    held = CachePointers(buffers, arrays, *addresses, max(capacities))
    cache._native_pointers = held
    return held
