"""The continuous-batching scheduler: a row's result never depends on its neighbours.

The reference for greedy decoding is the model's own full forward pass (no cache): every
generated token must be the argmax of the logits of prompt + tokens so far. Joins happen
at different steps, prompts are longer than the local window and than the prefill chunk.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from gptneo_cli.config import GPTNeoConfig
from gptneo_cli.generation import GenerationConfig
from gptneo_cli.modeling import GPTNeoForCausalLM
from gptneo_cli.rowcache import RowCache
from gptneo_cli.scheduler import QueueFull, Request, Scheduler, SchedulerClosed, Update

GREEDY = GenerationConfig(do_sample=False, ignore_eos=True)


class NumberTokenizer:
    """Every id is the text "<id>"; id 0 is eos."""

    eos_id = bos_id = 0

    def encode(self, text: str) -> list[int]:
        return [int(p) for p in text.replace(">", "").split("<") if p]

    def decode(self, ids) -> str:
        return "".join(f"<{i}>" for i in ids)

    def stream_decoder(self) -> SimpleNamespace:
        return SimpleNamespace(push=lambda i: f"<{i}>", finish=lambda: "")


def tiny_model(seed: int = 0, **overrides) -> GPTNeoForCausalLM:
    settings = dict(
        vocab_size=97,
        hidden_size=48,
        num_layers=3,
        num_heads=3,
        intermediate_size=40,
        attention_types=[[["local", "global"], 1], [["local"], 1]],
        window_size=5,
        max_position_embeddings=96,
        bos_token_id=0,
        eos_token_id=0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(GPTNeoConfig(**settings)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" not in name:
                param.normal_(0.0, 0.3 if param.dim() > 1 else 0.02)
    return model


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 97, (length,), generator=g).tolist()


def reference_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens from full forward passes (no cache, no batching)."""
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            seq.append(token)
    return out


def run(scheduler: Scheduler, ids: list[int], config=GREEDY, max_new: int = 12, **kw):
    return scheduler.submit(Request(ids, config, max_new, **kw))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_one_request_equals_full_forward(model) -> None:
    with Scheduler(model, NumberTokenizer(), max_running=4, prefill_chunk=4) as sched:
        ids = prompt(11, 1)
        result = run(sched, ids, max_new=15).wait(60)
    assert result.token_ids == reference_greedy(model, ids, 15)
    assert result.finish_reason == "length"
    assert result.text == "".join(f"<{t}>" for t in result.token_ids)


def test_rows_joining_at_different_steps_equal_their_solo_runs(model) -> None:
    """Driven by hand so joins happen at chosen steps: 1, 3 and 9 tokens into the others."""
    tok = NumberTokenizer()
    lengths = [3, 17, 1, 9, 30, 6]
    budgets = [20, 8, 14, 25, 10, 16]
    sched = Scheduler(model, tok, max_running=6, prefill_chunk=7)
    sched._ensure_thread = lambda: None  # no thread: step() by hand
    # Start the caches small so rows and positions grow while rows run.
    sched._cache = RowCache(model.config, 6, capacity=8)
    sched._pcache = RowCache(model.config, 2, capacity=4)
    reqs = []
    join_at = {0: [0, 1], 1: [2], 3: [3, 4], 9: [5]}
    step = 0
    with torch.inference_mode():
        while step < 200:
            for i in join_at.get(step, []):
                reqs.append(sched.submit(Request(prompt(lengths[i], i), GREEDY, budgets[i])))
            if len(reqs) == 6 and all(r.done for r in reqs):
                break
            sched.step()
            step += 1
    for i, r in enumerate(reqs):
        want = reference_greedy(model, prompt(lengths[i], i), budgets[i])
        assert r.result.token_ids == want, f"request {i}"


def test_sixteen_concurrent_requests_on_the_thread_equal_solo(model) -> None:
    tok = NumberTokenizer()
    specs = [(1 + (i * 7) % 40, 3 + (i * 5) % 20) for i in range(16)]
    with Scheduler(model, tok, max_running=5, max_queue=16, prefill_chunk=8) as sched:
        reqs = [run(sched, prompt(n, 100 + i), max_new=m) for i, (n, m) in enumerate(specs)]
        results = [r.wait(120) for r in reqs]
    for i, ((n, m), res) in enumerate(zip(specs, results, strict=True)):
        assert res.token_ids == reference_greedy(model, prompt(n, 100 + i), m), i


def test_seeded_sampling_is_the_same_alone_or_among_others(model) -> None:
    sampled = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, seed=7, ignore_eos=True)
    tok = NumberTokenizer()
    ids = prompt(8, 3)
    with Scheduler(model, tok, max_running=4) as sched:
        alone = run(sched, ids, sampled, max_new=20).wait(60)
    with Scheduler(model, tok, max_running=4) as sched:
        others = [
            run(sched, prompt(5 + i, 50 + i), sampled.replace(seed=i), max_new=25) for i in range(3)
        ]
        among = run(sched, ids, sampled, max_new=20).wait(60)
        for r in others:
            r.wait(60)
    assert among.token_ids == alone.token_ids
    assert among.seed == 7


def test_updates_stream_text_and_finish_once(model) -> None:
    updates: list[Update] = []
    done = threading.Event()

    def on_update(u: Update) -> None:
        updates.append(u)
        if u.finish_reason:
            done.set()

    with Scheduler(model, NumberTokenizer()) as sched:
        res = run(sched, prompt(4, 9), max_new=6, on_update=on_update).wait(60)
    assert done.is_set()
    assert [u.token_id for u in updates] == res.token_ids
    assert "".join(u.text for u in updates) == res.text
    assert [u.finish_reason for u in updates].count("length") == 1


def test_cancel_frees_the_row_within_a_step(model) -> None:
    sched = Scheduler(model, NumberTokenizer(), max_running=2)
    sched._ensure_thread = lambda: None
    a = sched.submit(Request(prompt(4, 1), GREEDY, 50))
    b = sched.submit(Request(prompt(4, 2), GREEDY, 50))
    with torch.inference_mode():
        for _ in range(3):
            sched.step()
        assert sched.stats()["running"] == 2
        a.cancel()
        sched.step()
    assert a.done and a.result.finish_reason == "cancelled"
    assert sched.stats()["running"] == 1
    assert len(a.result.token_ids) == 3
    assert not b.done


def test_full_queue_raises_and_closed_scheduler_refuses(model) -> None:
    sched = Scheduler(model, NumberTokenizer(), max_running=1, max_queue=1)
    sched._ensure_thread = lambda: None
    sched.submit(Request([1], GREEDY, 5))
    with torch.inference_mode():
        sched.step()  # admitted
    sched.submit(Request([2], GREEDY, 5))  # queued
    with pytest.raises(QueueFull) as info:
        sched.submit(Request([3], GREEDY, 5))
    assert info.value.retry_after > 0
    sched._stopped = True
    sched.close()
    with pytest.raises(SchedulerClosed):
        sched.submit(Request([4], GREEDY, 5))


def test_stop_strings_and_eos_end_rows(model) -> None:
    tok = NumberTokenizer()
    ids = prompt(6, 4)
    want = reference_greedy(model, ids, 10)
    stop = f"<{want[3]}>"
    cfg = GREEDY.replace(stop=[stop])
    with Scheduler(model, tok) as sched:
        res = run(sched, ids, cfg, max_new=10).wait(60)
    first = want.index(want[3])
    assert res.finish_reason == "stop"
    assert res.text == "".join(f"<{t}>" for t in want[:first])


def test_prompt_logprobs_match_the_full_forward(model) -> None:
    ids = prompt(13, 5)
    cfg = GREEDY.replace(logprobs=2)
    with Scheduler(model, NumberTokenizer(), prefill_chunk=4) as sched:
        req = run(sched, ids, cfg, max_new=2, prompt_logprobs=True)
        res = req.wait(60)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    got = req.prompt_logprobs
    assert got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        assert got[i].token_id == ids[i]
        assert got[i].logprob == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-4)
        assert len(got[i].top) == 2
    assert res.logprobs is not None and len(res.logprobs) == 2


def test_generate_with_many_prompts_runs_on_the_scheduler(model, monkeypatch) -> None:
    """generate() hands several rows to the scheduler; each prompt's greedy result equals
    the full forward pass, and seeded samples equal the prompt run alone."""
    from gptneo_cli import generation

    calls: list[int] = []
    real = generation._generate_scheduled

    def spy(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "_generate_scheduled", spy)
    tok = NumberTokenizer()
    prompts = [prompt(n, 30 + n) for n in (3, 11, 6)]
    results = generation.generate(model, tok, prompts, GREEDY.replace(max_new_tokens=9))
    assert calls == [3]
    for ids, res in zip(prompts, results, strict=True):
        assert res.token_ids == reference_greedy(model, ids, 9)
        assert res.finish_reason == "length" and res.prompt_tokens == len(ids)
    sampled = GenerationConfig(max_new_tokens=12, seed=11, num_return_sequences=2, ignore_eos=True)
    both = generation.generate(model, tok, prompts[:2], sampled)
    alone = generation.generate(model, tok, [prompts[1]], sampled)
    assert [r.prompt_index for r in both] == [0, 0, 1, 1]
    assert [r.token_ids for r in both[2:]] == [r.token_ids for r in alone]
    assert both[0].token_ids != both[1].token_ids and both[0].seed == 11


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(model) -> None:
    """No timing: every step while the long prompt is prefilled (one chunk per step), each
    running row still gets its next token."""
    sched = Scheduler(model, NumberTokenizer(), max_running=4, prefill_chunk=8)
    sched._ensure_thread = lambda: None
    got: dict[str, int] = {"a": 0, "b": 0, "long": 0}

    def counter(name: str):
        def on_update(u: Update) -> None:
            got[name] += u.token_id is not None

        return on_update

    sched.submit(Request(prompt(5, 1), GREEDY, 40, on_update=counter("a")))
    sched.submit(Request(prompt(6, 2), GREEDY, 40, on_update=counter("b")))
    with torch.inference_mode():
        sched.step()
        sched.step()
        long = sched.submit(Request(prompt(60, 3), GREEDY, 5, on_update=counter("long")))
        steps = 0
        while got["long"] == 0:
            before = dict(got)
            sched.step()
            steps += 1
            assert got["a"] == before["a"] + 1 and got["b"] == before["b"] + 1
        assert steps == 8  # ceil(60 / 8) chunks, one per step
        while not long.done:
            sched.step()
    assert long.result.token_ids == reference_greedy(model, prompt(60, 3), 5)


def test_new_prompts_prefilled_together_equal_their_solo_runs(model) -> None:
    """Six new prompts of different lengths (some longer than the local window, some longer
    than the chunk) start in one step: their first chunks run as one right-padded pass, and
    padding never reaches a row's keys (greedy equals the full forward; prompt logprobs of
    the row that asks for them too)."""
    tok = NumberTokenizer()
    lengths = [1, 4, 9, 12, 5, 20]
    sched = Scheduler(
        model, tok, max_running=6, prefill_chunk=12, prefill_rows=6, prefill_budget=80
    )
    sched._ensure_thread = lambda: None
    passes: list[int] = []
    real = sched._forward

    def counting(ids, positions, cache, keep):
        passes.append(ids.shape[0])
        return real(ids, positions, cache, keep)

    sched._forward = counting
    cfg = GREEDY.replace(logprobs=1)
    reqs = [
        sched.submit(Request(prompt(n, 70 + n), cfg, 8, prompt_logprobs=n == 9)) for n in lengths
    ]
    with torch.inference_mode():
        while not all(r.done for r in reqs):
            sched.step()
    assert passes[0] == 6  # every first chunk in one forward pass
    for n, req in zip(lengths, reqs, strict=True):
        assert req.result.token_ids == reference_greedy(model, prompt(n, 70 + n), 8), n
    ids = prompt(9, 79)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    got = reqs[2].prompt_logprobs
    assert got[0] is None and len(got) == 9
    for i in range(1, 9):
        assert got[i].logprob == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-4)


def test_rows_at_one_position_decode_without_masks(model) -> None:
    """A batch that started together (equal prompt lengths) needs no attention mask; rows at
    different positions get one per row."""
    cache = RowCache(model.config, 4)
    cache.begin_decode([7, 7, 7])
    assert all(plan.mask is None for plan in cache.plans(1).values())
    cache.begin_decode([7, 3, 9])
    plans = cache.plans(1)
    assert all(plan.mask is not None and plan.mask.shape[0] == 3 for plan in plans.values())
    glob = plans["global"].mask[:, 0, 0]
    assert glob[1].tolist() == [True] * 4 + [False] * 6


class NoStartTokenizer(NumberTokenizer):
    eos_id = bos_id = None


@pytest.mark.parametrize("prompt", ["", [], [5, 97], [-1], [True]])
def test_one_prompt_rule_for_generate_the_scheduler_and_the_api(model, prompt) -> None:
    """An empty prompt without a bos/eos token, or ids outside the vocabulary, are the same
    clear error in generate(), the scheduler and the HTTP/batch request layer (a 400)."""
    from gptneo_cli import generation
    from gptneo_cli.api import APIError, Endpoints

    tok = NoStartTokenizer()
    want = "no bos token" if not prompt else "outside the vocabulary"
    with pytest.raises(ValueError, match=want):
        generation.generate(model, tok, [prompt], GREEDY.replace(max_new_tokens=2))
    with pytest.raises(ValueError, match=want):
        Scheduler(model, tok).prepare(prompt, GREEDY)
    endpoints = Endpoints(model, tok, model_name="m")
    with pytest.raises(APIError, match=want) as err:
        endpoints.prompts([prompt] if not prompt else prompt)
    assert err.value.status == 400 and err.value.param == "prompt"


def test_an_empty_prompt_starts_from_bos(model) -> None:
    with Scheduler(model, NumberTokenizer()) as sched:
        ids, _, _ = sched.prepare("", GREEDY.replace(max_new_tokens=4))
    assert ids == [0]
    assert generation_prompt_ids("") == [0]


def generation_prompt_ids(prompt):
    from gptneo_cli.generation import prompt_ids

    return prompt_ids(NumberTokenizer(), prompt, 97)


def test_a_long_prompt_after_a_burst_grows_only_the_rows_in_use(model) -> None:
    """Rows are kept after a burst; when one long prompt then needs more positions, only
    the rows holding data are re-allocated (64 stale rows grown to 2048 positions once took
    9.6 GB and a 7 s step), and results stay right."""
    tok = NumberTokenizer()
    sched = Scheduler(model, tok, max_running=12, prefill_chunk=4, prefill_budget=48)
    sched._ensure_thread = lambda: None
    sched._cache = RowCache(model.config, 12, capacity=8)
    sched._pcache = RowCache(model.config, 12, capacity=8)
    burst = [sched.submit(Request(prompt(3, 200 + i), GREEDY, 2)) for i in range(12)]
    with torch.inference_mode():
        while not all(r.done for r in burst):
            sched.step()
        assert sched._pcache.allocated == 12 and sched._cache.allocated == 12
        one = sched.submit(Request(prompt(40, 7), GREEDY, 6))
        while not one.done:
            sched.step()
    assert sched._pcache.allocated == 1 and sched._pcache.capacity >= 40
    assert sched._cache.allocated == 1 and sched._cache.capacity >= 46
    assert one.result.token_ids == reference_greedy(model, prompt(40, 7), 6)
    for i, r in enumerate(burst):
        assert r.result.token_ids == reference_greedy(model, prompt(3, 200 + i), 2)
