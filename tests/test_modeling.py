"""Our GPT-Neo against transformers on random weights: every class, several shapes, both
file formats, eager and sdpa. Every output must be within 1e-5 (max abs, fp32)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from oracle import HEADS, TINY_CONFIGS, build_reference, save_reference

import gptneo_cli
from gptneo_cli import weights as weights_module
from gptneo_cli.cache import KVCache

TOL = 1e-5


def ours(head: str):
    return getattr(gptneo_cli, HEADS[head])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def compare(head: str, got, ref, ids: torch.Tensor) -> None:
    """Every output of the head, and every hidden state, within TOL of transformers."""
    if head == "question_answering":
        assert max_diff(got.start_logits, ref.start_logits) < TOL
        assert max_diff(got.end_logits, ref.end_logits) < TOL
    elif head == "base":
        assert max_diff(got.last_hidden_state, ref.last_hidden_state) < TOL
    else:
        assert max_diff(got.logits, ref.logits) < TOL
    assert len(got.hidden_states) == len(ref.hidden_states)
    for mine, theirs in zip(got.hidden_states, ref.hidden_states, strict=True):
        assert max_diff(mine, theirs) < TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("config", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_class_matches_transformers(tiny_checkpoint, head, config, fmt, attn):
    folder, ref = tiny_checkpoint(head, config, fmt)
    model = ours(head).from_pretrained(folder, attn=attn)
    vocab = TINY_CONFIGS[config]["vocab_size"]
    ids = torch.randint(1, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
        got = model(ids, output_hidden_states=True)
    compare(head, got, expected, ids)


def test_every_activation_matches_transformers():
    """All parameter-free ACT2FN activations, each equal to transformers' on a wide range."""
    from transformers.activations import ACT2CLS, ACT2FN

    from gptneo_cli.config import ACTIVATIONS
    from gptneo_cli.modeling import ACTIVATIONS as OURS

    assert set(ACTIVATIONS) == set(OURS)
    assert set(ACT2CLS) - {"prelu", "xielu"} <= set(ACTIVATIONS)
    x = torch.linspace(-30.0, 30.0, 4001)
    for name in set(ACTIVATIONS) & set(ACT2CLS):
        assert max_diff(OURS[name](x), ACT2FN[name](x)) < 1e-6, name


def test_parameter_names_are_the_hub_names(tiny_checkpoint):
    folder, ref = tiny_checkpoint("causal_lm", "alternating")
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder)
    theirs = {
        k
        for k in ref.state_dict()
        if not k.endswith((".bias", ".masked_bias")) or "attention.bias" not in k
    }
    mine = set(model.state_dict())
    assert "transformer.h.0.attn.attention.q_proj.weight" in mine
    assert "transformer.h.0.attn.attention.out_proj.bias" in mine
    assert "transformer.h.0.attn.attention.q_proj.bias" not in mine
    assert mine == theirs
    assert model.lm_head.weight is model.transformer.wte.weight


def test_sharded_safetensors_load(tmp_path):
    ref = build_reference("causal_lm", **TINY_CONFIGS["alternating"])
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 131, (1, 12))
    with torch.no_grad():
        assert max_diff(model(ids).logits, ref(ids).logits) < TOL


_PEAK_SCRIPT = """
import sys, torch, gptneo_cli
def rss_kib():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the RSS now
before, _ = rss_kib()
dtype = None if sys.argv[2] == "none" else getattr(torch, sys.argv[2])
model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(sys.argv[1], dtype=dtype)
_, peak = rss_kib()
print((peak - before) * 1024, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("dtype", ["none", "bfloat16"])
def test_loading_keeps_one_copy_of_the_weights(tmp_path, dtype):
    """Peak memory while loading is the weights plus a bounded buffer, never a second full
    copy: not of the file (fp32 -> bf16 is converted chunk by chunk) nor of the model."""
    config = gptneo_cli.GPTNeoConfig.from_dict(
        {
            "model_type": "gpt_neo",
            "vocab_size": 8000,
            "hidden_size": 512,
            "num_layers": 8,
            "num_heads": 8,
            "attention_types": [[["global", "local"], 4]],
        }
    )
    gptneo_cli.GPTNeoForCausalLM(config).save_pretrained(tmp_path)  # 116 MiB in fp32
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), dtype],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode and "clear_refs" in done.stderr:
        pytest.skip("this kernel cannot reset the peak RSS")
    assert done.returncode == 0, done.stderr
    grew, weights = map(int, done.stdout.split())
    file_size = (tmp_path / "model.safetensors").stat().st_size
    # A second copy would add `weights` (fp32) or `file_size` (bf16 from fp32) on top.
    assert grew < weights + 40 * 2**20, (grew, weights, file_size)
    if dtype == "none":  # memory-mapped: loading itself reads (almost) nothing
        assert grew < weights // 4, (grew, weights)


def test_mapped_weights_are_copy_on_write(tmp_path):
    """Parameters mapped from the file can be changed (fine-tuning does) without ever
    writing to the checkpoint: the file's bytes and a fresh load stay as they were."""
    config = gptneo_cli.GPTNeoConfig.from_dict(
        {
            "model_type": "gpt_neo",
            "vocab_size": 500,
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 1]],
        }
    )
    gptneo_cli.GPTNeoForCausalLM(config).save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(tmp_path)
    wte = model.transformer.wte.weight
    assert wte.numel() * wte.element_size() >= weights_module.MAP_MIN_BYTES  # mapped
    original = wte.detach().clone()
    with torch.no_grad():
        wte.add_(1.0)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    again = gptneo_cli.GPTNeoForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.transformer.wte.weight, original)
    assert torch.equal(wte, original + 1.0)
    # Saved back where it came from, while `again` still maps the old file: both stay right.
    model.save_pretrained(tmp_path)
    assert torch.equal(again.transformer.wte.weight, original)
    reloaded = gptneo_cli.GPTNeoForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.transformer.wte.weight, original + 1.0)
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_mapping_stays_within_the_descriptor_budget(tmp_path, monkeypatch):
    """Before Python 3.13 each mapping holds a file descriptor: past the budget tensors are
    read instead (same values), and dropping the model gives the descriptors back."""
    import gc
    import os

    config = gptneo_cli.GPTNeoConfig.from_dict(
        {
            "model_type": "gpt_neo",
            "vocab_size": 500,
            "hidden_size": 128,
            "num_layers": 4,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 2]],
        }
    )  # 4 layers x 3 matrices of 64 KiB or more, plus wte and wpe
    gptneo_cli.GPTNeoForCausalLM(config).save_pretrained(tmp_path)
    reference = gptneo_cli.GPTNeoForCausalLM.from_pretrained(tmp_path)
    monkeypatch.setattr(weights_module, "_map_budget", lambda: 3)
    monkeypatch.setattr(weights_module, "_MAPS_HOLD_FDS", True)
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    live = weights_module._LIVE_MAPS[0]
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(tmp_path)
    assert weights_module._LIVE_MAPS[0] - live <= 3
    assert len(os.listdir("/proc/self/fd")) - fds <= 3
    ids = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    del model, reference
    gc.collect()
    assert weights_module._LIVE_MAPS[0] <= live
    assert len(os.listdir("/proc/self/fd")) <= fds


def test_base_model_loads_from_a_head_checkpoint(tiny_checkpoint):
    folder, ref = tiny_checkpoint("question_answering", "local_first")
    base = gptneo_cli.GPTNeoModel.from_pretrained(folder)
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        assert max_diff(base(ids).last_hidden_state, ref.transformer(ids).last_hidden_state) < TOL


def test_head_loads_from_a_base_checkpoint(tiny_checkpoint):
    folder, ref = tiny_checkpoint("base", "one_layer")
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        expected = ref(ids).last_hidden_state @ ref.wte.weight.T
        assert max_diff(model(ids).logits, expected) < TOL


def test_new_head_is_initialised_and_announced(tiny_checkpoint, caplog):
    folder, ref = tiny_checkpoint("causal_lm", "local_first")
    with caplog.at_level("WARNING", logger="gptneo"):
        model = gptneo_cli.GPTNeoForSequenceClassification.from_pretrained(folder)
    assert "score.weight" in caplog.text and "initialised randomly" in caplog.text
    assert model.score.weight.device.type == "cpu"
    assert model.score.weight.std().item() > 0  # really initialised, not left empty
    ids = torch.randint(1, 97, (1, 8))
    with torch.no_grad():
        hidden = ref.transformer(ids).last_hidden_state
        assert max_diff(model.transformer(ids).last_hidden_state, hidden) < TOL


def test_random_init_matches_after_save_and_transformers_load(tmp_path):
    import transformers

    config = gptneo_cli.GPTNeoConfig.from_dict(
        {"model_type": "gpt_neo", **TINY_CONFIGS["local_first"]}
    )
    torch.manual_seed(3)
    model = gptneo_cli.GPTNeoForTokenClassification(config).eval()
    model.save_pretrained(tmp_path)
    theirs = transformers.GPTNeoForTokenClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert max_diff(model(ids).logits, theirs(ids).logits) < TOL


# ---- KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefill_then_600_steps_equals_full_forward(tmp_path, attn):
    """Crosses the real 256-token window; each step's logits equal the full forward's."""
    ref = build_reference(
        "causal_lm",
        vocab_size=67,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=256,
        max_position_embeddings=2048,
    )
    folder = save_reference(ref, tmp_path / "m")
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder, attn=attn)
    prefill, steps = 40, 600
    ids = torch.randint(0, 67, (1, prefill + steps), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        assert max_diff(full, ref(ids).logits) < TOL
        cache = model.new_cache(1, prefill + steps)
        got = [model(ids[:, :prefill], cache=cache).logits]
        for t in range(prefill, prefill + steps):
            got.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert max_diff(torch.cat(got, dim=1), full) < TOL
    local = cache.keys[1]
    assert local.shape[2] == 256, "a local layer's cache must stop growing at the window"
    assert cache.keys[0].shape[2] == prefill + steps


def test_decoding_up_to_2048_positions_equals_full_forward(tmp_path):
    """The cache at full length: the last steps up to position 2047 still match, and the
    2049th position is refused."""
    ref = build_reference(
        "causal_lm",
        vocab_size=67,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        attention_types=[[["local", "global"], 1]],
        window_size=256,
        max_position_embeddings=2048,
    )
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(save_reference(ref, tmp_path / "m"))
    prefill, total = 1800, 2048
    ids = torch.randint(0, 67, (1, total), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = ref(ids).logits
        cache = model.new_cache(1, total)
        got = [model(ids[:, :prefill], cache=cache).logits]
        for t in range(prefill, total):
            got.append(model(ids[:, t : t + 1], cache=cache).logits)
        assert cache.length == total and cache.keys[0].shape[2] == 256
        with pytest.raises(ValueError, match="2049 positions is longer than the model's 2048"):
            model(ids[:, :1], cache=cache)
    assert max_diff(torch.cat(got, dim=1), full) < TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_chunked_prefill_across_the_window(tiny_checkpoint, attn):
    folder, ref = tiny_checkpoint("causal_lm", "local_first")  # window 5
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder, attn=attn)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ref(ids).logits
        cache = model.new_cache(2, 40)
        chunks = [
            model(ids[:, a:b], cache=cache).logits
            for a, b in ((0, 3), (3, 4), (4, 12), (12, 13), (13, 31), (31, 40))
        ]
    assert max_diff(torch.cat(chunks, dim=1), full) < TOL


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", ["local_first", "alternating"])
def test_left_padded_batch_equals_rows_alone(tiny_checkpoint, config, attn):
    folder, _ = tiny_checkpoint("causal_lm", config)
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder, attn=attn)
    vocab = TINY_CONFIGS[config]["vocab_size"]
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, vocab, (n,), generator=gen) for n in (17, 9, 3)]
    extra = torch.randint(1, vocab, (3, 12), generator=gen)  # decoded one step at a time
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        cache = model.new_cache(3, ids.shape[1] + 12)
        first = model(ids, attention_mask=mask, cache=cache).logits
        assert max_diff(first, batch) < TOL  # the cached prefill computes the same logits
        steps = []
        for t in range(12):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            steps.append(model(extra[:, t : t + 1], attention_mask=mask, cache=cache).logits)
        decoded = torch.cat(steps, dim=1)
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, extra[i]])[None]).logits[0]
            n = len(row)
            assert max_diff(batch[i, -n:], alone[:n]) < TOL
            assert max_diff(decoded[i], alone[n:]) < TOL


def test_padded_batch_matches_transformers_at_real_positions(tiny_checkpoint):
    folder, ref = tiny_checkpoint("causal_lm", "alternating")
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder)
    rows = [torch.randint(1, 131, (n,)) for n in (14, 6)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        mine = model(ids, attention_mask=mask).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = ref(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert max_diff(mine[real], theirs[real]) < TOL


def test_keep_rows_drops_finished_rows(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "local_first")
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 97, (3, 10))
    nxt = torch.randint(0, 97, (3, 1))
    with torch.no_grad():
        cache = model.new_cache(3, 12)
        model(ids, cache=cache)
        cache.keep_rows(torch.tensor([2, 0]))
        got = model(nxt[[2, 0]], cache=cache).logits
        want = model(torch.cat([ids, nxt], dim=1)[[2, 0]]).logits[:, -1:]
    assert cache.batch_size == 2
    assert max_diff(got, want) < TOL


def test_sequence_classification_pools_last_real_token_with_mask(tiny_checkpoint):
    folder, ref = tiny_checkpoint("sequence_classification", "local_first")
    model = gptneo_cli.GPTNeoForSequenceClassification.from_pretrained(folder)
    rows = [torch.randint(1, 97, (n,)) for n in (8, 5, 2)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            assert max_diff(batch[i], ref(row[None]).logits[0]) < TOL


def test_logits_to_keep_computes_the_last_positions_only(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 101)
    # Not bit-equal: a [2, 1, h] and a [2, 7, h] matmul may take different GEMM kernels.
    assert max_diff(last, full[:, -1:]) < 1e-6


def test_cache_refuses_overflow(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    model = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder)
    cache = model.new_cache(1, 5)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache holds 5"):
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    assert isinstance(cache, KVCache)


# ---- reduced precision ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_half_precision_stays_close_to_fp32(tiny_checkpoint, dtype, attn):
    """Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9), fp16 11 bits.
    Through a few layers the logits drift by a few percent of their spread at most, so we
    require max |delta| <= 5% (bf16) / 1% (fp16) of the fp32 logits' range, and the same
    greedy token at >= 90% of positions (random weights give many near-ties)."""
    folder, _ = tiny_checkpoint("causal_lm", "alternating")
    ref = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder)
    low = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder, dtype=dtype, attn=attn)
    assert low.dtype == dtype and low.transformer.h[0].mlp.c_fc.weight.dtype == dtype
    ids = torch.randint(0, 131, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).logits
        got = low(ids).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    spread = (want.max() - want.min()).item()
    share = 0.05 if dtype == torch.bfloat16 else 0.01
    assert max_diff(got, want) <= share * spread
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fp16_does_not_overflow_in_attention(tiny_checkpoint, attn):
    """Unscaled scores beyond fp16's 65504 must not become inf/NaN (transformers #11076)."""
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    ref = gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        attention = ref.transformer.h[0].attn.attention
        attention.q_proj.weight.mul_(400.0)
        attention.k_proj.weight.mul_(400.0)
        ids = torch.randint(0, 101, (1, 16))
        ln = ref.transformer.h[0].ln_1(ref.transformer.wte(ids) + ref.transformer.wpe.weight[:16])
        q = attention.q_proj(ln).view(1, 16, 3, 8)
        k = attention.k_proj(ln).view(1, 16, 3, 8)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
        assert scores.abs().max() > 65504  # this really overflows fp16
        low = ref.to(torch.float16)
        low.attn_implementation = attn
        got = low(ids).logits
    assert torch.isfinite(got).all()


# ---- attention backend choice -----------------------------------------------------------


def test_flash_is_refused_on_cpu_with_a_reason(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    with pytest.raises(gptneo_cli.errors.BackendError, match="CUDA"):
        gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder, attn="flash", dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown attention backend"):
        gptneo_cli.GPTNeoForCausalLM.from_pretrained(folder, attn="fastest")


def test_auto_backend_is_sdpa_on_cpu():
    from gptneo_cli.attention import choose_backend

    assert choose_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert choose_backend("eager", torch.device("cpu"), torch.float32) == "eager"


@pytest.mark.parametrize("fast_path", [False, True])
def test_long_prefill_runs_blocked_and_matches_transformers(tmp_path, fast_path, monkeypatch):
    """Prefills of BLOCKED_FROM tokens or more run their CPU attention in query blocks: equal
    to transformers (global and local layers, a window smaller than a block and one larger,
    left padding), and to the same model with blocking switched off."""
    from gptneo_cli import attention
    from gptneo_cli.fast import FastCausalLM

    ref = build_reference(
        "causal_lm",
        vocab_size=89,
        hidden_size=24,
        num_layers=3,
        num_heads=3,
        attention_types=[[["global", "local"], 1], [["local"], 1]],
        window_size=80,
        max_position_embeddings=512,
    )
    folder = save_reference(ref, tmp_path / "m")
    cls = FastCausalLM if fast_path else gptneo_cli.GPTNeoForCausalLM
    model = cls.from_pretrained(folder, attn="sdpa")
    gen = torch.Generator().manual_seed(11)
    rows = [torch.randint(1, 89, (n,), generator=gen) for n in (300, 263)]
    ids, mask = left_pad(rows)
    blocks = []
    real = attention._blocked_prefill
    monkeypatch.setattr(attention, "_blocked_prefill", lambda *a: blocks.append(1) or real(*a))
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() gives transformers
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask).logits
        alone = model(rows[0][None]).logits
    assert len(blocks) == 2 * 3  # both calls, every layer
    assert max_diff(got[mask.bool()], expected[mask.bool()]) < TOL
    assert max_diff(alone, ref(rows[0][None]).logits) < TOL
    monkeypatch.setattr(attention, "BLOCKED_FROM", 10**9)
    with torch.no_grad():
        unblocked = model(ids, attention_mask=mask).logits
    assert max_diff(got[mask.bool()], unblocked[mask.bool()]) < 1e-6
