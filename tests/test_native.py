"""Our kernels (gptneo_cli/native.py, csrc/gemv.c): built on first use, exact to float32
rounding on ragged shapes, row counts and thread counts, chosen through GPTNEO_KERNEL like the
other layouts, and never in the way: disabled, without a compiler or with a failing one,
the fast path loads with torch's kernels."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from oracle import TINY_CONFIGS

from gptneo_cli import fast, native
from gptneo_cli.fast import FastCausalLM

TINY_DEMO = Path(fast.__file__).parent / "data" / "tiny"
needs_native = pytest.mark.skipif(
    not native.available(), reason="no AVX-512 CPU or no C compiler: the native kernels are off"
)


def unpack_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The [out_features, n] matrix `native.pack_panels` packed (the tests' inverse)."""
    count, n, width = panels.shape
    return panels.transpose(1, 2).reshape(count * width, n)[:out_features]


def unpack_quads(quads: torch.Tensor, out_features: int, n: int) -> torch.Tensor:
    """The [out_features, n] int8 matrix `native.pack_quads` packed."""
    count, n4, width, four = quads.shape
    return quads.permute(0, 2, 1, 3).reshape(count * width, n4 * four)[:out_features, :n]


needs_quads = pytest.mark.skipif(
    not (native.available() and native.quads_supported()), reason="int8 quads need AVX512-VNNI"
)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A process-wide library() answer recomputed under the test's environment and cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.library.cache_clear()
    yield
    native.library.cache_clear()


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 17, 50])
@pytest.mark.parametrize("width", [1, 15, 16, 17, 63, 64, 65, 200])
def test_products_match_torch_on_ragged_shapes(rows, width, threads):
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    w = torch.randn(rows, width, generator=gen)
    x = torch.randn(1, width, generator=gen)
    bias = torch.randn(rows, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.gemv_f32(x, w, bias)
        got_nobias = native.gemv_f32(x, w, None)
        got_bf16 = native.gemv(x.bfloat16(), w.bfloat16(), bias)
    finally:
        torch.set_num_threads(before)
    exact = x.double() @ w.double().t()
    tol = 1e-5 * (1 + width)
    assert got.shape == (1, rows) and got.dtype == torch.float32
    assert (got.double() - (exact + bias.double())).abs().max().item() < tol
    assert (got_nobias.double() - exact).abs().max().item() < tol
    exact_bf16 = x.bfloat16().double() @ w.bfloat16().double().t() + bias.double()
    assert got_bf16.dtype == torch.float32  # float32 sums of the exact bf16 products
    assert (got_bf16.double() - exact_bf16).abs().max().item() < tol


@pytest.mark.parametrize("through", ["native", "torch"])
@pytest.mark.parametrize(("rows", "width"), [(1, 5), (48, 8), (97, 33), (150, 64)])
def test_rows_read_back_from_every_panel_layout(rows, width, through, monkeypatch):
    """A tied embedding looks its rows up in the head's panels: float32 and bf16 panels, bf16
    pairs (odd widths padded), int8 quads; any index shape, repeated and ragged-panel rows;
    through the native gather and through torch's indexing, in the matrix's dtype or
    another."""
    if through == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    gen = torch.Generator().manual_seed(rows * width)
    w = torch.randn(rows, width, generator=gen)
    q = torch.randint(-127, 128, (rows, width), generator=gen, dtype=torch.int8)
    index = torch.randint(0, rows, (3, 7), generator=gen)
    index[0, :2] = rows - 1  # the last (maybe partial) panel
    layouts = [(native.pack_panels(w), w), (native.pack_panels(w.bfloat16()), w.bfloat16())]
    layouts += [(native.pack_quads(q), q)]
    if native.pairs_supported():
        layouts.append((native.panel_weights(w.bfloat16()), w.bfloat16()))
    for packed, matrix in layouts:
        got = native.panel_rows(packed, index, width)
        assert got.dtype == matrix.dtype and torch.equal(got, matrix[index])
        as_float = native.panel_rows(packed, index, width, torch.float32)
        assert as_float.dtype == torch.float32 and torch.equal(as_float, matrix[index].float())
    with pytest.raises(IndexError):  # out of range: torch's own error, never a stray read
        native.panel_rows(
            layouts[0][0], torch.tensor([-(-rows // native.PANEL) * native.PANEL]), width
        )


@pytest.mark.parametrize(("rows", "width"), [(1, 3), (48 * 7 + 5, 2048), (48 * 40, 1100)])
def test_panels_copied_in_stretches_and_sums_in_blocks(rows, width):
    """Large matrices are copied into panels a stretch of rows at a time (telling the caller
    how far it got, to drop those rows' pages) and summed in row blocks; the results are
    those of one whole-matrix copy and sum, at widths where several stretches and blocks
    are needed and where one covers all."""
    gen = torch.Generator().manual_seed(rows + width)
    w = torch.randn(rows, width, generator=gen)
    heard = []
    packed = native.pack_panels(w, heard.append)
    assert torch.equal(unpack_panels(packed, rows), w)
    whole = rows // native.PANEL * native.PANEL
    assert heard == sorted(heard) and (heard[-1] if heard else 0) == whole
    if rows == 48 * 40:  # 7.7 MiB a stretch of 38 panels: two stretches
        assert len(heard) == 2
    block = max(1, 2**20 // width)  # quad_sums' rows a block
    count = 300 if rows == 1 else 2 * block + 7  # one block; three, the last ragged
    q = torch.randint(-127, 128, (count, width), generator=gen, dtype=torch.int8)
    assert torch.equal(native.quad_sums(q), q.int().sum(1))


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 5, 8, 9, 17, 70])
@pytest.mark.parametrize(
    ("rows", "width"), [(1, 16), (7, 15), (47, 64), (48, 1), (49, 17), (150, 200)]
)
def test_panel_products_match_torch(rows, width, batch, threads):
    """Every weight dtype, ragged panels (outputs not a multiple of PANEL), row counts below,
    at and past a block of 8, thread counts that do not divide the panels."""
    gen = torch.Generator().manual_seed(rows * 100 + width + batch)
    w = torch.randn(rows, width, generator=gen)
    x = torch.randn(batch, width, generator=gen)
    bias = torch.randn(rows, generator=gen)
    q = torch.randint(-127, 128, (rows, width), generator=gen, dtype=torch.int8)
    scales = torch.rand(rows, generator=gen) + 0.01
    wb, xb = w.bfloat16(), x.bfloat16()
    cases = [
        (native.pack_panels(w), None, x.double() @ w.double().t()),
        (native.pack_panels(wb), None, x.double() @ wb.double().t()),
    ]
    for matrix, (packed, _, _) in zip((w, wb), cases, strict=True):
        assert packed.shape == (-(-rows // native.PANEL), width, native.PANEL)
        assert torch.equal(unpack_panels(packed, rows), matrix)
    if native.pairs_supported():  # bf16 pairs, odd widths padded: x rounded to bf16 too
        pairs = native.panel_weights(wb)
        assert pairs.dtype == torch.int32 and pairs.shape[1] == -(-width // 2)
        cases.append((pairs, None, xb.double() @ wb.double().t()))
    sums = native.quad_sums(q)
    if native.quads_supported():  # int8: one row by digits, more by FMAs, prompts by pairs
        quads = native.panel_weights(q)
        assert quads.shape == (-(-rows // native.PANEL), -(-width // 4), native.PANEL, 4)
        assert torch.equal(unpack_quads(quads, rows, width), q)
        assert torch.equal(sums, q.int().sum(1))
        cases.append((quads, scales, (x.double() @ q.double().t()) * scales.double()))
        if native.pairs_supported():
            exact_i8 = (xb.double() @ q.double().t()) * scales.double()
            cases.append((quads, scales, exact_i8, True))
    tol = 1e-5 * (1 + width)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for packed, scale, exact, *bf16_x in cases:
            colsum = sums if packed.dtype == torch.int8 else None
            got = native.panels(x, packed, rows, scale, bias, bool(bf16_x), colsum)
            assert got.shape == (batch, rows) and got.dtype == torch.float32
            limit = tol * (128 if scale is not None else 1)
            assert (got.double() - exact - bias.double()).abs().max().item() < limit
            no_bias = native.panels(x, packed, rows, scale, None, bool(bf16_x), colsum)
            assert (no_bias.double() - exact).abs().max().item() < limit
    finally:
        torch.set_num_threads(before)


@needs_quads
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_quads_carry_non_finite_inputs(rows, bad):
    """The one-row loop turns x into fixed point: a NaN or an infinity must still reach the
    output (as NaN), as it does through float products, or generation could not notice."""
    q = torch.randint(
        -127, 128, (50, 40), dtype=torch.int8, generator=torch.Generator().manual_seed(1)
    )
    x = torch.randn(rows, 40)
    x[0, 7] = bad
    got = native.panels(
        x, native.pack_quads(q), 50, torch.ones(50), None, False, native.quad_sums(q)
    )
    assert not torch.isfinite(got[0]).any()
    assert torch.isfinite(got[1:]).all()


@needs_native
def test_panel_layer_runs_every_row_count_and_dtype():
    gen = torch.Generator().manual_seed(7)
    w, bias = torch.randn(50, 40, generator=gen), torch.randn(50, generator=gen)
    layer = fast.PanelLinear(w, bias)
    assert not hasattr(layer, "weight")  # the panels are the only copy
    for shape in ((1, 1, 40), (2, 3, 40), (1, 64, 40), (0, 40)):
        xs = torch.randn(*shape, generator=gen)
        want = xs.double() @ w.double().t() + bias.double()
        got = layer(xs)
        assert got.shape == (*shape[:-1], 50) and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, atol=1e-4)
    head = fast.PanelLinear(w.bfloat16(), None)  # a bf16 head: bf16 in, bf16 out
    xb = torch.randn(3, 40, generator=gen).bfloat16()
    got = head(xb)
    assert got.dtype == torch.bfloat16
    want = xb.double() @ w.bfloat16().double().t()
    assert (got.double() - want).abs().max().item() < 0.02 * want.abs().max().item()


@needs_native
def test_a_non_contiguous_row_is_read_correctly():
    w = torch.randn(9, 40)
    x = torch.randn(40, 3)[:, 1].unsqueeze(0)  # a strided view
    assert not x.is_contiguous()
    assert torch.allclose(native.gemv_f32(x, w, None), x @ w.t(), atol=1e-5)


@needs_native
@pytest.mark.parametrize("layout", ["native", "panels"])
@pytest.mark.parametrize("config", sorted(TINY_CONFIGS))
def test_forced_kernels_decode_like_the_reference(tiny_checkpoint, config, layout, monkeypatch):
    """Prefill, one-row decode steps and a 6-row step (a verify) give the reference's logits
    at every step: the row kernel (more rows: oneDNN in place) or the panel kernel (all)."""
    monkeypatch.setenv("GPTNEO_KERNEL", layout)
    folder, ref = tiny_checkpoint("causal_lm", config)
    model = FastCausalLM.from_pretrained(folder)
    block = model.transformer.h[0]
    kind = fast.NativeLinear if layout == "native" else fast.PanelLinear
    assert isinstance(block.attn.attention.qkv_proj, kind)
    assert isinstance(block.mlp.c_proj, kind)
    if layout == "native":
        assert model.lm_head.native
    else:
        assert isinstance(model.lm_head, fast.PanelLinear)
    vocab = TINY_CONFIGS[config]["vocab_size"]
    ids = torch.randint(1, vocab, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        cache = model.new_cache(1, 30)
        got = [model(ids[:, :6], cache=cache).logits]
        for t in range(6, 24):  # past the local window: the ring wraps
            got.append(model(ids[:, t : t + 1], cache=cache).logits)
        got.append(model(ids[:, 24:30], cache=cache).logits)  # 6 rows
    assert (torch.cat(got, dim=1) - want).abs().max().item() < 1e-4


@needs_native
@pytest.mark.parametrize("layout", ["native", "panels", "panels without bf16 dot products"])
def test_forced_kernels_bf16_decode_like_the_bf16_reference(tiny_checkpoint, layout, monkeypatch):
    """The row kernel (bf16 rows in place) or the panels (bf16 pairs through AVX512-BF16 dot
    products where the CPU has them, else float32 FMAs on bf16 panels), prompt, decode
    steps and a 5-row step."""
    if layout.startswith("panels "):
        monkeypatch.setattr(native, "pairs_supported", lambda: False)  # an older AVX-512 CPU
    monkeypatch.setenv("GPTNEO_KERNEL", layout.split()[0])
    folder, ref = tiny_checkpoint("causal_lm", "alternating")
    model = FastCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if layout == "native":
        assert isinstance(model.transformer.h[0].mlp.c_fc, fast.NativeLinear)
        assert isinstance(model.lm_head, fast.TiedHead) and model.lm_head.native  # no copy
    else:
        assert isinstance(model.transformer.h[0].mlp.c_fc, fast.PanelLinear)
        assert isinstance(model.lm_head, fast.PanelLinear)
        pairs = torch.int32 if native.pairs_supported() else torch.bfloat16
        assert model.lm_head.panels.dtype == pairs
    ids = torch.randint(1, 131, (1, 20), generator=torch.Generator().manual_seed(5))
    reference = ref.to(torch.bfloat16)
    with torch.no_grad():
        want = reference(ids).logits.float()
        cache = model.new_cache(1, 20)
        got = [model(ids[:, :4], cache=cache).logits]
        got += [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 15)]
        got.append(model(ids[:, 15:20], cache=cache).logits)
    got_all = torch.cat(got, dim=1).float()
    assert got_all.dtype == torch.float32 and got[-1].dtype == torch.bfloat16
    assert (got_all - want).abs().max().item() < 0.03 * (want.max() - want.min()).item()


@needs_quads
@pytest.mark.parametrize("dot", [True, False])
@pytest.mark.parametrize("rows", [1, 6, 16, 17, 63, 64, 200])
def test_int8_panel_products_are_float32_exact(tiny_checkpoint, monkeypatch, rows, dot):
    """With the panel kernel an int8 layer's product below PANEL_BF16_ROWS rows (what a
    decode step or a verify runs) is the float32 product of the int8 values and scales (no
    bf16 activations), and the head needs no refinement; from there on (a prompt) the
    activations are rounded to bf16
    where the CPU has the dot-product kernel, and the head refines its top logits from rows
    read back from its quads (which the embedding reads too)."""
    if not dot:  # a CPU without AVX512-BF16: prompts stay float32 too
        monkeypatch.setattr(native, "pairs_supported", lambda: False)
    monkeypatch.setenv("GPTNEO_KERNEL", "panels")
    folder, _ = tiny_checkpoint("causal_lm", "alternating")
    model = FastCausalLM.from_pretrained(folder, quantize="int8")
    layer, head = model.transformer.h[1].mlp.c_fc, model.lm_head
    assert isinstance(layer, fast.Int8Linear) and layer.panels and head.panels
    assert not hasattr(layer, "qweight")  # only the panels are kept
    assert model.transformer.wte.panels is head.qpanels  # shared with the embedding
    assert not hasattr(head, "qweight")  # held once
    head_rows = unpack_quads(head.qpanels, head.out_features, head.in_features)
    rows_of = unpack_quads(layer.qpanels, layer.out_features, head.in_features)
    x = torch.randn(1, rows, rows_of.shape[1])
    if rows >= fast.Int8Linear.PANEL_BF16_ROWS and native.pairs_supported():
        x = x.bfloat16().float()  # what the kernel multiplies: exact on these
    exact = x[0] @ (rows_of.float() * layer.scales32[:, None]).t() + layer.bias
    assert (layer(x)[0] - exact).abs().max().item() < 1e-5 * max(1.0, exact.abs().max())
    h = torch.randn(1, rows, head.in_features)
    exact_head = h[0] @ (head_rows.float() * head.scales32[:, None]).t()
    got_head = head(h)[0]
    tol = 1e-5 if rows < fast.Int8Linear.PANEL_BF16_ROWS else 0.05  # bf16 dot products for a prompt
    assert (got_head - exact_head).abs().max().item() < tol * max(1.0, exact_head.abs().max())
    if rows >= fast.Int8Linear.PANEL_BF16_ROWS:  # refined: each row's top logit is exact
        top = got_head.argmax(-1, keepdim=True)
        assert torch.allclose(got_head.gather(-1, top), exact_head.gather(-1, top), atol=1e-4)


@needs_quads
def test_a_batch_of_decode_steps_stays_float32_however_many_rows(tiny_checkpoint, monkeypatch):
    """bf16 activations are for prompts (many tokens of one sequence); 80 sequences of one
    token each are decode steps: float32 products, as one sequence's."""
    monkeypatch.setenv("GPTNEO_KERNEL", "panels")
    folder, _ = tiny_checkpoint("causal_lm", "alternating")
    layer = FastCausalLM.from_pretrained(folder, quantize="int8").transformer.h[0].mlp.c_fc
    rows_of = unpack_quads(layer.qpanels, layer.out_features, layer.in_features)
    x = torch.randn(80, 1, layer.in_features)
    exact = x[:, 0] @ (rows_of.float() * layer.scales32[:, None]).t() + layer.bias
    assert (layer(x)[:, 0] - exact).abs().max().item() < 1e-5 * max(1.0, exact.abs().max())
    prompt = x.view(1, 80, -1)  # the same rows as one sequence's prompt: bf16 activations
    if native.pairs_supported():
        assert (layer(prompt)[0] - exact).abs().max().item() > 1e-4 * exact.abs().max()


@needs_native
@pytest.mark.skipif(not (TINY_DEMO / "model.safetensors").is_file(), reason="no demo model")
def test_int8_decode_steps_agree_with_float32_on_the_demo_model(monkeypatch):
    """Issue 14's floor on what decoding really runs: one token at a time with the cache
    (teacher-forced on this package's source), int8 panels vs the float32 reference."""
    from gptneo_cli.modeling import GPTNeoForCausalLM
    from gptneo_cli.tokenizer import load_tokenizer

    monkeypatch.setenv("GPTNEO_KERNEL", "panels")
    text = (Path(fast.__file__).parent / "scheduler.py").read_text(encoding="utf-8")
    ids = load_tokenizer(TINY_DEMO).encode(text)[:1024]
    reference = GPTNeoForCausalLM.from_pretrained(TINY_DEMO)
    model = FastCausalLM.from_pretrained(TINY_DEMO, quantize="int8")
    assert model.lm_head.panels
    window = reference.config.max_position_embeddings
    same = 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            x = torch.tensor([ids[start : start + window]])
            want = reference(x).logits.argmax(-1)[0].tolist()
            cache = model.new_cache(1, x.shape[1])
            for t, token in enumerate(want):
                same += int(int(model(x[:, t : t + 1], cache=cache).logits.argmax()) == token)
    assert same / len(ids) >= 0.98


def test_disabled_by_the_environment(fresh_native, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("GPTNEO_NATIVE", "0")
    monkeypatch.setenv("GPTNEO_KERNEL", "native")  # forced, but there is none: the default
    assert not native.available()
    folder, ref = tiny_checkpoint("causal_lm", "alternating")
    model = FastCausalLM.from_pretrained(folder)
    assert not any(isinstance(m, fast.NativeLinear | fast.PanelLinear) for m in model.modules())
    ids = torch.randint(1, 131, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max().item() < 1e-4


@pytest.mark.skipif(not native.cpu_supported(), reason="the build is only tried on AVX-512 CPUs")
def test_a_failing_compiler_is_one_warning_and_torch_kernels(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # exits 1 without output
    with caplog.at_level(logging.WARNING, logger="gptneo"):
        assert native.library() is None
    assert "native kernels unavailable (false failed: exit 1); using torch's" in caplog.text


def test_no_compiler_means_no_native_kernels(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.library() is None


@needs_native
def test_built_once_then_loaded_from_the_cache(fresh_native, tmp_path):
    assert native.library() is not None
    built = list((tmp_path / "cache" / "gptneo" / "native").glob("gemv-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # opened, not rebuilt
    assert not list(built[0].parent.glob(".gemv-*"))  # no temporary left behind


def test_status_says_why_without_building(fresh_native, monkeypatch, tmp_path):
    monkeypatch.setenv("GPTNEO_NATIVE", "0")
    assert native.status() == "off (GPTNEO_NATIVE=0)"
    monkeypatch.delenv("GPTNEO_NATIVE")
    if not native.cpu_supported():
        assert native.status().startswith("unavailable (needs an x86-64 CPU with AVX-512")
        return
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.status() == "unavailable (no C compiler: set CC or install gcc)"
    monkeypatch.delenv("CC")
    if native.compiler() is None:
        return
    assert native.status().startswith("not built yet")
    assert not (tmp_path / "cache" / "gptneo" / "native").exists()  # status built nothing
    if native.available():
        assert native.status() == "built"


def test_links_the_openmp_runtime_torch_loaded():
    """The kernels share torch's OpenMP thread pool: the library is linked against the
    runtime file this process has mapped (wheels may name it differently from the system's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        pytest.skip("no /proc/self/maps here")
    loaded = {line.split()[-1] for line in maps.splitlines() if "omp" in line.rsplit("/", 1)[-1]}
    link = native._link_openmp()
    if not loaded:
        assert link == ("-fopenmp",)
    else:
        assert link[0] in loaded and Path(link[0]).name.startswith(native.OPENMP_NAMES)


def test_a_missing_source_is_unavailable_not_a_crash(fresh_native, monkeypatch, tmp_path):
    """An installation without csrc/gemv.c: info says so, loading uses torch's kernels."""
    monkeypatch.setattr(native, "SOURCE", tmp_path / "nowhere" / "gemv.c")
    if native.cpu_supported() and native.compiler() is not None:
        assert native.status().startswith("unavailable (")
    assert native.library() is None


def _mapped_checkpoint(folder: Path) -> Path:
    """A checkpoint whose embedding (500 x 64 float32, 125 KiB) is big enough to be mapped."""
    from gptneo_cli.modeling import GPTNeoConfig, GPTNeoForCausalLM

    config = {"vocab_size": 500, "hidden_size": 64, "num_layers": 2, "num_heads": 4}
    config["attention_types"] = [[["global", "local"], 1]]
    GPTNeoForCausalLM(GPTNeoConfig.from_dict({"model_type": "gpt_neo", **config})).save_pretrained(
        folder
    )
    return folder


def test_released_pages_read_back_from_the_file(tmp_path):
    from gptneo_cli import weights
    from gptneo_cli.modeling import GPTNeoForCausalLM

    model = GPTNeoForCausalLM.from_pretrained(_mapped_checkpoint(tmp_path))
    wte = model.transformer.wte.weight
    before = wte.detach().clone()
    assert weights.release_pages(wte)  # a mapping of the file: its pages may go
    assert torch.equal(wte, before)  # and come back from the file
    assert not weights.release_pages(before)  # an ordinary tensor: left alone
    rows = wte.shape[0]
    for start, stop in ((0, 1), (0, rows // 3), (rows // 3, rows - 1), (rows - 2, rows + 5)):
        assert weights.release_pages(wte, start, stop)  # some rows' whole pages
        assert torch.equal(wte, before)


@needs_native
def test_a_panel_head_releases_the_embedding_pages_only_when_loaded_from_the_file(
    tmp_path, monkeypatch
):
    """FastCausalLM.from_pretrained drops the embedding's pages as it copies them into the
    head's panels (lookups then read the panels) and still matches the reference;
    optimize_for_inference never does, since a reference model's mapped pages may hold
    changes made in memory (fine-tuning), which dropping them before the copy would undo."""
    from gptneo_cli.modeling import GPTNeoForCausalLM

    folder = _mapped_checkpoint(tmp_path)
    released = []
    real = fast.release_pages
    monkeypatch.setattr(
        fast, "release_pages", lambda t, *rows: released.append((rows, real(t, *rows))) or True
    )
    monkeypatch.setenv("GPTNEO_KERNEL", "panels")
    model = FastCausalLM.from_pretrained(folder)
    assert isinstance(model.lm_head, fast.PanelLinear)
    # the copied rows' pages as the copy goes (from row 0), then all of them
    assert released[-1] == ((), True) and all(ok for _, ok in released)
    assert [rows[0] for rows, _ in released[:-1]] == [0] * (len(released) - 1)
    count = len(released)
    reference = GPTNeoForCausalLM.from_pretrained(folder)
    ids = torch.randint(1, 500, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
        reference.transformer.wte.weight.add_(1.0)  # changed in memory, not in the file
        changed = reference.transformer.wte.weight.clone()
        optimized = fast.optimize_for_inference(reference)
    assert len(released) == count  # not called again
    every = torch.arange(changed.shape[0])
    assert isinstance(model.transformer.wte, fast.PanelEmbedding)  # the head's panels, read
    assert torch.equal(optimized.transformer.wte(every), changed)  # back as they were made


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None off Linux."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.is_file():
        return None
    text = path.read_text()
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def _huge_kib(tensor: torch.Tensor) -> int:
    """AnonHugePages (KiB) of the mapping that holds `tensor`'s first byte (/proc/self/smaps)."""
    address, current = tensor.data_ptr(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            current = start <= address < end
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_huge_empty_shapes_arenas_and_fallbacks(monkeypatch):
    monkeypatch.setenv("GPTNEO_HUGE_PAGES", "1")
    cpu = torch.device("cpu")
    big = native.huge_empty((3, 700, 400), torch.float32, cpu)  # 3.2 MiB: its own region
    assert big.shape == (3, 700, 400) and big.dtype == torch.float32 and big.is_contiguous()
    if _thp_mode() is not None:
        assert big.data_ptr() % native.HUGE_PAGE == 0
    small = native.huge_empty((10, 10), torch.int8, cpu)  # no arena: plain
    assert small.shape == (10, 10)
    arena = native.HugeArena()
    with native.huge_arena(arena):
        parts = [
            native.huge_empty((n, 48), dtype, cpu)
            for n, dtype in [
                (5000, torch.int8),
                (1, torch.float32),
                (3000, torch.bfloat16),
                (77, torch.int32),
            ]
        ]
        with native.huge_arena(None):  # suspended: the kernel measurement's candidates
            alone = native.huge_empty((100, 100), torch.float32, cpu)
    assert native._ARENA.get() is None
    starts = [p.data_ptr() for p in parts]
    assert all(s % 4096 == 0 for s in starts) and starts == sorted(starts)
    storages = {p.untyped_storage().data_ptr() for p in parts}
    assert len(storages) == 1 and alone.untyped_storage().data_ptr() not in storages
    for i, p in enumerate(parts):  # no overlaps: each keeps what is written to it
        p.fill_(i + 1)
    assert [int(p.float().mean()) for p in parts] == [1, 2, 3, 4]
    with native.huge_arena(arena):  # past a chunk: a new one
        over = native.huge_empty((native.HugeArena.CHUNK - 4096,), torch.uint8, cpu)
    assert over.untyped_storage().data_ptr() not in storages
    monkeypatch.setenv("GPTNEO_HUGE_PAGES", "0")
    with native.huge_arena(native.HugeArena()):
        plain = native.huge_empty((3, 700, 400), torch.float32, cpu)
    assert plain.untyped_storage().nbytes() == 3 * 700 * 400 * 4  # torch.empty's own


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages off")
def test_huge_empty_memory_is_backed_by_huge_pages(monkeypatch):
    """Where THP is "madvise" (or "always"), the advised region's pages are 2 MiB ones once
    touched; the kernel may still refuse under memory pressure, so most, not all."""
    monkeypatch.setenv("GPTNEO_HUGE_PAGES", "1")
    t = native.huge_empty((16 << 20,), torch.uint8, torch.device("cpu"))
    t.fill_(1)
    assert _huge_kib(t) >= 8 << 10


@needs_quads
def test_a_loaded_model_carves_its_panels_from_shared_chunks(tiny_checkpoint, monkeypatch):
    """Loading opens an arena: an int8 model's small matrices share chunks (a few storages
    for all of them) and still decode like before (the other tests)."""
    monkeypatch.setenv("GPTNEO_KERNEL", "panels")
    monkeypatch.setenv("GPTNEO_HUGE_PAGES", "1")
    folder, _ = tiny_checkpoint("causal_lm", "alternating")
    model = FastCausalLM.from_pretrained(folder, quantize="int8")
    panels = [m.qpanels for m in model.modules() if isinstance(m, fast.Int8Linear) and m.panels]
    assert len(panels) > 4
    assert len({p.untyped_storage().data_ptr() for p in panels}) < len(panels)
    assert native._ARENA.get() is None  # closed after the load


def test_huge_pages_are_asked_for_where_the_model_stays_loaded(monkeypatch, tmp_path):
    """GPTNEO_HUGE_PAGES decides; unset, one-shot commands keep ordinary pages and the
    CLI's long-running loads (serve, batch, chat) turn huge pages on."""
    from gptneo_cli.cli import loading

    monkeypatch.setattr(native, "HUGE_PAGES_DEFAULT", False)
    assert not native.huge_pages({})
    assert native.huge_pages({"GPTNEO_HUGE_PAGES": "1"})
    assert not native.huge_pages({"GPTNEO_HUGE_PAGES": "off"})
    monkeypatch.delenv("GPTNEO_HUGE_PAGES", raising=False)
    plain = native.huge_empty((3 << 20,), torch.uint8, torch.device("cpu"))
    assert plain.untyped_storage().nbytes() == 3 << 20  # torch.empty's own

    def stop(*args):
        raise StopIteration

    monkeypatch.setattr(loading.threads, "apply", stop)  # stop right after the switch
    options = loading.ModelOptions(str(tmp_path), None, "cpu", "float32", "auto")
    with pytest.raises(StopIteration):
        loading.load_model(options)
    assert not native.HUGE_PAGES_DEFAULT
    with pytest.raises(StopIteration):
        loading.load_model(options, long_running=True)
    assert native.HUGE_PAGES_DEFAULT and native.huge_pages({})
    assert not native.huge_pages({"GPTNEO_HUGE_PAGES": "0"})
