"""flex_attention for a local layer's prefill: the alternative measured on the GPU.

Not used by gptneo: on an H200 it was 11x slower than sdpa with an explicit window mask at
2048 tokens (docs/PERFORMANCE.md). scripts/gpu_check.py measures it against sdpa, and
tests/test_cuda_wiring.py checks on CPU that it attends exactly like sdpa.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from gptneo_cli.attention import AttentionPlan


@lru_cache(maxsize=2)
def _flex(compiled: bool) -> tuple[Callable[..., torch.Tensor], Callable[..., object]]:
    """(flex_attention, create_block_mask); flex_attention compiled unless asked otherwise
    (uncompiled it is torch's slow reference, used by the CPU tests of the mask logic)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kernel = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return kernel, create_block_mask


def flex_window_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    compiled: bool = True,
) -> torch.Tensor:
    """A local layer's prefill (keys == queries) through flex_attention with scale 1.0.

    Without padding the mask is the causal window itself; with padding it is read from the
    plan's dense mask, so both paths attend exactly like `sdpa_attention`.
    """
    assert plan.window is not None, "flex prefill is for windowed layers"
    kernel, create_block_mask = _flex(compiled)
    t, window = q.shape[-2], plan.window
    dense = plan.mask[:, 0] if plan.mask is not None else None  # [B|1, T, T]

    def in_window(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor):
        return (ki <= qi) & (ki > qi - window)

    def from_plan(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor):
        assert dense is not None
        return dense[b if dense.shape[0] > 1 else 0, qi, ki]

    batch = dense.shape[0] if dense is not None and dense.shape[0] > 1 else None
    mask_mod = in_window if dense is None else from_plan
    block = create_block_mask(mask_mod, batch, None, t, t, device=q.device)
    return kernel(q, k, v, block_mask=block, scale=1.0)
