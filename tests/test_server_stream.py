"""Streaming with the real GPT-2 vocabulary: a chunk never holds half a UTF-8 character, and
a stop string never leaks into a chunk, even when it spans tokens.

The model is forced: a one-layer GPT-Neo whose attention and MLP add nothing and whose
position embeddings are zero, so its hidden state is LayerNorm(wte[token]); an untied head
then maps ":" to TARGET's first token and each token of TARGET to the next one. Greedy
decoding after a prompt that ends in ":" (as every chat prompt does: "Assistant:")
therefore writes TARGET's tokens, which split CJK characters and an emoji over several
byte tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers_server import Running
from oracle import GPT2_ASSETS

from gptneo_cli.config import GPTNeoConfig
from gptneo_cli.modeling import GPTNeoForCausalLM

pytestmark = pytest.mark.skipif(
    not (GPT2_ASSETS / "vocab.json").is_file(),
    reason=f"real GPT-2 vocabulary not found at {GPT2_ASSETS}",
)

TARGET = " 日本語のテキスト 🙂 café"
EOS = 50256


def forced_model(chain: list[int]) -> GPTNeoForCausalLM:
    """A model whose greedy next token after chain[i] is chain[i + 1], and eos after the last."""
    hidden = len(chain) + 2
    config = GPTNeoConfig(
        vocab_size=50257,
        max_position_embeddings=64,
        hidden_size=hidden,
        num_layers=1,
        num_heads=1,
        attention_types=[[["global"], 1]],
        window_size=16,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    model = GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" not in name:
                param.zero_()
        head = torch.nn.Linear(hidden, config.vocab_size, bias=False)
        head.weight.zero_()
        for i, token in enumerate(chain):
            model.transformer.wte.weight[token, i] = 1.0
            following = chain[i + 1] if i + 1 < len(chain) else EOS
            head.weight[following, i] = 10.0
    model.lm_head = head  # untied: the map above, not wte's transpose
    return model


@pytest.fixture(scope="module")
def forced():
    from gptneo_cli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(GPT2_ASSETS)
    chain = tokenizer.encode(":") + tokenizer.encode(TARGET)
    assert len(set(chain)) == len(chain)  # one successor per token
    # the point of the test: some tokens alone are not whole characters
    assert sum("\ufffd" in tokenizer.decode([t]) for t in chain) >= 4
    running = Running(forced_model(chain), tokenizer, name="forced", key=None)
    yield running, chain
    running.stop()


def sse_texts(srv: Running, route: str, body: dict) -> tuple[list[str], list[dict]]:
    """(each chunk's text, every event) of a streamed request, read raw off the wire."""
    events = []
    with srv.http.stream("POST", route, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    if route == "/v1/completions":
        texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    else:
        texts = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    return texts, events


def test_greedy_output_is_the_forced_text(forced) -> None:
    srv, chain = forced
    out = srv.http.post(
        "/v1/completions", json={"prompt": [chain[0]], "max_tokens": 40, "temperature": 0}
    ).json()
    assert out["choices"][0]["text"] == TARGET
    assert out["choices"][0]["finish_reason"] == "stop"  # eos after the last token


def test_no_chunk_holds_half_a_character(forced) -> None:
    srv, chain = forced
    body = {"prompt": [chain[0]], "max_tokens": 40, "temperature": 0}
    whole = srv.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    texts, _ = sse_texts(srv, "/v1/completions", body)
    assert "".join(texts) == whole == TARGET
    assert all("\ufffd" not in t for t in texts)
    assert len([t for t in texts if t]) >= 5  # it did stream, piece by piece
    # each chunk is whole characters: valid UTF-8 on its own (a lone surrogate would not be)
    for t in texts:
        assert t.encode("utf-8").decode("utf-8") == t


def test_chat_deltas_hold_whole_characters(forced) -> None:
    srv, _ = forced
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0}
    whole = srv.http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["message"]["content"] == TARGET.strip()
    texts, events = sse_texts(srv, "/v1/chat/completions", body)
    assert "".join(texts) == TARGET.strip()
    assert all("\ufffd" not in t for t in texts) and len([t for t in texts if t]) >= 5
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stop", ["テキ", "語の", "🙂 c"])
def test_a_stop_string_over_two_tokens_never_leaks(forced, stop) -> None:
    srv, chain = forced
    text = TARGET
    body = {"prompt": [chain[0]], "max_tokens": 40, "temperature": 0, "stop": [stop]}
    want = text[: text.index(stop)]
    whole = srv.http.post("/v1/completions", json=body).json()["choices"][0]
    assert whole["text"] == want and whole["finish_reason"] == "stop"
    texts, events = sse_texts(srv, "/v1/completions", body)
    assert "".join(texts) == want  # nothing of the stop string, not even its first half
    assert all("\ufffd" not in t for t in texts)
    finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finals[-1] == "stop"
