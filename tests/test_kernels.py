"""Kernel layouts chosen by measurement (gptneo_cli.kernels): measured once per machine and
shape, cached in the user cache dir, forced by GPTNEO_KERNEL, robust to a broken cache file.
The measurement itself is replaced by a fake here: no test depends on timings."""

from __future__ import annotations

import json

import pytest
import torch

from gptneo_cli import fast, kernels, native
from gptneo_cli.fast import FastCausalLM

pytestmark = pytest.mark.skipif(
    not fast._mkldnn_packing_works(torch.float32),
    reason="layouts are measured only where oneDNN packing works",
)


class FakeMeasure:
    """Stands in for kernels.measure: says `winner` is fastest, counts its calls."""

    def __init__(self, winner: str) -> None:
        self.winner = winner
        self.calls: list[tuple[int, int]] = []
        self.kinds: list[tuple[tuple[int, int], tuple[int, ...]]] = []  # (shape, rows timed)

    def __call__(self, builders, shape, dtype, rows):
        self.calls.append(shape)
        self.kinds.append((shape, tuple(rows)))
        for build in builders.values():  # every candidate really builds for this shape
            module = build(torch.zeros(shape, dtype=dtype))
            assert module(torch.ones(rows[-1], shape[1], dtype=dtype)).shape == (rows[-1], shape[0])
        slow = {str(r): 1.0 for r in rows}
        fast_ = {str(r): 0.5 for r in rows}
        return {name: fast_ if name == self.winner else slow for name in builders}


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GPTNEO_KERNEL", raising=False)
    return tmp_path / "cache" / "gptneo" / "kernels.json"


def _layers(model):
    block = model.transformer.h[0]
    return [block.attn.attention.qkv_proj, block.attn.attention.out_proj, block.mlp.c_fc]


def test_measured_once_then_read_from_the_cache(tiny_checkpoint, cache_home, monkeypatch):
    folder, ref = tiny_checkpoint("causal_lm", "alternating")
    fake = FakeMeasure("columns")
    monkeypatch.setattr(kernels, "measure", fake)
    model = FastCausalLM.from_pretrained(folder)
    assert all(isinstance(m, fast.ColumnLinear) for m in _layers(model))
    assert model.lm_head.onednn  # the head has no columns layout: a tie keeps the default
    shapes = sorted(set(fake.calls))
    # one measurement per shape and kind (the head also times its few-rows product where
    # the native kernel is built), not per layer
    assert len(fake.kinds) == len(set(fake.kinds))
    saved = json.loads(cache_home.read_text())
    assert saved["version"] == kernels.FILE_VERSION
    keys = list(saved["choices"])
    assert len(keys) == len(fake.kinds) and len(shapes) <= len(keys)
    assert all(f"{torch.get_num_threads()} threads" in k and torch.__version__ in k for k in keys)
    assert all(kernels.cpu_model() in k and "float32" in k for k in keys)

    fake.calls.clear()
    again = FastCausalLM.from_pretrained(folder)  # a new load: the file answers
    assert fake.calls == []
    assert all(isinstance(m, fast.ColumnLinear) for m in _layers(again))
    ids = torch.randint(1, 131, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (again(ids).logits - ref(ids).logits).abs().max().item() < 1e-5


def test_a_forced_layout_is_used_without_measuring(tiny_checkpoint, cache_home, monkeypatch):
    folder, _ = tiny_checkpoint("causal_lm", "alternating")

    def never(*args, **kwargs):
        raise AssertionError("measured although GPTNEO_KERNEL forces a layout")

    monkeypatch.setattr(kernels, "measure", never)
    monkeypatch.setenv("GPTNEO_KERNEL", "linear")
    model = FastCausalLM.from_pretrained(folder)
    assert all(type(m) is torch.nn.Linear for m in _layers(model))
    monkeypatch.setenv("GPTNEO_KERNEL", " OneDNN ")
    model = FastCausalLM.from_pretrained(folder)
    assert all(isinstance(m, fast.PackedLinear) for m in _layers(model))
    assert model.lm_head.onednn
    assert not cache_home.exists()


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"version": 99, "choices": {}}', '{"version": 1, "choices": 3}',
             "\xff\xfe"]
)  # fmt: skip
def test_a_corrupt_cache_file_is_measured_again(tiny_checkpoint, cache_home, monkeypatch, text):
    cache_home.parent.mkdir(parents=True)
    cache_home.write_bytes(text.encode("latin-1"))
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    fake = FakeMeasure("linear")
    monkeypatch.setattr(kernels, "measure", fake)
    model = FastCausalLM.from_pretrained(folder)
    assert fake.calls
    assert all(type(m) is torch.nn.Linear for m in _layers(model))
    assert json.loads(cache_home.read_text())["version"] == kernels.FILE_VERSION


def test_a_bad_entry_or_an_unwritable_cache_is_no_crash(tiny_checkpoint, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache dir cannot be created
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    fake = FakeMeasure("onednn")
    monkeypatch.setattr(kernels, "measure", fake)
    model = FastCausalLM.from_pretrained(folder)
    assert all(isinstance(m, fast.PackedLinear) for m in _layers(model))
    cache = kernels.KernelCache(tmp_path / "k.json")
    cache.path.write_text('{"version": 1, "choices": {"k": {"layout": "fastest"}, "j": 1}}')
    assert kernels.KernelCache(cache.path).choices == {}


def test_bad_gptneo_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="must be auto or one of onednn, linear, columns, native"):
        kernels.forced({"GPTNEO_KERNEL": "mkl"})
    assert kernels.forced({"GPTNEO_KERNEL": "auto"}) is None
    assert kernels.forced({}) is None


def test_the_choice_rule():
    # the sum of each layout's times relative to the fastest at that row count
    seconds = {
        "onednn": {"1": 1.0, "64": 1.0},
        "linear": {"1": 0.5, "64": 1.0},  # twice as fast decoding, as fast prefilling
        "columns": {"1": 2.0, "64": 4.0},
    }
    assert kernels.pick(seconds) == "linear"
    # another layout must beat onednn by the margin: 5 % better is noise
    close = {"onednn": {"1": 1.0, "64": 1.0}, "linear": {"1": 0.9, "64": 1.0}}
    assert kernels.pick(close) == "onednn"
    mixed = {"onednn": {"1": 1.0, "64": 1.0}, "linear": {"1": 0.5, "64": 3.0}}
    assert kernels.pick(mixed) == "onednn"  # faster decode does not pay for 3x slower prefill
    assert kernels.pick({"linear": {"1": 1.0}, "columns": {"1": 0.7}}) == "columns"
    near = {"onednn": {"1": 1.0, "64": 1.0}, "native": {"1": 0.95, "64": 1.0}}
    assert kernels.pick(near) == "onednn"  # 2.5 % better: the incumbent stays
    assert kernels.pick(near, incumbent="native") == "native"
    assert kernels.pick({**near, "linear": {"1": 0.5, "64": 0.5}}, incumbent="native") == "linear"


def test_the_real_measurement_times_every_layout():
    builders = fast._layer_builders(torch.float32)
    seconds = kernels.measure(builders, (24, 16), torch.float32, (1, 4))
    ours = {"native", "panels"} if native.available() else set()
    expected = {"onednn", "linear", "columns"} | ours
    assert set(seconds) == expected
    assert all(set(t) == {"1", "4"} and min(t.values()) > 0 for t in seconds.values())


@pytest.mark.skipif(not fast._mkldnn_packing_works(torch.bfloat16), reason="no bf16 packing")
@pytest.mark.parametrize("winner", ["onednn", "linear"])
def test_a_bf16_head_is_a_packed_copy_only_where_it_measured_faster(
    tiny_checkpoint, cache_home, monkeypatch, winner
):
    """bf16 heads choose between reading the embedding in place (TiedHead) and a packed copy
    of it (PackedHead); both give the reference's logits, and the embedding keeps its rows."""
    folder, ref = tiny_checkpoint("causal_lm", "alternating")
    monkeypatch.setattr(kernels, "measure", FakeMeasure(winner))
    model = FastCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    head = model.lm_head
    assert type(head) is (fast.PackedHead if winner == "onednn" else fast.TiedHead)
    if winner == "onednn":  # a copy: the embedding's own matrix is untouched, still plain
        wte = model.transformer.wte.weight
        assert wte.dtype == torch.bfloat16 and wte.shape == ref.transformer.wte.weight.shape
    ids = torch.randint(1, 131, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref.to(torch.bfloat16)(ids).logits.float()
        got = model(ids).logits.float()
    assert (got - want).abs().max().item() < 0.05 * (want.max() - want.min()).item()


class CloseMeasure:
    """Says `rival` is `ahead` (a share) faster than panels at every row count."""

    def __init__(self, rival: str, ahead: float) -> None:
        self.rival, self.ahead = rival, ahead

    def __call__(self, builders, shape, dtype, rows):
        base = {str(r): 1.0 for r in rows}
        quick = {str(r): 1.0 - self.ahead for r in rows}
        return {name: quick if name == self.rival else base for name in builders}


@pytest.mark.skipif(not native.available(), reason="the native step needs our kernels built")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_layout_a_little_ahead_of_panels_does_not_cost_the_native_step(
    tiny_checkpoint, cache_home, monkeypatch, quantize
):
    """The step needs every block matrix as panels and saves more than a few percent of a
    product: a rival measured 20 % ahead keeps panels (and the step) where the step can
    run, and wins where it cannot (GPTNEO_NATIVE_STEP=0) or when it is far ahead."""
    if quantize and not native.quads_supported():
        pytest.skip("int8 panels need VNNI")
    folder, ref = tiny_checkpoint("causal_lm", "local_first")
    monkeypatch.setattr(kernels, "measure", CloseMeasure("linear", 0.2))
    model = FastCausalLM.from_pretrained(folder, quantize=quantize)
    assert model._native_step(), "the step was lost to a per-matrix choice"
    ids = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        got = model(ids[:, :8], cache=cache).logits[:, -1]
        step = model(ids[:, 8:], cache=cache).logits[:, -1]
        want = ref(ids).logits
    tol = 1e-4 if quantize is None else 0.05 * float(want.abs().max())
    assert float((got - want[:, 7]).abs().max()) < tol
    assert float((step - want[:, 8]).abs().max()) < tol

    # the same cached timings, the step switched off: the rival is 20 % ahead and wins
    monkeypatch.setenv("GPTNEO_NATIVE_STEP", "0")
    monkeypatch.setattr(kernels, "measure", FakeMeasure("never called"))
    off = FastCausalLM.from_pretrained(folder, quantize=quantize)
    assert not off._native_step()
    if quantize is None:
        assert all(type(m) is torch.nn.Linear for m in _layers(off))
    else:
        assert not any(m.panels for m in _layers(off))

    # far ahead (2x): the rival wins even where the step could run
    monkeypatch.delenv("GPTNEO_NATIVE_STEP")
    cache_home.unlink()
    monkeypatch.setattr(kernels, "measure", CloseMeasure("linear", 0.5))
    far = FastCausalLM.from_pretrained(folder, quantize=quantize)
    assert not far._native_step()


def test_the_choice_rule_with_a_wider_margin():
    seconds = {"panels": {"1": 1.0, "64": 1.0}, "linear": {"1": 0.8, "64": 0.8}}
    assert kernels.pick(seconds, "panels") == "linear"
    assert kernels.pick(seconds, "panels", kernels.STEP_MARGIN) == "panels"
    far = {"panels": {"1": 1.0, "64": 1.0}, "linear": {"1": 0.5, "64": 0.5}}
    assert kernels.pick(far, "panels", kernels.STEP_MARGIN) == "linear"


def test_cached_timings_that_are_not_well_formed_are_measured_again(tmp_path):
    cache = kernels.KernelCache(tmp_path / "k.json")
    cache.put("a", "linear", {"linear": {"1": 1.0, "8": 2.0}, "panels": {"1": 1.0}})
    cache.put("b", "linear", {"linear": {"1": "fast"}})
    cache.put("c", "linear", {"linear": {"1": 1.0}, "panels": {"1": 0.5}})
    again = kernels.KernelCache(cache.path)
    assert again.seconds("a") is None and again.seconds("b") is None
    assert again.seconds("c") == {"linear": {"1": 1.0}, "panels": {"1": 0.5}}
    assert again.seconds("missing") is None
