"""The CUDA-only attention code, checked on CPU through its wiring.

The GPU run (scripts/gpu_check.py, docs/PERFORMANCE.md) found two CUDA-only defects that no
CPU test could see: masks built on the CPU for a CUDA model (any unpadded prompt longer than
the local window crashed), and cuDNN's SDPA kernel re-planning for every key length (decode
ran ~60 ms a token). These tests pin the fixes without a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptneo_cli import attention
from gptneo_cli.attention import build_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from flex_prefill import flex_window_prefill  # noqa: E402  (the alternative measured on the GPU)

META = torch.device("meta")


@pytest.mark.parametrize("kind", ["global", "local"])
@pytest.mark.parametrize(
    ("past", "new", "padded"),
    [(0, 40, False), (0, 40, True), (12, 1, True), (12, 5, False), (12, 5, True), (3, 30, False)],
)
def test_masks_are_built_on_the_activations_device(kind, past, new, padded):
    valid = None
    if padded:
        valid = torch.ones(2, past + new, dtype=torch.bool, device=META)
    plan = build_plan(kind, past, new, 8, valid, META)
    if plan.mask is not None:
        assert plan.mask.device == META
    else:  # no mask needed: only when nothing but causality (or nothing) applies
        assert not padded and (kind == "global" or new <= 8 or past > 0)


def _qkv(batch: int, t: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, t, 8, generator=gen) for _ in range(3))


def test_cuda_sdpa_runs_without_cudnn(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    q, k, v = _qkv(1, 12)
    plan = build_plan("local", 0, 12, 5, None)
    got = attention._sdpa_cuda(q, k, v, plan)
    assert seen == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    want = real(q, k, v, attn_mask=plan.mask, scale=1.0)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "t", "window", "padded"), [(1, 40, 7, False), (3, 33, 5, True), (2, 20, 30, True)]
)
def test_flex_window_prefill_attends_like_sdpa(batch, t, window, padded):
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _qkv(batch, t, seed=batch)
    valid = None
    if padded:
        valid = torch.ones(batch, t, dtype=torch.bool)
        valid[-1, : t // 3] = False
    plan = build_plan("local", 0, t, window, valid)
    want = attention.sdpa_attention(q, k, v, plan)
    got = flex_window_prefill(q, k, v, plan, compiled=False)
    rows = valid[:, None, :, None].expand_as(got) if valid is not None else slice(None)
    assert (got - want)[rows].abs().max() < 1e-5
