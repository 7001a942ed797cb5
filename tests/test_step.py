"""The native decode step (gptneo_cli/step.py, csrc/gemv.c decode_step) against the torch
path and transformers: float32, bf16 and int8 panels, ragged widths (head sizes and inner
widths that are not multiples of 16, odd widths for bf16 pairs), local rings wrapped many
times, batches losing rows, several new tokens per row (verifies, short prompts) and rings
with spare slots after rejected drafts; and every case it must leave to the torch path."""

from __future__ import annotations

import threading

import pytest
import torch
from oracle import build_reference, save_reference

from gptneo_cli import native, step
from gptneo_cli.fast import FastCausalLM

pytestmark = pytest.mark.skipif(
    not native.available(), reason="no AVX-512 CPU or no C compiler: the native kernels are off"
)

#: Widths chosen to hit every tail: head_dim 8 and 9, inner 70 and 33 (odd: a padded pair),
#: hidden 45 (odd), windows far shorter than the decoded length; head sizes 64 and 128 (the
#: real models': attention in registers, 4 and 8 vectors) and 144 (through memory).
SHAPES = {
    "ragged": dict(
        vocab_size=103,
        hidden_size=40,
        num_heads=5,
        num_layers=3,
        attention_types=[[["local", "global"], 1], [["local"], 1]],
        window_size=5,
        intermediate_size=70,
    ),
    "odd": dict(
        vocab_size=89,
        hidden_size=45,
        num_heads=5,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        window_size=7,
        intermediate_size=33,
    ),
    "heads64": dict(
        vocab_size=75,
        hidden_size=128,
        num_heads=2,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        window_size=19,
        intermediate_size=48,
    ),
    "heads128": dict(
        vocab_size=60,
        hidden_size=256,
        num_heads=2,
        num_layers=2,
        attention_types=[[["local", "global"], 1]],
        window_size=23,
        intermediate_size=32,
    ),
    "heads144": dict(
        vocab_size=50,
        hidden_size=144,
        num_heads=1,
        num_layers=2,
        attention_types=[[["local", "global"], 1]],
        window_size=21,
        intermediate_size=32,
    ),
    "wide": dict(
        vocab_size=211,
        hidden_size=96,
        num_heads=3,
        num_layers=2,
        attention_types=[[["local", "global"], 1]],
        window_size=9,
    ),
}
STEPS = 40


@pytest.fixture
def panels(monkeypatch):
    monkeypatch.setenv("GPTNEO_KERNEL", "panels")


def checkpoint(tmp_path, shape: str, **overrides):
    config = {**SHAPES[shape], "max_position_embeddings": 96, **overrides}
    ref = build_reference("causal_lm", **config)
    return save_reference(ref, tmp_path / shape), ref


def load(folder, **kwargs) -> FastCausalLM:
    model = FastCausalLM.from_pretrained(folder, **kwargs)
    assert isinstance(model._native_step(), step.NativeStep)
    return model


def decode(model: FastCausalLM, ids: torch.Tensor, native_step: bool, spare: int = 0):
    """Logits of a 3-token prefill, then of every later token fed one at a time."""
    model.__dict__["_native"] = None if native_step else False
    with torch.no_grad():
        cache = model.new_cache(ids.shape[0], ids.shape[1], spare=spare)
        out = [model(ids[:, :3], cache=cache).logits.float()]
        out += [
            model(ids[:, t : t + 1], cache=cache).logits.float() for t in range(3, ids.shape[1])
        ]
    return torch.cat(out, dim=1)


@pytest.fixture
def counted(monkeypatch):
    """How many native steps ran: a test that expects the native path proves it did."""
    calls = []
    run = step.NativeStep.__call__

    def counting(self, input_ids, cache, positions=None, logits=False):
        calls.append(input_ids.shape[0])
        return run(self, input_ids, cache, positions, logits)

    monkeypatch.setattr(step.NativeStep, "__call__", counting)
    return calls


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_float32_steps_equal_transformers_and_the_torch_path(tmp_path, panels, counted, shape):
    folder, ref = checkpoint(tmp_path, shape)
    model = load(folder)
    ids = torch.randint(
        0, SHAPES[shape]["vocab_size"], (2, STEPS), generator=torch.Generator().manual_seed(1)
    )
    got = decode(model, ids, True)
    assert len(counted) == STEPS - 2  # the 3-token prompt too
    with torch.no_grad():
        want = ref(ids).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (got - decode(model, ids, False)).abs().max().item() < 1e-4


@pytest.mark.parametrize("dot", [True, False])
@pytest.mark.parametrize("shape", ["ragged", "odd"])
def test_bf16_steps_stay_within_bf16_of_float32(tmp_path, panels, counted, monkeypatch, shape, dot):
    """bf16 panels (as pairs for the dot-product kernel, or float32 FMAs on a CPU without
    it): the native step is at least as close to float32 as the torch path's bf16."""
    if not dot:
        monkeypatch.setattr(native, "pairs_supported", lambda: False)
    elif not native.pairs_supported():
        pytest.skip("the CPU has no AVX512-BF16")
    folder, ref = checkpoint(tmp_path, shape)
    model = load(folder, dtype=torch.bfloat16)
    kind = model.transformer.h[0].mlp.c_proj.panels.dtype
    assert kind == (torch.int32 if dot else torch.bfloat16)
    ids = torch.randint(
        0, SHAPES[shape]["vocab_size"], (1, STEPS), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        want = ref(ids).logits
    got = decode(model, ids, True)
    assert counted
    torch_error = (decode(model, ids, False) - want).abs().max().item()
    native_error = (got - want).abs().max().item()
    assert native_error < 0.03 * (want.max() - want.min()).item()
    assert native_error <= 1.5 * torch_error + 1e-3


needs_quads = pytest.mark.skipif(not native.quads_supported(), reason="int8 quads need VNNI")


@needs_quads
@pytest.mark.parametrize("shape", ["ragged", "wide"])
def test_int8_steps_equal_the_torch_path(tmp_path, panels, counted, shape):
    """int8 panels below 64 rows are float32-exact on both paths."""
    folder, _ = checkpoint(tmp_path, shape)
    model = load(folder, quantize="int8")
    ids = torch.randint(
        0, SHAPES[shape]["vocab_size"], (3, STEPS), generator=torch.Generator().manual_seed(3)
    )
    got = decode(model, ids, True)
    assert len(counted) == STEPS - 2  # the 3-token prompt too
    assert (got - decode(model, ids, False)).abs().max().item() < 1e-4


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_any_thread_count_and_a_second_thread_give_the_same_logits(
    tmp_path, panels, counted, quantize
):
    """The step synchronises its team with its own barrier (OpenMP's sleeps in the kernel
    once a second thread has a pool: 3x slower steps on a server's scheduler thread). One
    thread, two, more threads than CPUs (they must yield to each other) and a step run on
    another Python thread give the same logits: every output is computed by one thread."""
    if quantize and not native.quads_supported():
        pytest.skip("int8 quads need VNNI")
    folder, _ = checkpoint(tmp_path, "wide")
    model = load(folder, quantize=quantize)
    ids = torch.randint(0, 211, (3, STEPS), generator=torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(decode(model, ids, True))
    finally:
        torch.set_num_threads(before)
    worker = threading.Thread(target=lambda: results.append(decode(model, ids, True)))
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive() and len(results) == 5
    assert len(counted) == 5 * (STEPS - 2)
    for got in results[1:]:
        assert torch.equal(got, results[0])


def test_rows_leaving_the_batch_and_rejected_drafts(tmp_path, panels, counted):
    """keep_rows replaces the cache's buffers (the step must follow them), and a ring with
    spare slots truncated after rejected drafts keeps giving the torch path's logits."""
    folder, _ = checkpoint(tmp_path, "ragged")
    model = load(folder)
    ids = torch.randint(0, 103, (3, STEPS), generator=torch.Generator().manual_seed(4))

    def run(native_step: bool) -> list[torch.Tensor]:
        model.__dict__["_native"] = None if native_step else False
        out = []
        with torch.no_grad():
            cache = model.new_cache(3, STEPS, spare=4)
            model(ids[:, :3], cache=cache)
            for t in range(3, 20):
                out.append(model(ids[:, t : t + 1], cache=cache).logits)
            cache.keep_rows(torch.tensor([0, 2]))
            for t in range(20, 30):
                out.append(model(ids[[0, 2], t : t + 1], cache=cache).logits)
            cache.truncate(cache.length - 3)  # three drafts rejected
            for t in range(27, STEPS):
                out.append(model(ids[[0, 2], t : t + 1], cache=cache).logits)
        return out

    got = run(True)
    assert len(counted) == 1 + 17 + 10 + 13  # the prompt too: 3 tokens, room in the ring
    for a, b in zip(got, run(False), strict=True):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("quantize", [None, pytest.param("int8", marks=needs_quads)])
def test_verifies_of_several_tokens_equal_the_torch_path(tmp_path, panels, counted, quantize):
    """A speculative loop's shape: a short prompt (from an empty cache), then verifies of
    1-6 tokens with some rejected (truncate), in a ring with 5 spare slots, window 5."""
    folder, ref = checkpoint(tmp_path, "ragged")
    model = load(folder, quantize=quantize)
    ids = torch.randint(0, 103, (2, 60), generator=torch.Generator().manual_seed(5))
    plan = [(4, 0), (6, 2), (1, 0), (5, 4), (6, 0), (3, 1), (6, 5), (2, 0), (6, 3)]

    def run(native_step: bool) -> list[torch.Tensor]:
        model.__dict__["_native"] = None if native_step else False
        out = []
        with torch.no_grad():
            cache = model.new_cache(2, 60, spare=5)
            at = 0
            for new, rejected in plan:
                out.append(model(ids[:, at : at + new], cache=cache).logits)
                cache.truncate(cache.length - rejected)
                at = cache.length
        return out

    got = run(True)
    assert len(counted) == len(plan)
    for a, b in zip(got, run(False), strict=True):
        assert (a - b).abs().max().item() < 1e-4
    if quantize is None:  # and the last verify against transformers' full forward
        with torch.no_grad():
            want = ref(ids[:, : sum(n - r for n, r in plan[:-1]) + plan[-1][0]]).logits
        assert (got[-1] - want[:, -plan[-1][0] :]).abs().max().item() < 1e-4


@pytest.mark.parametrize("quantize", [None, pytest.param("int8", marks=needs_quads)])
def test_scheduler_rows_each_at_their_own_position(tmp_path, panels, counted, quantize):
    """The server's scheduler: rows join at different steps (so they sit at different
    positions, past the window, in caches that grow rows and positions while they run), and
    every decode call runs the native step; each request's tokens and log-probabilities
    equal those of the same schedule on the torch path."""
    from test_scheduler import NumberTokenizer

    from gptneo_cli.generation import GenerationConfig
    from gptneo_cli.rowcache import RowCache
    from gptneo_cli.scheduler import Request, Scheduler

    folder, _ = checkpoint(tmp_path, "ragged")
    model = load(folder, quantize=quantize)
    config = GenerationConfig(do_sample=False, ignore_eos=True, logprobs=2)
    lengths, budgets = [3, 17, 1, 9, 30, 6], [20, 8, 14, 25, 10, 16]
    join_at = {0: [0, 1], 1: [2], 3: [3, 4], 9: [5]}

    def schedule(native_step: bool) -> list:
        model.__dict__["_native"] = None if native_step else False
        sched = Scheduler(model, NumberTokenizer(), max_running=6, prefill_chunk=7)
        sched._ensure_thread = lambda: None  # no thread: step() by hand
        sched._cache = RowCache(model.config, 6, capacity=8, initial_rows=2)
        sched._pcache = RowCache(model.config, 2, capacity=4)
        requests = []
        with torch.inference_mode():
            for at in range(200):
                for i in join_at.get(at, []):
                    ids = torch.randint(
                        1, 103, (lengths[i],), generator=torch.Generator().manual_seed(i)
                    )
                    requests.append(sched.submit(Request(ids.tolist(), config, budgets[i])))
                if len(requests) == 6 and all(r.done for r in requests):
                    break
                sched.step()
        return [r.result for r in requests]

    got = schedule(True)
    steps = len(counted)
    assert steps >= max(budgets) - 1 and max(counted) > 1  # decode calls, several rows
    want = schedule(False)
    assert len(counted) == steps  # the torch path's run never called it
    for mine, theirs in zip(got, want, strict=True):
        assert mine.token_ids == theirs.token_ids
        for a, b in zip(mine.logprobs, theirs.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4


def test_what_the_step_leaves_to_the_torch_path(tmp_path, panels):
    folder, _ = checkpoint(tmp_path, "ragged", max_position_embeddings=300)
    model = load(folder)
    native_step = model._native_step()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(ids[:, :3], cache=cache)
        one = ids[:, 3:4]
        assert native_step.ready(ids[:, 3:5], None, None, cache)  # 5 steps: the ring's 5
        assert native_step.ready(one, None, None, cache)
        assert native_step.ready(one, torch.ones(1, 4), None, cache)
        assert not native_step.ready(one, torch.tensor([[1, 1, 1, 0]]), None, cache)  # padding
        assert not native_step.ready(one, torch.ones(1, 2), None, cache)  # a wrong mask
        assert not native_step.ready(one, None, torch.tensor([[3]]), cache)  # own positions
        model(one, cache=cache)
        assert not native_step.ready(ids[:, 3:5], None, None, cache)  # a ring without spare
        assert native_step.ready(ids[:, 4:5], None, None, cache)
        roomy = model.new_cache(1, 290, spare=280)
        assert native_step.ready(torch.ones(1, step.MAX_NEW, dtype=torch.long), None, None, roomy)
        assert not native_step.ready(
            torch.ones(1, step.MAX_NEW + 1, dtype=torch.long), None, None, roomy
        )
        rows = step.MAX_TOKENS // 200 + 1  # a batch of long prompts: past MAX_TOKENS
        batch = model.new_cache(rows, 290, spare=280)
        assert native_step.ready(torch.ones(rows, 1, dtype=torch.long), None, None, batch)
        assert not native_step.ready(torch.ones(rows, 200, dtype=torch.long), None, None, batch)
        fewer = model.new_cache(rows - 1, 290, spare=280)
        assert native_step.ready(torch.ones(rows - 1, 200, dtype=torch.long), None, None, fewer)
        assert not native_step.ready(torch.tensor([[1], [2]]), None, None, cache)  # rows
        bf16 = model.new_cache(1, 6)
        bf16.keys = [k.bfloat16() for k in bf16.keys]
        assert not native_step.ready(one, None, None, bf16)
        full = model.new_cache(1, 3)
        model(ids[:, :3], cache=full)
        assert not native_step.ready(one, None, None, full)
        with pytest.raises(ValueError, match="KV cache holds 3 positions"):
            model(one, cache=full)  # the torch path raises the error
        padded = model.new_cache(1, 6)
        model(ids[:, :3], attention_mask=torch.tensor([[0, 1, 1]]), cache=padded)
        assert not native_step.ready(one, None, None, padded)


def test_models_without_a_native_step(tmp_path, monkeypatch):
    folder, _ = checkpoint(tmp_path, "ragged")
    monkeypatch.setenv("GPTNEO_KERNEL", "onednn")  # not panels
    assert FastCausalLM.from_pretrained(folder)._native_step() is False
    monkeypatch.setenv("GPTNEO_KERNEL", "panels")
    monkeypatch.setenv("GPTNEO_NATIVE_STEP", "0")
    assert FastCausalLM.from_pretrained(folder)._native_step() is False
    monkeypatch.delenv("GPTNEO_NATIVE_STEP")
    erf, _ = checkpoint(tmp_path / "erf", "ragged", activation_function="gelu")
    assert FastCausalLM.from_pretrained(erf)._native_step() is False  # GELU's erf form
    monkeypatch.setattr(native, "quads_supported", lambda: False)  # a CPU without VNNI
    int8 = FastCausalLM.from_pretrained(folder, quantize="int8")
    assert int8._native_step() is False and not int8.transformer.h[0].mlp.c_fc.panels


def prompt_logits(
    model: FastCausalLM, ids: torch.Tensor, chunks: list[int], spare: int, native_step: bool
):
    """Logits of a prompt fed in `chunks` of tokens, then of one decoded token."""
    model.__dict__["_native"] = None if native_step else False
    out, at = [], 0
    with torch.no_grad():
        cache = model.new_cache(ids.shape[0], sum(chunks) + 1, spare=spare)
        for size in [*chunks, 1]:
            out.append(model(ids[:, at : at + size], cache=cache).logits.float())
            at += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "quantize,dtype",
    [
        (None, torch.float32),
        (None, torch.bfloat16),
        pytest.param("int8", torch.float32, marks=needs_quads),
    ],
)
def test_prompts_of_up_to_max_new_tokens(tmp_path, panels, counted, monkeypatch, quantize, dtype):
    """Prompt chunks of 17 to MAX_NEW tokens run the step (int8: with bf16 activations from
    Int8Linear.PANEL_BF16_ROWS tokens, as on the torch path) where the local ring keeps
    every key a new token sees: room for the window and the chunk (a ring that wraps
    within the chunk), or for every position so far (a ring shorter than that); longer
    chunks and rings that would lose a key go to the torch path."""
    assert step.MAX_NEW >= 17
    big = checkpoint(tmp_path, "heads64", window_size=260, max_position_embeddings=300)[0]
    small, ref = checkpoint(tmp_path, "ragged", max_position_embeddings=300)
    most = step.MAX_NEW
    cases = [  # (folder, chunks, spare, how many of the calls the step takes)
        (small, [10, 40], 39, 3),  # window 5 + 39 spare: the 40 wrap the ring
        (small, [17], 16, 2),
        (small, [3, most], most - 1, 3),
        (small, [most + 1], most, 1),  # too long: only the decode step
        (small, [3, 20], 0, 2),  # window 5, no spare: the 20 would overwrite keys they see
        (big, [most], 0, 2),  # a ring of 260 > the 256 positions so far
        (big, [most, 30], 0, 2),  # 286 positions > a ring of 260 < window + 29
    ]
    for folder, chunks, spare, taken in cases:
        model = load(folder, quantize=quantize, dtype=dtype)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 290), generator=torch.Generator().manual_seed(8))
        counted.clear()
        got = prompt_logits(model, ids, chunks, spare, True)
        assert len(counted) == taken, (chunks, spare)
        want = prompt_logits(model, ids, chunks, spare, False)
        scale = max(1.0, want.abs().max().item())
        if quantize:  # against float32 activations (no bf16 pairs), on which both paths agree
            with monkeypatch.context() as patch:
                patch.setattr(native, "pairs_supported", lambda: False)
                exact = prompt_logits(model, ids, chunks, spare, False)
                floats = prompt_logits(model, ids, chunks, spare, True)
            assert (floats - exact).abs().max().item() < 1e-4 * scale
        elif dtype == torch.bfloat16:  # against the float32 model
            exact = prompt_logits(load(folder), ids, chunks, spare, False)
        else:
            assert (got - want).abs().max().item() < 1e-4 * scale
            continue
        # bf16 activations: the step as close to float32 ones as the torch path
        span = (exact.max() - exact.min()).item()
        error = (want - exact).abs().max().item()
        assert (got - exact).abs().max().item() <= 1.5 * error + 1e-3 * span
    if quantize is None and dtype == torch.float32:  # and the step against transformers
        ids = torch.randint(0, 103, (1, 51), generator=torch.Generator().manual_seed(9))
        got = prompt_logits(load(small), ids, [10, 40], 39, True)
        with torch.no_grad():
            want = ref(ids).logits
        assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("dtype", "quantize"),
    [
        (torch.float32, None),
        (torch.bfloat16, None),
        pytest.param(torch.float32, "int8", marks=needs_quads),
    ],
)
def test_decode_steps_look_up_embeddings_and_run_the_head_in_the_one_call(
    tmp_path, panels, counted, dtype, quantize
):
    """A decode step's token and position embeddings and its tied head run inside the C
    call (no torch call after the weights' stream evicted torch's own state): logits as the
    torch path's, and an id outside the vocabulary is nn.Embedding's IndexError with the
    cache untouched."""
    if dtype == torch.bfloat16 and not native.pairs_supported():
        pytest.skip("the CPU has no AVX512-BF16")
    folder, _ = checkpoint(tmp_path, "wide")
    model = load(folder, dtype=dtype, quantize=quantize)
    built = model._native_step()
    assert built.embed is not None and built.head is not None and built.runs_head(1)
    assert not built.runs_head(2)  # verifies and prompts: hidden states, head through torch
    ids = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(9))
    got = decode(model, ids, True)
    assert len(counted) == 12 - 2
    want = decode(model, ids, False)
    tol = 1e-4 if dtype == torch.float32 else 0.02 * (want.max() - want.min()).item()
    assert (got - want).abs().max().item() < tol
    model.__dict__["_native"] = None
    for bad in (211, -1):
        cache = model.new_cache(2, 8)
        model(ids[:, :3], cache=cache)
        with pytest.raises(IndexError):
            model(torch.tensor([[5], [bad]]), cache=cache)
        assert cache.length == 3
        assert model(ids[:, 3:4], cache=cache).logits.shape == (2, 1, 211)
