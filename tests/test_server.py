"""`gptneo serve`'s HTTP API, driven by the official `openai` client and plain httpx.

Servers bind 127.0.0.1 on a free port, run the bundled demo model `tiny`, and are started
and stopped inside the tests. Greedy results are checked against the model's own full
forward pass, so a batching or caching bug cannot hide.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from helpers_cli import cli_env, gptneo_command
from helpers_server import Running, error_of, greedy_ids, served_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptneo_cli.server.run import bind


@pytest.fixture(scope="module")
def tiny():
    return served_tiny()


@pytest.fixture(scope="module")
def srv(tiny):
    running = Running(*tiny, max_running=6, max_queue=64, prefill_chunk=16)
    yield running
    running.stop()


# ---- completions ---------------------------------------------------------------------------


def test_greedy_completion_equals_the_full_forward_pass(srv) -> None:
    out = srv.client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    ids = srv.tokenizer.encode("Once upon a time")
    want = srv.tokenizer.decode(greedy_ids(srv.model, ids, 12))
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 12
    assert out.object == "text_completion" and out.model == "tiny"


def test_prompt_as_token_ids_and_lists(srv) -> None:
    ids = srv.tokenizer.encode("Hello world")
    one = srv.client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    many = srv.client.completions.create(
        model="tiny", prompt=[ids, ids], max_tokens=5, temperature=0
    )
    texts = ["Hello world", "Hello world"]
    many_text = srv.client.completions.create(
        model="tiny", prompt=texts, max_tokens=5, temperature=0
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == many.choices[1].text == one.choices[0].text
    assert many_text.choices[1].text == one.choices[0].text


def test_n_choices_and_seeds_repeat(srv) -> None:
    kw = dict(model="tiny", prompt="The", max_tokens=10, temperature=1.0, n=3, seed=42)
    a = srv.client.completions.create(**kw)
    b = srv.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # different samples per choice


def test_stop_string_ends_the_text_and_never_leaks(srv) -> None:
    full = (
        srv.client.completions.create(model="tiny", prompt="def f(", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    stop = full[5:8]
    assert stop
    cut = srv.client.completions.create(
        model="tiny", prompt="def f(", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = srv.client.completions.create(
        model="tiny", prompt="def f(", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == cut.choices[0].text
    assert all(stop not in p for p in pieces)


def test_streaming_joins_to_the_full_text_with_usage(srv) -> None:
    whole = srv.client.completions.create(
        model="tiny", prompt="import", max_tokens=15, temperature=0
    )
    chunks = list(
        srv.client.completions.create(
            model="tiny",
            prompt="import",
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 15 and not chunks[-1].choices


def test_sse_ends_with_done_and_each_chunk_is_json(srv) -> None:
    with srv.http.stream(
        "POST",
        "/v1/completions",
        json={"prompt": "x", "max_tokens": 4, "stream": True, "temperature": 0},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for line in events[:-1]:
        assert json.loads(line.removeprefix("data: "))["object"] == "text_completion"


def test_loglikelihood_through_echo_and_logprobs_equals_the_forward_pass(srv) -> None:
    """What lm-evaluation-harness's local-completions does: prompt = context +
    continuation as tokens, echo, logprobs=1, max_tokens=1; it reads
    token_logprobs[ctxlen:-1] and checks greediness with top_logprobs."""
    context = srv.tokenizer.encode("The quick brown fox")
    continuation = srv.tokenizer.encode(" jumps over")
    ids = context + continuation
    out = srv.http.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": ids,
            "echo": True,
            "logprobs": 1,
            "max_tokens": 1,
            "temperature": 0,
        },
    ).json()
    lp = out["choices"][0]["logprobs"]
    ctxlen = len(context)
    got = sum(lp["token_logprobs"][ctxlen:-1])
    assert lp["token_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids) + 1
    with torch.no_grad():
        logp = srv.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = sum(float(logp[i - 1, ids[i]]) for i in range(ctxlen, len(ids)))
    assert got == pytest.approx(want, abs=1e-3)
    greedy = [int(logp[i - 1].argmax()) == ids[i] for i in range(ctxlen, len(ids))]
    tops = lp["top_logprobs"][ctxlen:-1]
    tokens = lp["tokens"][ctxlen:-1]
    assert [tok == max(top, key=top.get) for tok, top in zip(tokens, tops, strict=True)] == greedy
    # max_tokens 0 with echo scores the prompt only.
    only = srv.http.post(
        "/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0}
    ).json()["choices"][0]
    assert only["text"] == srv.tokenizer.decode(ids)
    assert sum(only["logprobs"]["token_logprobs"][ctxlen:]) == pytest.approx(want, abs=1e-3)


def test_generated_logprobs_have_top_alternatives(srv) -> None:
    out = srv.client.completions.create(
        model="tiny", prompt="a", max_tokens=4, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert max(top.values()) == pytest.approx(value)  # greedy: the best is chosen
        assert len(top) >= 3 and token in top


# ---- chat ------------------------------------------------------------------------------


def test_chat_renders_the_turn_template(srv) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    out = srv.client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    prompt = "Be brief.\n\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"
    ids = srv.tokenizer.encode(prompt)
    text = srv.tokenizer.decode(greedy_ids(srv.model, ids, 10))
    text = text.split("User:")[0]
    assert out.choices[0].message.content == text.strip()
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)


def test_chat_streaming_deltas_and_logprobs(srv) -> None:
    messages = [{"role": "user", "content": "Tell me"}]
    whole = srv.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    chunks = list(
        srv.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    content = whole.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


# ---- the rest of the API -----------------------------------------------------------------


def test_models_health_tokenize_detokenize_metrics(srv) -> None:
    models = srv.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert srv.http.get("/v1/models").json()["data"][0]["max_model_len"] == 256
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}  # no key needed
    tokens = srv.http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["tokens"] == srv.tokenizer.encode("Hello world")
    back = srv.http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    text = httpx.get(srv.url + "/metrics").text
    for name in (
        "gptneo_requests_total",
        "gptneo_running_rows",
        "gptneo_waiting_requests",
        "gptneo_prompt_tokens_total",
        "gptneo_generation_tokens_total",
        "gptneo_time_to_first_token_seconds_bucket",
        "gptneo_inter_token_latency_seconds_bucket",
    ):
        assert name in text


def test_classify_zero_shot_matches_the_classify_logic(srv) -> None:
    from gptneo_cli import tasks

    out = srv.http.post(
        "/v1/classify",
        json={"input": ["a football match", "a cake"], "labels": ["sports", "cooking"]},
    ).json()
    want = tasks.zero_shot(
        srv.model, srv.tokenizer, ["a football match", "a cake"], ["sports", "cooking"]
    )
    assert [d["label"] for d in out["data"]] == [w.label for w in want]
    assert out["data"][0]["scores"]["sports"] == pytest.approx(want[0].scores["sports"])


def test_openapi_schema_lists_routes_and_derived_ranges(srv) -> None:
    schema = srv.http.get("/openapi.json").json()
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/tokenize",
        "/detokenize",
        "/metrics",
        "/v1/classify",
    ):
        assert path in schema["paths"]
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1
    assert props["temperature"]["default"] == 0.9  # the options schema's default
    assert "top_k" in props and "min_tokens" in props and "ignore_eos" in props


# ---- errors and auth -----------------------------------------------------------------------


def test_errors_in_openai_shape(srv) -> None:
    r = srv.http.post("/v1/completions", json={"prompt": "x", "temperature": -1})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = srv.http.post("/v1/completions", json={"prompt": "x", "top_p": "high"})
    assert r.status_code == 400 and error_of(r)["param"] == "top_p"
    assert isinstance(error_of(r)["message"], str)
    r = srv.http.post("/v1/completions", json={"max_tokens": 3})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = srv.http.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and error_of(r)
    r = srv.http.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = srv.http.get("/v1/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    r = srv.http.post("/v1/completions", json={"prompt": "x", "n": 1000})
    assert r.status_code == 400 and error_of(r)["param"] == "n"
    r = srv.http.post("/v1/completions", json={"prompt": "x" * 100_000})
    assert r.status_code == 413 and error_of(r)


def test_draft_models_are_a_clear_400_prompt_lookup_is_served(srv) -> None:
    r = srv.http.post("/v1/completions", json={"prompt": "x", "draft_model": "self-int8"})
    assert r.status_code == 400 and error_of(r)["param"] == "draft_model"
    assert "no draft model is loaded here" in error_of(r)["message"]
    for field, value in (("prompt_lookup", 3), ("draft_tokens", 4), ("prompt_lookup", 0)):
        r = srv.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, field: value})
        assert r.status_code == 200


def test_a_prompt_longer_than_the_context_is_400_before_compute(srv) -> None:
    before = srv.scheduler.prompt_tokens_total
    r = srv.http.post("/v1/completions", json={"prompt": list(range(1, 250)), "max_tokens": 20})
    err = error_of(r)
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "256" in err["message"]
    assert srv.scheduler.prompt_tokens_total == before
    with pytest.raises(openai.BadRequestError):
        srv.client.completions.create(model="tiny", prompt=list(range(1, 300)), max_tokens=1)


def test_auth_needs_the_key_but_health_is_open(srv) -> None:
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.post(srv.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(srv.url + "/health").status_code == 200


def test_no_cors_headers_unless_asked(srv) -> None:
    r = srv.http.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_one_log_line_per_request_without_prompt_text(srv) -> None:
    srv.lines.clear()
    srv.client.completions.create(model="tiny", prompt="SECRET-PROMPT", max_tokens=2)
    deadline = time.monotonic() + 10  # the line is written just after the response is sent
    while not any("/v1/completions" in x for x in srv.lines) and time.monotonic() < deadline:
        time.sleep(0.01)
    line = next(x for x in srv.lines if "/v1/completions" in x)
    assert line.startswith("POST /v1/completions 200 2 tokens")
    assert "SECRET" not in " ".join(srv.lines)


# ---- concurrency, disconnects, limits ------------------------------------------------------


def test_sixteen_concurrent_streams_each_equal_the_request_alone(srv) -> None:
    words = [
        "The",
        "import os",
        "def main():",
        "Once upon a time there",
        "x = 1",
        "class A:",
        "# comment",
        "for i in range(10):",
    ]
    specs = [(words[i % 8] * (1 + i // 8), 4 + (i * 3) % 17) for i in range(16)]
    alone = [
        srv.client.completions.create(
            model="tiny", prompt=p, max_tokens=m, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p, m in specs
    ]

    def stream(spec: tuple[str, int]) -> str:
        p, m = spec
        chunks = srv.client.completions.create(
            model="tiny",
            prompt=p,
            max_tokens=m,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, specs))
    assert together == alone


def test_a_client_that_disconnects_frees_its_row(srv) -> None:
    with srv.http.stream(
        "POST",
        "/v1/completions",
        json={"prompt": "a", "max_tokens": 240, "stream": True, "ignore_eos": True},
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert srv.metric("gptneo_running_rows") == 1
    deadline = time.monotonic() + 20
    while srv.metric("gptneo_running_rows") != 0:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.05)
    generated = srv.metric("gptneo_generation_tokens_total")
    time.sleep(0.3)
    assert srv.metric("gptneo_generation_tokens_total") == generated  # nothing runs on


def test_full_queue_answers_429_with_retry_after(tiny) -> None:
    small = Running(*tiny, key=None, max_running=1, max_queue=0)
    blocker = threading.Event()
    try:
        small.scheduler.call(blocker.wait)  # hold the scheduler's thread: nothing advances
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                small.http.post, "/v1/completions", json={"prompt": "a", "max_tokens": 2}
            )
            deadline = time.monotonic() + 20
            while small.scheduler.stats()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            busy = small.http.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
            blocker.set()
            assert first.result(60).status_code == 200
        assert busy.status_code == 429
        assert int(busy.headers["retry-after"]) >= 1
        assert error_of(busy)["type"] == "rate_limit_error"
    finally:
        blocker.set()
        small.stop()


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_FIELDS = [
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "echo",
    "stream",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stream_options",
    "messages",
    "top_logprobs",
    "model",
]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    route=st.sampled_from(
        ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/classify"]
    ),
    body=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6),
    small=st.fixed_dictionaries({"max_tokens": st.integers(0, 3)}),
)
def test_fuzzed_bodies_never_give_a_5xx(srv, route, body, small) -> None:
    body = {**body, **small} if "max_tokens" not in body else body
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2
    r = srv.http.post(route, json=body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error_of(r)
    assert srv.http.get("/health").status_code == 200


# ---- the command -------------------------------------------------------------------------


def test_serve_command_finishes_in_flight_requests_on_sigterm(tmp_path) -> None:
    env = cli_env(tmp_path)
    proc = subprocess.Popen(
        [*gptneo_command(), "serve", "--model", "tiny", "--port", "0", "--shutdown-timeout", "20"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, line
        base = match.group(0)
        assert "model tiny" in line
        texts: list[str] = []

        def client() -> None:
            with httpx.stream(
                "POST",
                base + "/v1/completions",
                timeout=60,
                json={
                    "prompt": "a",
                    "max_tokens": 60,
                    "stream": True,
                    "ignore_eos": True,
                    "temperature": 0,
                },
            ) as r:
                for line in r.iter_lines():
                    if line:
                        texts.append(line)

        worker = threading.Thread(target=client)
        worker.start()
        deadline = time.monotonic() + 30
        while not texts and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert texts[-1] == "data: [DONE]"
    finals = [
        json.loads(t[6:])["choices"][0]["finish_reason"] for t in texts if t.startswith("data: {")
    ]
    assert finals[-1] == "length"  # the request in flight ran to its end


def test_serve_refuses_a_busy_port_with_one_line(tmp_path) -> None:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        done = subprocess.run(
            [*gptneo_command(), "serve", "--model", "tiny", "--port", str(port)],
            capture_output=True,
            text=True,
            env=cli_env(tmp_path),
            cwd=tmp_path,
            timeout=60,
        )
    finally:
        sock.close()
    assert done.returncode == 1
    assert done.stderr.startswith("Error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_wide_open_host_without_key_warns(tmp_path) -> None:
    env = cli_env(tmp_path)
    proc = subprocess.Popen(
        [*gptneo_command(), "serve", "--model", "tiny", "--port", "0", "--host", "0.0.0.0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    try:
        first = proc.stderr.readline()
        second = proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first.startswith("Warning: listening on 0.0.0.0 without --api-key")
    assert "http://0.0.0.0:" in second
    assert code == 0


assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [True, 5]}, "tokens"),
        ("/v1/completions", {"prompt": [True, 5], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": [[5, False]], "max_tokens": 2}, "prompt"),
    ],
)
def test_json_booleans_are_not_token_ids(srv, path, body, param) -> None:
    """JSON true/false must not become tokens 1/0 (schemathesis found /detokenize taking them)."""
    res = srv.http.post(path, json=body)
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"].startswith(param)  # e.g. "tokens.0"
