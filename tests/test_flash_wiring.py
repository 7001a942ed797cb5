"""Our call of flash_attn, checked on CPU with a stand-in module.

flash-attn cannot be installed here (no wheels, no CUDA). The stand-in records every call
(layout, window, scale, causal) and computes attention from those arguments alone with its
own mask, so passing a wrong window or scale makes the outputs differ from eager.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import gptneo_cli
from gptneo_cli import attention

TOL = 1e-5


def _reference(q, k, v, scale, causal, window):
    """q, k, v: [T, H, D] for one sequence, flash semantics (bottom-right aligned)."""
    t, s = q.shape[0], k.shape[0]
    qi = torch.arange(t)[:, None] + (s - t)
    kj = torch.arange(s)[None, :]
    allowed = torch.ones(t, s, dtype=torch.bool)
    if causal:
        allowed &= kj <= qi
    left, right = window
    if left >= 0:
        allowed &= kj >= qi - left
    if right >= 0:
        allowed &= kj <= qi + right
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=scale
    )
    return out.transpose(0, 1)


def make_stand_in():
    calls: list[dict] = []
    module = types.ModuleType("flash_attn")

    def flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)
    ):
        calls.append(
            dict(
                api="func",
                shape=tuple(q.shape),
                scale=softmax_scale,
                causal=causal,
                window=tuple(window_size),
                dropout=dropout_p,
            )
        )
        return torch.stack(
            [
                _reference(q[b], k[b], v[b], softmax_scale, causal, window_size)
                for b in range(q.shape[0])
            ]
        )

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
    ):
        calls.append(
            dict(
                api="varlen",
                shape=tuple(q.shape),
                scale=softmax_scale,
                causal=causal,
                window=tuple(window_size),
                cu=cu_seqlens_q.tolist(),
                max_len=max_seqlen_q,
                dropout=dropout_p,
            )
        )
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        pieces = []
        bounds = cu_seqlens_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            pieces.append(_reference(q[a:b], k[a:b], v[a:b], softmax_scale, causal, window_size))
        return torch.cat(pieces)

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module, calls


@pytest.fixture
def stand_in(monkeypatch):
    # Import the oracle before the stand-in exists: transformers probes for flash_attn.
    import transformers.models.gpt_neo.modeling_gpt_neo  # noqa: F401

    module, calls = make_stand_in()
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    attention.flash_module.cache_clear()
    real_reason = attention.flash_unavailable_reason

    def reason(device, dtype):
        # Pretend the CPU is a CUDA device; keep the dtype and import checks real.
        return real_reason(torch.device("cuda"), dtype)

    monkeypatch.setattr(attention, "flash_unavailable_reason", reason)
    yield calls
    attention.flash_module.cache_clear()


def force_flash(monkeypatch):
    """Run the flash path even on a float32 model (the stand-in does not care)."""
    from gptneo_cli import modeling

    monkeypatch.setattr(modeling, "choose_backend", lambda *a: "flash")


def load(folder, attn, dtype=None):
    return gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder, attn=attn, dtype=dtype)


def test_auto_picks_flash_only_for_half_precision(stand_in):
    cpu = torch.device("cpu")
    assert attention.choose_backend("auto", cpu, torch.bfloat16) == "flash"
    assert attention.choose_backend("auto", cpu, torch.float16) == "flash"
    assert attention.choose_backend("auto", cpu, torch.float32) == "sdpa"
    with pytest.raises(gptneo_cli.errors.BackendError, match="float16 or bfloat16 only"):
        attention.choose_backend("flash", cpu, torch.float32)


def test_flash_prefill_arguments_and_numerics(stand_in, tiny_checkpoint, monkeypatch):
    folder, ref = tiny_checkpoint("causal_lm", "alternating")  # window 7, global/local x2
    model = load(folder, "eager")
    ids = torch.randint(0, 131, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        model.attn_implementation = "sdpa"  # load in fp32, then force flash on the fp32 model
        force_flash(monkeypatch)
        got = model(ids).logits
    assert (got - want).abs().max().item() < TOL
    assert [c["api"] for c in stand_in] == ["func"] * 4
    assert [c["window"] for c in stand_in] == [(-1, -1), (6, 0), (-1, -1), (6, 0)]
    for call in stand_in:
        assert call["shape"] == (2, 19, 2, 16)  # [batch, seq, heads, head_dim]
        assert call["scale"] == 1.0 and call["causal"] is True and call["dropout"] == 0.0


def test_flash_padded_batch_uses_varlen_and_matches_rows_alone(
    stand_in, tiny_checkpoint, monkeypatch
):
    folder, ref = tiny_checkpoint("causal_lm", "local_first")  # window 5, local first
    model = load(folder, "sdpa")
    force_flash(monkeypatch)
    rows = [torch.randint(1, 97, (n,)) for n in (12, 4, 9)]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 12 - len(r) :] = r
        mask[i, 12 - len(r) :] = 1
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            want = ref(r[None]).logits[0]
            assert (got[i, -len(r) :] - want).abs().max().item() < TOL
    assert {c["api"] for c in stand_in} == {"varlen"}
    assert stand_in[0]["cu"] == [0, 12, 16, 25] and stand_in[0]["max_len"] == 12
    assert [c["window"] for c in stand_in] == [(4, 0), (-1, -1), (4, 0)]


def test_decode_after_flash_prefill_uses_sdpa(stand_in, tiny_checkpoint, monkeypatch):
    folder, ref = tiny_checkpoint("causal_lm", "local_first")
    model = load(folder, "sdpa")
    force_flash(monkeypatch)
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        want = ref(ids).logits
        cache = model.new_cache(1, 16)
        parts = [model(ids[:, :8], cache=cache).logits]
        prefill_calls = len(stand_in)
        for t in range(8, 16):
            parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert prefill_calls == 3 and len(stand_in) == 3  # no flash call while decoding
    assert (torch.cat(parts, 1) - want).abs().max().item() < TOL


def test_flash_loads_in_half_precision_with_the_stand_in(stand_in, tiny_checkpoint):
    folder, ref = tiny_checkpoint("causal_lm", "one_layer")
    model = load(folder, "flash", dtype="bfloat16")
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        got = model(ids).logits.float()
        want = ref(ids).logits
    assert len(stand_in) == 1 and stand_in[0]["window"] == (-1, -1)
    assert (got - want).abs().max().item() < 0.05 * (want.max() - want.min()).item()
