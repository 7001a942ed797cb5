"""The generation engine: transformers as the greedy oracle, a scripted model for the rest.

The scripted model emits a fixed token sequence per row, so stop strings, eos, lengths,
cancellation and row dropping can be checked exactly; the real model (random weights,
loaded from a transformers checkpoint) checks that the loop drives the KV cache right.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from oracle import GPT2_ASSETS, build_reference, save_reference
from torch import nn

from gptneo_cli.generation import (
    GenerationConfig,
    GenerationResult,
    StopGate,
    generate,
    stream,
)
from gptneo_cli.modeling import GPTNeoForCausalLM

GREEDY = GenerationConfig(do_sample=False)

# ---- a toy tokenizer and a scripted model --------------------------------------------------


class ToyTokenizer:
    """Every id is one fixed string; encode matches the longest known string first."""

    def __init__(self, pieces: list[str], eos_id: int = 0) -> None:
        self.pieces = pieces
        self.eos_id = self.bos_id = self.pad_id = eos_id
        self.vocab_size = len(pieces)

    def encode(self, text: str) -> list[int]:
        ids, at = [], 0
        by_length = sorted(range(len(self.pieces)), key=lambda i: -len(self.pieces[i]))
        while at < len(text):
            for i in by_length:
                piece = self.pieces[i]
                if piece and i != self.eos_id and text.startswith(piece, at):
                    ids.append(i)
                    at += len(piece)
                    break
            else:
                raise ValueError(f"cannot encode {text[at:]!r}")
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)

    def stream_decoder(self) -> SimpleNamespace:
        return SimpleNamespace(push=lambda i: self.pieces[i], finish=lambda: "")


def numbered_tokenizer(vocab_size: int) -> ToyTokenizer:
    """Distinct text for every id of a random model (id 0 is eos)."""
    return ToyTokenizer(["<eos>"] + [f"<{i}>" for i in range(1, vocab_size)])


WORDS = ["<eos>", "Hi", " you", "\n", "Us", "er", ":", " ok", "ually", " there", " a", "é"]
T = {w: i for i, w in enumerate(WORDS)}


@dataclass
class ScriptCache:
    rows: list[int]
    max_length: int
    length: int = 0

    def keep_rows(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


@dataclass
class ScriptedModel(nn.Module):
    """Row r's k-th new token is scripts[r][k] (the script's last token repeats).

    `runner_up` gives a second-best token (for eos suppression); `calls` logs the batch
    size of every forward pass; `interrupt_at` raises KeyboardInterrupt on that call.
    """

    scripts: list[list[int]]
    runner_up: int = T[" a"]
    max_positions: int = 64
    interrupt_at: int | None = None
    calls: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        nn.Module.__init__(self)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(
            vocab_size=len(WORDS), max_position_embeddings=self.max_positions, eos_token_id=0
        )

    def __hash__(self) -> int:
        return id(self)

    def new_cache(self, batch_size: int, max_length: int) -> ScriptCache:
        assert max_length <= self.max_positions
        return ScriptCache(list(range(batch_size)), max_length)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0
    ):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(input_ids.shape[0])
        step = len(self.calls) - 1
        assert cache.length + input_ids.shape[1] <= cache.max_length + 1
        cache.length += input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], 1, len(WORDS))
        for b, row in enumerate(cache.rows):
            script = self.scripts[row]
            logits[b, 0, script[min(step, len(script) - 1)]] = 10.0
            logits[b, 0, self.runner_up] = max(logits[b, 0, self.runner_up].item(), 5.0)
        return SimpleNamespace(logits=logits)


def script(*words: str) -> list[int]:
    return [T[w] for w in words]


TOY = ToyTokenizer(WORDS)


# ---- configuration validation ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("max_length", 0),
        ("min_new_tokens", -1),
        ("min_p", 1.2),
        ("typical_p", 0.0),
        ("repetition_penalty", 0.0),
        ("repetition_window", -3),
        ("no_repeat_ngram_size", -1),
        ("num_return_sequences", 0),
        ("logprobs", 21),
        ("seed", -5),
        ("truncate", "right"),
        ("temperature", float("nan")),
        ("top_k", 2.5),
        ("do_sample", "yes"),
    ],
)
def test_invalid_values_name_the_parameter(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        GenerationConfig(**{name: value})


def test_invalid_values_are_caught_on_replace_too() -> None:
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig().replace(top_p=2.0)


def test_empty_stop_string_and_greedy_multiple_sequences_are_rejected() -> None:
    with pytest.raises(ValueError, match="stop"):
        GenerationConfig(stop=[""])
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(do_sample=False, num_return_sequences=2)


def test_defaults_follow_the_documented_example() -> None:
    config = GenerationConfig(stop="User:")
    assert (config.do_sample, config.temperature, config.top_k) == (True, 0.9, 50)
    assert config.stop == ["User:"]
    assert GenerationConfig(temperature=0).greedy


# ---- stop strings ---------------------------------------------------------------------------


def test_stop_gate_holds_back_possible_prefixes() -> None:
    gate = StopGate(["User:"])
    assert gate.push("Hi U") == ("Hi ", False)
    assert gate.push("s") == ("", False)
    assert gate.push("ually") == ("Usually", False)
    assert gate.push(" User") == (" ", False)
    assert gate.push(": more") == ("", True)


def test_stop_string_over_three_tokens_is_caught_and_never_streamed() -> None:
    model = ScriptedModel([script("Hi", " you", "\n", "Us", "er", ":", " ok", " ok")])
    config = GREEDY.replace(stop=["User:"], max_new_tokens=20)
    s = stream(model, TOY, "Hi", config)
    deltas = list(s)
    result = s.result
    assert result.finish_reason == "stop"
    assert result.text == "Hi you\n"
    assert "".join(deltas) == result.text
    for delta in deltas:  # no piece of the stop string ever went out
        assert not any(part in delta for part in ("U", "Us", "er", ":"))
    # every produced token is accounted for, the text is not
    assert result.token_ids == script("Hi", " you", "\n", "Us", "er", ":")
    assert result.completion_tokens == 6
    assert len(model.calls) == 6  # stopped right away: no wasted step


def test_a_false_start_of_a_stop_string_is_released() -> None:
    model = ScriptedModel([script("Us", "ually", " you", "Us", "er", ":")])
    config = GREEDY.replace(stop=["User:"], max_new_tokens=20)
    s = stream(model, TOY, "Hi", config)
    deltas = list(s)
    assert deltas == ["Usually", " you"]
    assert s.result.text == "Usually you"


def test_held_back_text_is_released_when_generation_ends() -> None:
    model = ScriptedModel([script("Hi", "Us")])
    s = stream(model, TOY, "Hi", GREEDY.replace(stop=["User:"], max_new_tokens=2))
    assert list(s) == ["Hi", "Us"]
    assert (s.result.text, s.result.finish_reason) == ("HiUs", "length")


def test_earliest_of_several_stop_strings_wins() -> None:
    model = ScriptedModel([script("Hi", " there", " you", " ok")])
    config = GREEDY.replace(stop=[" ok", "re you"], max_new_tokens=10)
    [result] = generate(model, TOY, "Hi", config)
    assert (result.text, result.finish_reason) == ("Hi the", "stop")


# ---- eos, lengths ---------------------------------------------------------------------------


def test_eos_ends_and_is_not_text() -> None:
    model = ScriptedModel([script("Hi", " you", "<eos>", " ok")])
    [result] = generate(model, TOY, "Hi", GREEDY.replace(max_new_tokens=10))
    assert (result.text, result.finish_reason) == ("Hi you", "eos")
    assert result.token_ids == script("Hi", " you", "<eos>")


def test_ignore_eos_keeps_going() -> None:
    model = ScriptedModel([script("Hi", "<eos>", " ok")])
    [result] = generate(model, TOY, "Hi", GREEDY.replace(max_new_tokens=4, ignore_eos=True))
    assert result.finish_reason == "length"
    assert result.token_ids == script("Hi", "<eos>", " ok", " ok")


def test_min_new_tokens_suppresses_eos() -> None:
    model = ScriptedModel([script("<eos>", "<eos>", "<eos>", "<eos>")])
    config = GREEDY.replace(max_new_tokens=10, min_new_tokens=3)
    [result] = generate(model, TOY, "Hi", config)
    assert result.token_ids == script(" a", " a", " a", "<eos>")  # runner-up until 3 tokens
    assert result.finish_reason == "eos"


def test_max_length_counts_the_prompt() -> None:
    model = ScriptedModel([script(" ok")])
    prompt = script("Hi", " you", " there")
    [result] = generate(model, TOY, prompt, GREEDY.replace(max_length=7))
    assert (result.completion_tokens, result.finish_reason) == (4, "length")
    [tighter] = generate(model, TOY, prompt, GREEDY.replace(max_length=7, max_new_tokens=2))
    assert tighter.completion_tokens == 2
    with pytest.raises(ValueError, match="max_length"):
        generate(model, TOY, prompt, GREEDY.replace(max_length=3))


def test_empty_prompt_starts_from_eos() -> None:
    model = ScriptedModel([script("Hi")])
    [result] = generate(model, TOY, "", GREEDY.replace(max_new_tokens=1))
    assert (result.prompt_tokens, result.text) == (1, "Hi")


# ---- batching -------------------------------------------------------------------------------


def test_rows_finish_independently_and_stop_costing_work() -> None:
    scripts = [
        script("Hi", "<eos>"),
        script("Hi", " you", " ok", " ok", " ok"),
        script("Us", "er", ":", " ok"),
    ]
    model = ScriptedModel(scripts)
    prompts = [script("Hi"), script("Hi", " you", " there"), script(" ok", " ok")]
    results = generate(model, TOY, prompts, GREEDY.replace(max_new_tokens=5, stop=["User:"]))
    assert [r.finish_reason for r in results] == ["eos", "length", "stop"]
    assert [r.text for r in results] == ["Hi", "Hi you ok ok ok", ""]
    assert [r.prompt_tokens for r in results] == [1, 3, 2]
    # prefill of 3, then rows leave as they finish: eos after 2 tokens, stop after 3
    assert model.calls == [3, 3, 2, 1, 1]


def test_num_return_sequences_groups_results_by_prompt() -> None:
    model = ScriptedModel([script("Hi")] * 6)
    config = GenerationConfig(max_new_tokens=2, num_return_sequences=3, seed=1)
    results = generate(model, TOY, ["Hi", " ok"], config)
    assert [r.prompt_index for r in results] == [0, 0, 0, 1, 1, 1]
    assert model.calls[0] == 6


def test_a_batch_too_long_when_padded_is_split_in_order() -> None:
    model = ScriptedModel([script(" ok"), script("Hi")], max_positions=16)
    prompts = [[T[" a"]] * 12, [T[" a"]] * 2]
    results = generate(model, TOY, prompts, GREEDY.replace(max_length=15))
    # together they would need 12 + 13 positions: two batches of one, in prompt order
    assert [r.completion_tokens for r in results] == [3, 13]
    assert [r.prompt_index for r in results] == [0, 1]
    assert model.calls == [1] * (3 + 13)  # each batch: a prefill, then one step per token


def test_presence_penalty_counts_generated_tokens_only() -> None:
    model = ScriptedModel([script(" ok")])  # " ok" scores 10, the runner-up " a" 5
    config = GREEDY.replace(max_new_tokens=4, presence_penalty=6.0)
    [result] = generate(model, TOY, script(" ok", " ok"), config)
    assert result.token_ids == script(" ok", " a", " ok", " ok")


# ---- context budget -------------------------------------------------------------------------


def test_error_mode_raises_before_any_compute() -> None:
    model = ScriptedModel([script("Hi")], max_positions=16)
    prompt = [T["Hi"]] * 12
    with pytest.raises(ValueError, match="truncate"):
        generate(model, TOY, prompt, GREEDY.replace(max_new_tokens=5, truncate="error"))
    with pytest.raises(ValueError, match="truncate"):
        stream(model, TOY, prompt, GREEDY.replace(max_new_tokens=5, truncate="error"))
    assert model.calls == []


def test_truncate_left_drops_the_oldest_tokens_and_says_how_many() -> None:
    model = ScriptedModel([script(" ok")], max_positions=16)
    prompt = script("Hi", " you", " there") + [T[" a"]] * 10
    config = GREEDY.replace(max_new_tokens=5, truncate="left")
    [result] = generate(model, TOY, prompt, config)
    assert result.truncated_tokens == 2
    assert result.prompt_tokens == 11
    assert result.completion_tokens == 5


def test_asking_for_more_new_tokens_than_positions_is_an_error() -> None:
    model = ScriptedModel([script("Hi")], max_positions=16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, TOY, "Hi", GREEDY.replace(max_new_tokens=16, truncate="left"))


# ---- cancellation ---------------------------------------------------------------------------


def test_cancel_event_mid_stream_returns_partial_text() -> None:
    model = ScriptedModel([script("Hi", " you", " there", " ok")])
    cancel = threading.Event()
    s = stream(model, TOY, "Hi", GREEDY.replace(max_new_tokens=30), cancel=cancel)
    seen = []
    for delta in s:
        seen.append(delta)
        if len(seen) == 3:
            cancel.set()
    assert s.result.finish_reason == "cancelled"
    assert s.result.text == "Hi you there" == "".join(seen)
    assert s.result.completion_tokens == 3


def test_close_stops_a_stream_and_a_callable_cancels_generate() -> None:
    model = ScriptedModel([script("Hi", " you", " ok")])
    s = stream(model, TOY, "Hi", GREEDY.replace(max_new_tokens=30))
    assert next(s) == "Hi"
    result = s.close()
    assert (result.text, result.finish_reason) == ("Hi", "cancelled")
    calls = []
    [result] = generate(
        ScriptedModel([script(" ok")]),
        TOY,
        "Hi",
        GREEDY.replace(max_new_tokens=30),
        cancel=lambda: calls.append(1) or len(calls) >= 4,
    )
    # checked once before prefill, then after each token: True on the 4th check
    assert (result.completion_tokens, result.finish_reason) == (3, "cancelled")


def test_ctrl_c_during_generation_ends_the_stream_cleanly() -> None:
    model = ScriptedModel([script("Hi", " you", " there", " ok")], interrupt_at=2)
    s = stream(model, TOY, "Hi", GREEDY.replace(max_new_tokens=30))
    assert list(s) == ["Hi", " you"]
    assert (s.result.text, s.result.finish_reason) == ("Hi you", "cancelled")


def test_result_before_the_end_is_an_error() -> None:
    s = stream(ScriptedModel([script("Hi")]), TOY, "Hi", GREEDY.replace(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="still running"):
        _ = s.result


# ---- the real model against transformers ----------------------------------------------------

WINDOW_256 = dict(
    vocab_size=211,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    attention_types=[[["global", "local"], 1]],
    window_size=256,
    max_position_embeddings=400,
    eos_token_id=0,
    bos_token_id=0,
    pad_token_id=0,
)
SMALL_WINDOW = dict(
    vocab_size=97,
    hidden_size=24,
    num_layers=3,
    num_heads=3,
    attention_types=[[["local", "global"], 1], [["local"], 1]],
    window_size=7,
    max_position_embeddings=128,
    eos_token_id=0,
    bos_token_id=0,
    pad_token_id=0,
)


def make_lively(ref) -> None:
    """Random tied weights make greedy decoding repeat one token; a random ln_f scale and
    strong position embeddings give varied output with clear margins between choices."""
    with torch.no_grad():
        ref.transformer.ln_f.weight.normal_(0.0, 1.0)
        ref.transformer.wpe.weight.mul_(10)
    ref.generation_config.eos_token_id = None  # compare full lengths: nothing ends early


@pytest.fixture(scope="module")
def window_256(tmp_path_factory):
    ref = build_reference("causal_lm", seed=3, **WINDOW_256)
    make_lively(ref)
    return save_reference(ref, tmp_path_factory.mktemp("w256")), ref


@pytest.fixture(scope="module")
def small_window(tmp_path_factory):
    ref = build_reference("causal_lm", seed=5, **SMALL_WINDOW)
    make_lively(ref)
    return save_reference(ref, tmp_path_factory.mktemp("small")), ref


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=g).tolist()


_HF_RUNS: dict[tuple, list[list[int]]] = {}


def hf_greedy(ref, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (left-padded batch), eos ignored.

    Memoized: the eager and sdpa variants of a test share one (slow) oracle run."""
    key = (id(ref), tuple(map(tuple, prompts)), new)
    if key not in _HF_RUNS:
        _HF_RUNS[key] = _hf_greedy(ref, prompts, new)
    return _HF_RUNS[key]


def _hf_greedy(ref, prompts: list[list[int]], new: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    out = ref.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0
    )
    assert out.shape[1] == width + new
    return out[:, width:].tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_matches_transformers_across_the_256_window(window_256, attn: str) -> None:
    folder, ref = window_256
    model = GPTNeoForCausalLM.from_pretrained(folder, attn=attn)
    prompt = random_prompt(40, WINDOW_256["vocab_size"], seed=0)
    [result] = generate(
        model,
        numbered_tokenizer(WINDOW_256["vocab_size"]),
        prompt,
        GREEDY.replace(max_new_tokens=300, ignore_eos=True),
    )
    [theirs] = hf_greedy(ref, [prompt], 300)
    assert len(set(theirs)) > 30  # varied output, not one token repeated
    assert result.token_ids == theirs
    assert result.finish_reason == "length"  # all 300 tokens: 340 positions > the window


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_left_padded_batch_matches_transformers(small_window, attn: str) -> None:
    folder, ref = small_window
    model = GPTNeoForCausalLM.from_pretrained(folder, attn=attn)
    vocab = SMALL_WINDOW["vocab_size"]
    prompts = [random_prompt(n, vocab, seed=n) for n in (3, 19, 11)]
    tok = numbered_tokenizer(vocab)
    config = GREEDY.replace(max_new_tokens=40, ignore_eos=True)
    results = generate(model, tok, prompts, config)
    theirs = hf_greedy(ref, prompts, 40)
    assert all(len(set(t)) > 10 for t in theirs)
    assert [r.token_ids for r in results] == theirs
    # each row is independent of its batch: alone it gives the same tokens
    for prompt, result in zip(prompts, results, strict=True):
        [alone] = generate(model, tok, prompt, config)
        assert alone.token_ids == result.token_ids


def test_truncate_left_equals_generating_from_the_kept_tokens(small_window) -> None:
    folder, _ = small_window
    model = GPTNeoForCausalLM.from_pretrained(folder)
    tok = numbered_tokenizer(SMALL_WINDOW["vocab_size"])
    prompt = random_prompt(120, SMALL_WINDOW["vocab_size"], seed=9)
    config = GREEDY.replace(max_new_tokens=20, truncate="left", ignore_eos=True)
    [cut] = generate(model, tok, prompt, config)
    [kept] = generate(model, tok, prompt[12:], config)
    assert cut.truncated_tokens == 12 and cut.prompt_tokens == 108
    assert cut.token_ids == kept.token_ids


def test_fixed_seed_is_reproducible(small_window) -> None:
    folder, _ = small_window
    model = GPTNeoForCausalLM.from_pretrained(folder)
    tok = numbered_tokenizer(SMALL_WINDOW["vocab_size"])
    prompt = random_prompt(10, SMALL_WINDOW["vocab_size"], seed=1)
    config = GenerationConfig(max_new_tokens=30, temperature=1.5, top_k=0, ignore_eos=True)
    first, second, other = (
        generate(model, tok, prompt, config.replace(seed=s))[0] for s in (42, 42, 43)
    )
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids
    assert first.seed == 42
    # without a seed one is drawn, reported, and reproduces the run
    drawn = generate(model, tok, prompt, config)[0]
    assert drawn.seed is not None
    again = generate(model, tok, prompt, config.replace(seed=drawn.seed))[0]
    assert again.token_ids == drawn.token_ids


def test_sampling_rules_change_the_output(small_window) -> None:
    folder, _ = small_window
    model = GPTNeoForCausalLM.from_pretrained(folder)
    tok = numbered_tokenizer(SMALL_WINDOW["vocab_size"])
    prompt = random_prompt(10, SMALL_WINDOW["vocab_size"], seed=1)
    base = GREEDY.replace(max_new_tokens=30, ignore_eos=True)
    [plain] = generate(model, tok, prompt, base)
    [no_repeat] = generate(model, tok, prompt, base.replace(no_repeat_ngram_size=2))
    full = list(zip(prompt + no_repeat.token_ids, (prompt + no_repeat.token_ids)[1:], strict=False))
    assert len(set(full)) == len(full)  # no bigram twice, prompt included
    # The same rule written out: greedy over full forwards, banning every token that would
    # repeat a bigram already in the sequence.
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            logits = model(torch.tensor([ids])).logits[0, -1]
            banned = [b for a, b in zip(ids, ids[1:], strict=False) if a == ids[-1]]
            logits[banned] = float("-inf")
            ids.append(int(logits.argmax()))
    assert no_repeat.token_ids == ids[len(prompt) :]
    [top1] = generate(model, tok, prompt, base.replace(do_sample=True, top_k=1, seed=7))
    assert top1.token_ids == plain.token_ids  # top_k=1 sampling is greedy


def test_logprobs_are_the_models_own(small_window) -> None:
    folder, _ = small_window
    model = GPTNeoForCausalLM.from_pretrained(folder)
    tok = numbered_tokenizer(SMALL_WINDOW["vocab_size"])
    prompt = random_prompt(10, SMALL_WINDOW["vocab_size"], seed=2)
    [result] = generate(
        model, tok, prompt, GREEDY.replace(max_new_tokens=8, logprobs=3, ignore_eos=True)
    )
    assert result.logprobs is not None and len(result.logprobs) == 8
    full = torch.tensor([prompt + result.token_ids])
    with torch.no_grad():
        logp = model(full).logits[0].log_softmax(-1)
    for step, item in enumerate(result.logprobs):
        row = logp[len(prompt) - 1 + step]
        assert item.token_id == result.token_ids[step]
        assert item.logprob == pytest.approx(row[item.token_id].item(), abs=1e-4)
        assert [a.token_id for a in item.top] == row.topk(3).indices.tolist()
        assert item.top[0].token_id == item.token_id  # greedy picks the top one
        assert item.token == tok.decode([item.token_id])
    first = result.to_dict()["logprobs"][0]
    assert first["top_logprobs"][0]["token_id"] == result.logprobs[0].top[0].token_id


def test_cancel_mid_stream_on_the_real_model(small_window) -> None:
    folder, _ = small_window
    model = GPTNeoForCausalLM.from_pretrained(folder)
    tok = numbered_tokenizer(SMALL_WINDOW["vocab_size"])
    prompt = random_prompt(10, SMALL_WINDOW["vocab_size"], seed=2)
    config = GREEDY.replace(max_new_tokens=50, ignore_eos=True)
    [full] = generate(model, tok, prompt, config)
    cancel = threading.Event()
    s = stream(model, tok, prompt, config, cancel=cancel)
    deltas = []
    for delta in s:
        deltas.append(delta)
        if len(deltas) == 5:
            cancel.set()
    result = s.result
    assert result.finish_reason == "cancelled"
    assert result.token_ids == full.token_ids[:5]
    assert result.text == "".join(deltas) == tok.decode(full.token_ids[:5])


def test_result_fields(small_window) -> None:
    folder, _ = small_window
    model = GPTNeoForCausalLM.from_pretrained(folder)
    tok = numbered_tokenizer(SMALL_WINDOW["vocab_size"])
    [result] = generate(model, tok, [5, 6, 7], GREEDY.replace(max_new_tokens=6, ignore_eos=True))
    assert isinstance(result, GenerationResult)
    assert result.usage == {"prompt_tokens": 3, "completion_tokens": 6}
    assert result.seed is None  # greedy uses no randomness
    t = result.timings
    assert t.ttft_s > 0 and t.prompt_tok_s > 0 and t.gen_tok_s > 0 and t.total_s >= t.ttft_s
    as_json = result.to_dict()
    assert set(as_json) >= {"text", "token_ids", "finish_reason", "usage", "timings", "seed"}
    assert set(as_json["timings"]) >= {"ttft_s", "prompt_tok_s", "gen_tok_s"}


# ---- with the real GPT-2 tokenizer ----------------------------------------------------------


def test_streamed_text_joins_to_the_final_text_with_gpt2_vocab(tmp_path) -> None:
    if not (GPT2_ASSETS / "vocab.json").exists():
        pytest.skip("GPT-2 vocabulary not available")
    tokenizer_module = pytest.importorskip("gptneo_cli.tokenizer")
    tok = tokenizer_module.load_tokenizer(GPT2_ASSETS)
    ref = build_reference(
        "causal_lm",
        seed=1,
        vocab_size=50257,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        window_size=16,
        max_position_embeddings=64,
        eos_token_id=50256,
        bos_token_id=50256,
        pad_token_id=50256,
    )
    model = GPTNeoForCausalLM.from_pretrained(save_reference(ref, tmp_path / "gpt2"))
    config = GenerationConfig(max_new_tokens=40, seed=0, temperature=1.0, top_k=0)
    s = stream(model, tok, "Hello, my name is", config)
    deltas = list(s)
    result = s.result
    assert "".join(deltas) == result.text
    expected = tok.decode([t for t in result.token_ids if t != tok.eos_id])
    assert result.text == expected
