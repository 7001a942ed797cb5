"""The fast paths (gptneo_cli.fast) against the reference: values, not timings.

- fused QKV + oneDNN-packed (or transposed) float32 weights: within 1e-5 of transformers
  and of our reference, for prefill, padded batches, hidden states and cached decoding
  across the local window;
- bf16 with oneDNN-prepacked weights: within bf16 rounding of the reference bf16 model;
- int8 weight-only: per-row quantization error bounded by half a step, logits within a stated
  tolerance, top-1 agreement (>= 98 % on the trained demo model), memory <= 0.3x float32;
- the compiled decode step: equal to the eager fast path within 1e-5 (float32, tiny model);
- the chunked safetensors reader converting dtypes on the way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from oracle import TINY_CONFIGS, build_reference, save_reference

import gptneo_cli
from gptneo_cli import fast, native, weights
from gptneo_cli.fast import FastCausalLM, optimize_for_inference, quantize_rows
from gptneo_cli.generation import GenerationConfig, generate
from gptneo_cli.modeling import GPTNeoForCausalLM

TOL = 1e-5
TINY_DEMO = Path(gptneo_cli.__file__).resolve().parent / "data" / "tiny"
#: Widths that are multiples of 16 reach torch._weight_int8pack_mm; the oracle's odd widths
#: reach the dequantizing fallback.
INT8_SHAPE = dict(
    vocab_size=203,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    attention_types=[[["global", "local"], 1]],
    window_size=6,
    max_position_embeddings=64,
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab, (3, 17), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


# ---- fused + transposed float32 -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["onednn", "linear", "columns", "no-packing"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("config", sorted(TINY_CONFIGS))
def test_float32_fast_path_matches_transformers(tiny_checkpoint, config, attn, layout, monkeypatch):
    """Every CPU float32 layout gptneo_cli.kernels may choose (forced with GPTNEO_KERNEL):
    oneDNN (packed layers, the plain tied head read in place), plain rows through F.linear,
    transposed columns; and the transposed fallback for builds where packing does not work."""
    if layout != "no-packing" and not fast._mkldnn_packing_works(torch.float32):
        pytest.skip("this torch build has no working oneDNN float32 packing")
    if layout == "no-packing":
        monkeypatch.setattr(fast, "_mkldnn_packing_works", lambda dtype: False)
    else:
        monkeypatch.setenv("GPTNEO_KERNEL", layout)
    folder, ref = tiny_checkpoint("causal_lm", config)
    model = FastCausalLM.from_pretrained(folder, attn=attn)
    kind = {"onednn": fast.PackedLinear, "linear": torch.nn.Linear}.get(layout, fast.ColumnLinear)
    attention = model.transformer.h[0].attn.attention
    assert isinstance(attention.qkv_proj, kind)  # fused, in the layout chosen for CPU fp32
    assert isinstance(model.transformer.h[0].mlp.c_proj, kind)
    assert not hasattr(attention, "q_proj")
    assert model.lm_head.onednn == (layout == "onednn")
    vocab = TINY_CONFIGS[config]["vocab_size"]
    ids = torch.randint(1, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
        got = model(ids, output_hidden_states=True)
    assert max_diff(got.logits, expected.logits) < TOL
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert max_diff(mine, theirs) < TOL


@pytest.mark.parametrize("config", sorted(TINY_CONFIGS))
def test_padded_batch_and_logits_to_keep_match_the_reference(tiny_checkpoint, config):
    folder, _ = tiny_checkpoint("causal_lm", config)
    reference = GPTNeoForCausalLM.from_pretrained(folder)
    model = FastCausalLM.from_pretrained(folder)
    ids, mask = padded_batch(TINY_CONFIGS[config]["vocab_size"])
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask)
        got = model(ids, attention_mask=mask)
        last = model(ids, attention_mask=mask, logits_to_keep=1)
    real = mask.bool()
    assert max_diff(got.logits[real], expected.logits[real]) < TOL
    assert max_diff(last.logits[:, 0], expected.logits[:, -1]) < TOL


def test_optimize_for_inference_consumes_the_reference(tiny_checkpoint):
    folder, ref = tiny_checkpoint("causal_lm", "alternating")
    reference = GPTNeoForCausalLM.from_pretrained(folder)
    model = optimize_for_inference(reference)
    assert all(p.is_meta for p in reference.parameters())  # weights moved, not copied
    ids = torch.randint(1, 131, (1, 23))
    with torch.no_grad():
        assert max_diff(model(ids).logits, ref(ids).logits) < TOL
    with pytest.raises(TypeError):
        optimize_for_inference(model)  # type: ignore[arg-type]


def test_cached_decoding_across_the_window_equals_the_full_forward(tmp_path):
    ref = build_reference(
        "causal_lm",
        vocab_size=67,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        max_position_embeddings=128,
    )
    folder = save_reference(ref, tmp_path / "m")
    model = FastCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 67, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ref(ids).logits
        cache = model.new_cache(1, 40)
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 40)]
    assert max_diff(torch.cat(steps, dim=1), full) < TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_gives_the_reference_tokens(tiny_checkpoint, dtype):
    """Greedy batched generation with left padding and dropped rows: same ids as the
    reference model (bf16 too: the packed matrices compute exactly what F.linear does)."""
    folder, _ = tiny_checkpoint("causal_lm", "local_first")
    reference = GPTNeoForCausalLM.from_pretrained(folder, dtype=dtype)
    model = FastCausalLM.from_pretrained(folder, dtype=dtype)

    class Ids:  # token-id prompts need no real tokenizer
        eos_id, bos_id = 0, 0

        class _D:
            def push(self, token_id: int) -> str:
                return f"<{token_id}>"

            def finish(self) -> str:
                return ""

        def encode(self, text: str) -> list[int]:
            raise AssertionError

        def decode(self, ids) -> str:
            return "".join(f"<{i}>" for i in ids)

        def stream_decoder(self):
            return Ids._D()

    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
    config = GenerationConfig(do_sample=False, max_new_tokens=12, ignore_eos=True)
    want = [r.token_ids for r in generate(reference, Ids(), prompts, config)]
    got = [r.token_ids for r in generate(model, Ids(), prompts, config)]
    assert got == want


def test_bf16_on_cpu_keeps_its_cache_in_float32(tiny_checkpoint):
    """A bf16 model's KV cache is float32 on CPU (torch's attention kernel is much faster
    there for a decode step), in KVCache and in the scheduler's RowCache; the decode still
    gives the bf16 reference's logits, and the reference keeps its own dtype."""
    from gptneo_cli.scheduler import Scheduler

    folder, _ = tiny_checkpoint("causal_lm", "alternating")
    reference = GPTNeoForCausalLM.from_pretrained(folder, dtype="bfloat16")
    model = FastCausalLM.from_pretrained(folder, dtype="bfloat16")
    assert reference.cache_dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16 and model.cache_dtype == torch.float32
    cache = model.new_cache(1, 20)
    assert {t.dtype for t in (*cache.keys, *cache.values)} == {torch.float32}
    tokenizer = type("Ids", (), {"eos_id": 0})()
    assert Scheduler(model, tokenizer, max_running=2)._cache.keys[0].dtype == torch.float32
    ids = torch.randint(1, 131, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(ids).logits.float()
        got = [model(ids[:, :5], cache=cache).logits]
        got += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 20)]
    got_all = torch.cat(got, dim=1)
    assert got_all.dtype == torch.bfloat16  # activations and logits stay bf16
    assert (got_all.float() - want).abs().max().item() < 0.03 * (want.max() - want.min()).item()


@pytest.mark.parametrize("layout", ["onednn", "linear"])
def test_bf16_layouts_match_the_reference_bf16(tiny_checkpoint, layout, monkeypatch):
    """Both bf16 layouts gptneo_cli.kernels may choose: prepacked and plain rows."""
    if not fast._mkldnn_packing_works(torch.bfloat16):
        pytest.skip("this torch build has no working oneDNN bf16 packing")
    monkeypatch.setenv("GPTNEO_KERNEL", layout)
    folder, _ = tiny_checkpoint("causal_lm", "alternating")
    reference = GPTNeoForCausalLM.from_pretrained(folder, dtype="bfloat16")
    model = FastCausalLM.from_pretrained(folder, dtype="bfloat16")
    kind = fast.PackedLinear if layout == "onednn" else torch.nn.Linear
    assert isinstance(model.transformer.h[0].mlp.c_fc, kind)
    ids = torch.randint(1, 131, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    assert got.dtype == torch.bfloat16
    # Same kernels: equal up to bf16 rounding of a few ops (one bf16 ulp at these values).
    assert max_diff(got, want) <= 2e-2 * want.abs().max().item()


def test_fast_model_cannot_be_saved(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    with pytest.raises(gptneo_cli.errors.GPTNeoError, match="cannot be saved"):
        FastCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "x")


def test_unknown_quantize_is_a_value_error(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    with pytest.raises(ValueError, match="unknown quantize 'int4'"):
        FastCausalLM.from_pretrained(folder, quantize="int4")


# ---- int8 ---------------------------------------------------------------------------------


def test_quantize_rows_error_is_at_most_half_a_step():
    w = torch.randn(300, 48) * torch.logspace(-3, 1, 300)[:, None]  # very different row scales
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (300,)
    assert int(q.abs().max()) <= 127
    err = (q.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ["int8pack", "fallback"])
def test_int8_logits_stay_close_to_float32(tmp_path, dtype, shape):
    config = INT8_SHAPE if shape == "int8pack" else TINY_CONFIGS["one_layer"]  # width 24
    ref = build_reference("causal_lm", **config)
    folder = save_reference(ref, tmp_path / shape)
    model = FastCausalLM.from_pretrained(folder, dtype=dtype, quantize="int8")
    qkv = model.transformer.h[0].attn.attention.qkv_proj
    assert isinstance(qkv, fast.Int8Linear)
    assert qkv.packed == (shape == "int8pack")
    head, wte = model.lm_head, model.transformer.wte
    if head.panels:  # one int8 matrix for both: the embedding reads the head's quads
        assert isinstance(wte, fast.PanelEmbedding) and wte.panels is head.qpanels
        assert not hasattr(head, "qweight")
    else:
        assert isinstance(wte, fast.Int8Embedding)
        assert head.qweight is wte.qweight  # shared, not copied
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, config["vocab_size"], (2, 21), generator=gen)
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    # int8 weights (and bf16 activations into the int8 kernel): stated tolerance 5 % of the
    # logits' range; random weights make this harsher than a trained model.
    assert max_diff(got, want) < 0.05 * (want.max() - want.min()).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.85


def test_auto_dtype_keeps_float32_around_int8_weights(tmp_path, monkeypatch):
    """dtype "auto" is bf16 on a CPU with native bf16, but float32 with --quantize int8: the
    int8 weights hold agreement with fp32 above 98 % only with float32 around them."""
    from gptneo_cli import device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert device.resolve_dtype("auto", cpu) == torch.bfloat16
    assert device.resolve_dtype("auto", cpu, "int8") == torch.float32
    assert device.resolve_dtype("auto", cpu, "int8-dynamic") == torch.float32
    assert device.resolve_dtype("auto", cpu, "none") == torch.bfloat16
    assert device.resolve_dtype("bfloat16", cpu, "int8") == torch.bfloat16  # asked for
    folder = save_reference(build_reference("causal_lm", **INT8_SHAPE), tmp_path / "m")
    assert (
        FastCausalLM.from_pretrained(folder, dtype="auto", quantize="int8").dtype == torch.float32
    )


def test_int8_memory_is_under_a_third_of_float32(tmp_path):
    ref = build_reference("causal_lm", **{**INT8_SHAPE, "vocab_size": 2048, "hidden_size": 128})
    folder = save_reference(ref, tmp_path / "m")
    fp32 = FastCausalLM.from_pretrained(folder).weight_bytes()
    int8 = FastCausalLM.from_pretrained(folder, quantize="int8").weight_bytes()
    assert int8 <= 0.3 * fp32


def test_int8_dynamic_logits_stay_close_to_float32(tmp_path):
    if not fast.dynamic_int8_available():
        pytest.skip("no fbgemm quantized kernels in this torch build")
    ref = build_reference("causal_lm", **INT8_SHAPE)
    folder = save_reference(ref, tmp_path / "m")
    model = FastCausalLM.from_pretrained(folder, quantize="int8-dynamic")
    assert isinstance(model.transformer.h[0].mlp.c_fc, fast.DynamicInt8Linear)
    ids = torch.randint(1, 203, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    # Activations are rounded to 8 bits too: stated tolerance 8 % of the logits' range.
    assert max_diff(got, want) < 0.08 * (want.max() - want.min()).item()


@pytest.mark.skipif(not (TINY_DEMO / "model.safetensors").is_file(), reason="no demo model")
@pytest.mark.parametrize(
    ("quantize", "path", "floor"),
    [("int8", "prefill", 0.98), ("int8", "decode", 0.98), ("int8-dynamic", "any", 0.95)],
)
def test_int8_top1_agreement_on_the_demo_model(quantize, path, floor):
    """Top-1 agreement with float32, teacher-forced on this package's own source (Python
    code: the demo model's domain): >= 98 % for weight-only int8 (the target), >= 95 % for
    int8-dynamic, which also rounds activations (measured ~96.5 %, see PERFORMANCE.md).

    Weight-only int8 runs two products: many rows (a prompt) convert the int8 matrix for a
    float GEMM, a few rows (decoding) run the int8 kernel. `decode` forces the kernel on
    every row, so the agreement measured is the one decoding gets."""
    if quantize == "int8-dynamic" and not fast.dynamic_int8_available():
        pytest.skip("no fbgemm quantized kernels in this torch build")
    from gptneo_cli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TINY_DEMO)
    text = "\n\n".join(
        p.read_text(encoding="utf-8") for p in sorted(TINY_DEMO.parents[1].glob("*.py"))
    )
    ids = tokenizer.encode(text)[:2048]
    reference = GPTNeoForCausalLM.from_pretrained(TINY_DEMO)
    model = FastCausalLM.from_pretrained(TINY_DEMO, quantize=quantize)
    if path == "decode":
        layers = [m for m in model.modules() if isinstance(m, fast.Int8Linear)]
        assert layers and all(m.packed for m in layers)
        for module in layers:
            module.DEQUANT_ROWS = 1 << 30
    window = reference.config.max_position_embeddings
    same = total = 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            x = torch.tensor([ids[start : start + window]])
            want, got = reference(x).logits.argmax(-1), model(x).logits.argmax(-1)
            same += int((want == got).sum())
            total += want.numel()
    assert same / total >= floor


# ---- compiled decode step -------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_decode_step_equals_eager(tmp_path, quantize):
    """Tiny on purpose: compiling takes ~20 s on two cores. int8 too: its layers must stay
    traceable (our native kernels are not used under compile)."""
    ref = build_reference(
        "causal_lm",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=300,
    )
    folder = save_reference(ref, tmp_path / "m")
    eager = FastCausalLM.from_pretrained(folder, quantize=quantize)
    compiled = FastCausalLM.from_pretrained(folder, quantize=quantize, compile=True)
    ids = torch.randint(0, 64, (1, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ref(ids).logits
        outs = []
        for model in (eager, compiled):
            cache = model.new_cache(1, 14)
            steps = [model(ids[:, :3], cache=cache).logits]
            steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(3, 14)]
            outs.append(torch.cat(steps, dim=1))
    assert compiled.compiled and compiled.new_cache(1, 14).max_length == fast.COMPILE_BUCKET
    if quantize is None:
        assert max_diff(outs[1], outs[0]) < TOL
        assert max_diff(outs[1], full) < TOL
    else:  # eager int8 runs float32 products, compiled int8 torch's kernel on bf16 rows
        spread = (full.max() - full.min()).item()
        assert max_diff(outs[1], outs[0]) < 0.02 * spread


# ---- the reader ------------------------------------------------------------------------------


def test_reader_converts_dtype_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK_BYTES", 100)  # force many small chunks
    tensors = {
        "a": torch.randn(37, 11),
        "b": torch.randn(5).to(torch.float16),
        "ids": torch.arange(7, dtype=torch.int64),
    }
    path = tmp_path / "model.safetensors"
    weights.save_safetensors(tensors, path)
    got = dict(weights.iter_tensors([path], torch.bfloat16))
    assert torch.equal(got["a"], tensors["a"].to(torch.bfloat16))
    assert torch.equal(got["b"], tensors["b"].to(torch.bfloat16))
    assert got["ids"].dtype == torch.int64 and torch.equal(got["ids"], tensors["ids"])
    same = dict(weights.iter_tensors([path]))
    assert torch.equal(same["a"], tensors["a"]) and same["b"].dtype == torch.float16


def test_reader_refuses_offsets_outside_the_file(tmp_path):
    import json
    import struct

    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)  # 8 of 16 bytes
    with pytest.raises(gptneo_cli.errors.WeightsError, match="outside the file"):
        list(weights.iter_tensors([path]))


def test_the_int8_head_recomputes_its_largest_logits_in_float32():
    """Two tokens whose logits differ by less than bf16's step at that size: the int8 kernel's
    bf16 output ties or swaps them; the head's refined top gives the float32 answer."""
    if not fast._int8pack_works(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no int8 kernel in this torch build")
    hidden, vocab = 32, 40
    q = torch.zeros(vocab, hidden, dtype=torch.int8)
    q[:, 0] = torch.arange(vocab, dtype=torch.int8)  # the rest well below the two
    q[7, 0], q[9, 0] = 100, 100
    q[7, 1], q[9, 1] = 1, 2  # token 9 is ahead by one step of the second input
    scales = torch.full((vocab,), 0.16)
    head = fast.Int8Head(q, scales, torch.bfloat16)
    x = torch.zeros(1, 1, hidden)
    x[..., 0], x[..., 1] = 1.0, 0.01  # logits ~16.0: bf16 steps are 0.125, the gap 0.0016
    exact = (x.reshape(1, hidden) @ (q.float() * scales[:, None]).t()).reshape(1, 1, vocab)
    out = head(x)
    assert out.dtype == torch.float32 and out.shape == (1, 1, vocab)
    assert out.argmax(-1).item() == exact.argmax(-1).item() == 9
    top = exact.topk(fast.Int8Head.REFINE, dim=-1).indices
    assert torch.allclose(out.gather(-1, top), exact.gather(-1, top), rtol=0, atol=1e-5)
    plain = fast.Int8Linear(q, scales, None, torch.bfloat16)(x)  # what the head fixes
    assert plain[0, 0, 9].item() == plain[0, 0, 7].item()


@pytest.mark.parametrize("kernel", ["auto", "panels"])
@pytest.mark.parametrize(
    "dtype, quantize",
    [("float32", None), ("bfloat16", None), ("float32", "int8"), ("bfloat16", "int8")]
    + [("float32", "int8-dynamic")] * fast.dynamic_int8_available(),
)
def test_token_ids_outside_the_vocabulary_fail_as_in_the_reference(
    tmp_path, monkeypatch, kernel, dtype, quantize
):
    """Every embedding the fast path builds (the head's panels read back, padded to whole
    panels; int8 rows; the checkpoint's rows) refuses an id past the vocabulary, in the
    panels' padding or negative, with the reference's IndexError instead of a padding row
    or a wrapped-around token; ids inside it give the reference's logits."""
    monkeypatch.setenv("GPTNEO_KERNEL", kernel)
    config = dict(INT8_SHAPE, vocab_size=203)  # 203 = 4 * 48 + 11: a padded last panel
    ref = build_reference("causal_lm", **config)
    folder = save_reference(ref, tmp_path / "m")
    model = FastCausalLM.from_pretrained(folder, dtype=dtype, quantize=quantize)
    native_ready = native.available() and (quantize != "int8" or native.quads_supported())
    if kernel == "panels" and quantize != "int8-dynamic" and native_ready:
        assert isinstance(model.transformer.wte, fast.PanelEmbedding)
    with torch.no_grad():
        for bad in (203, 210, 239, -1, -50):
            ids = torch.tensor([[5, bad, 7]])
            with pytest.raises(IndexError):
                ref(ids)
            with pytest.raises(IndexError):
                model(ids)
        edge = torch.tensor([[0, 202, 201, 191, 192]])  # the first and last rows, a seam
        want, got = ref(edge).logits, model(edge).logits
    assert max_diff(got, want) < 0.05 * (want.max() - want.min()).item()
