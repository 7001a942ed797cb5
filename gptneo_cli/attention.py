"""Attention backends (eager, sdpa, flash) and the masks they share.

GPT-Neo's attention is unusual in three ways, all kept here:
- scores are NOT scaled by 1/sqrt(head_dim) (softmax scale 1.0);
- eager upcasts q and k to float32 and runs the softmax in float32 (fp16 overflows otherwise);
- "local" layers see only the last `window_size` positions, the query itself included.

Masks are built once per forward pass for each layer kind (`AttentionPlan`), never per layer.
They are boolean, True = may attend, shaped [B or 1, 1, T, S]. Positions are counted in steps
(columns of the batch), which equals positions within each row because padding is on the left.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import BackendError

BACKENDS = ("auto", "eager", "sdpa", "flash")


@dataclass
class AttentionPlan:
    """How one kind of layer (global or local) attends during one forward call.

    mask: bool [B|1, 1, T, S] or None (no masking needed beyond `causal`).
    causal: the keys are exactly the queries, so a square causal mask applies.
    window: the local window, or None for global layers (used by the flash backend).
    """

    mask: torch.Tensor | None
    causal: bool
    window: int | None


# ---- backend choice ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def flash_module() -> ModuleType | None:
    """flash_attn if it imports, else None (cached: the import is slow and may fail)."""
    try:
        return importlib.import_module("flash_attn")
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None


def flash_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the flash backend cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"FlashAttention-2 needs a CUDA device, but the model is on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-2 runs in float16 or bfloat16 only, not {str(dtype)[6:]}"
    if flash_module() is None:
        return "flash_attn is not installed (pip install 'gptneo-cli[flash]')"
    return None


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve "auto" and check that an explicit request can run on this device and dtype."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}: use {', '.join(BACKENDS)}")
    if requested == "auto":
        return "flash" if flash_unavailable_reason(device, dtype) is None else "sdpa"
    if requested == "flash":
        reason = flash_unavailable_reason(device, dtype)
        if reason:
            raise BackendError(
                f"attention backend 'flash' cannot run: {reason}",
                cli=f"--attn flash cannot run: {reason}",
            )
    return requested


# ---- plans (masks) ----------------------------------------------------------------------


def _ring_steps(past: int, ring: int, device: torch.device) -> torch.Tensor:
    """The step held by each filled slot of a local layer's ring buffer (`ring` slots)
    after `past` steps. A slot a rejected draft wrote counts as holding the step `ring`
    before it, which is outside the window when the ring has room for the drafts."""
    slots = torch.arange(min(past, ring), device=device)
    return past - 1 - torch.remainder(past - 1 - slots, ring)


def build_plan(
    kind: str,
    past: int,
    new: int,
    window: int,
    key_valid: torch.Tensor | None,
    device: torch.device | None = None,
    ring: int | None = None,
) -> AttentionPlan:
    """The mask for `new` queries after `past` cached steps, for a global or local layer.

    key_valid is a bool [B, past + new] marking non-padding steps, or None when there is no
    padding. The key order matches what `KVCache.update` returns for this kind of layer.
    The mask lives on `device` (the activations' device; default key_valid's, else CPU).
    ring: the slots of a local layer's ring buffer (`KVCache.ring`; default the window).
    A ring larger than the window (speculative decoding) holds steps that left the window,
    so a one-token step is masked too once the ring has wrapped past the window.
    """
    if device is None:
        device = key_valid.device if key_valid is not None else torch.device("cpu")
    local = kind == "local"
    win = window if local else None
    ring = window if ring is None else ring
    if past == 0:
        if key_valid is None and (not local or new <= window):
            return AttentionPlan(None, causal=new > 1, window=win)
        key_steps = torch.arange(new, device=device)
    elif new == 1:
        # Decoding one token: every cached key is in the past (and, for a local layer's ring
        # of window slots, inside the window), so only padding can mask anything.
        if key_valid is None and (not local or ring <= window or past < window):
            return AttentionPlan(None, causal=False, window=win)
        if local:
            key_steps = _ring_steps(past + 1, ring, device)
        else:
            key_steps = torch.arange(past + 1, device=device)
    elif local:
        held = _ring_steps(past, ring, device)
        key_steps = torch.cat([held, torch.arange(past, past + new, device=device)])
    else:
        key_steps = torch.arange(past + new, device=device)

    query_steps = torch.arange(past, past + new, device=device)
    allowed = key_steps[None, :] <= query_steps[:, None]
    if local:
        allowed &= key_steps[None, :] > query_steps[:, None] - window
    mask = allowed[None, None]  # [1, 1, T, S]
    if key_valid is not None:
        mask = mask & key_valid[:, key_steps][:, None, None, :]
        # A padding query may have nothing to attend to; let it attend everywhere instead of
        # producing NaN. Its output is never used.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return AttentionPlan(mask, causal=False, window=win)


# ---- the backends -----------------------------------------------------------------------


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    backend: str,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the chosen backend ("eager", "sdpa" or "flash"; flash for prefills only).

    key_valid: bool [B, T] of non-padding steps, read by the flash backend only.
    """
    if backend == "flash":
        return flash_attention(q, k, v, plan, key_valid)
    if backend == "eager":
        return eager_attention(q, k, v, plan)
    return sdpa_attention(q, k, v, plan)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """The reference: float32 scores and softmax, probabilities cast back to v's dtype."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    mask = plan.mask
    if mask is None and plan.causal:
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


#: A CPU prefill of at least BLOCKED_FROM tokens runs its attention in blocks of
#: BLOCK_QUERIES queries, each against only the keys it can see. torch's CPU kernel computes
#: every (query, key) pair of a causal or windowed mask, so the blocks skip the masked half
#: (or more, on local layers): ~30 % less attention time at 512 tokens (docs/PERFORMANCE.md).
BLOCK_QUERIES = 64
BLOCKED_FROM = 256


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """torch's fused kernel with scale 1.0. is_causal only when keys == queries (top-left)."""
    t = q.shape[-2]
    if q.device.type == "cuda":
        return _sdpa_cuda(q, k, v, plan)
    if (
        q.device.type == "cpu"
        and t >= BLOCKED_FROM
        and k.shape[-2] == t
        and (plan.causal or plan.mask is not None)
    ):
        return _blocked_prefill(q, k, v, plan)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=plan.mask, is_causal=plan.causal and plan.mask is None, scale=1.0
    )


#: SDPA kernels allowed on CUDA: not cuDNN's, which plans anew for every key length, so a
#: decode (one more key each step) paid ~60 ms a token on an H200 (docs/PERFORMANCE.md).
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    with sdpa_kernel(_CUDA_SDPA):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=plan.mask, is_causal=plan.causal and plan.mask is None, scale=1.0
        )


def _blocked_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """A prefill (keys == queries) block of queries by block: each block sees keys from the
    oldest one its window reaches (0 on global layers) up to its last query, with the plan's
    mask cut to match (or a causal/window mask built for the block)."""
    t = q.shape[-2]
    steps = torch.arange(t, device=q.device)
    out = []
    for start in range(0, t, BLOCK_QUERIES):
        end = min(t, start + BLOCK_QUERIES)
        first = 0 if plan.window is None else max(0, start - plan.window + 1)
        if plan.mask is not None:
            mask = plan.mask[..., start:end, first:end]
        else:
            keys, queries = steps[None, first:end], steps[start:end, None]
            mask = keys <= queries
            if plan.window is not None:
                mask = mask & (keys > queries - plan.window)
        out.append(
            F.scaled_dot_product_attention(
                q[..., start:end, :],
                k[..., first:end, :],
                v[..., first:end, :],
                attn_mask=mask,
                scale=1.0,
            )
        )
    return torch.cat(out, dim=-2)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """flash_attn for a prefill (keys == queries). Inputs and output are [B, H, T, D].

    Local layers pass window_size=(window - 1, 0): the query plus window - 1 keys before it.
    Padded batches go through the varlen API with the padding removed.
    """
    fa = flash_module()
    assert fa is not None, "flash backend chosen without flash_attn"
    window = (plan.window - 1, 0) if plan.window is not None else (-1, -1)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, T, H, D]
    if key_valid is None:
        out = fa.flash_attn_func(
            qt, kt, vt, dropout_p=0.0, softmax_scale=1.0, causal=True, window_size=window
        )
        return out.transpose(1, 2)
    b, t, h, d = qt.shape
    flat = key_valid.reshape(-1)
    index = flat.nonzero().squeeze(-1)
    lengths = key_valid.sum(dim=1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    packed = [x.reshape(b * t, h, d).index_select(0, index) for x in (qt, kt, vt)]
    out_packed = fa.flash_attn_varlen_func(
        *packed,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=longest,
        max_seqlen_k=longest,
        dropout_p=0.0,
        softmax_scale=1.0,
        causal=True,
        window_size=window,
    )
    out = qt.new_zeros(b * t, h, d).index_copy_(0, index, out_packed)
    return out.view(b, t, h, d).transpose(1, 2)
