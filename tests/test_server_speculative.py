"""Speculative decoding (prompt lookup) in `gptneo serve`: the official `openai` client gets
the same greedy text with and without drafts, streamed or not; /metrics counts drafted and
kept tokens; the server-wide default applies to requests that leave the fields out; bad
values are one-line 400s. Servers bind 127.0.0.1 and run the bundled demo model `tiny`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers_server import Running, error_of, served_tiny

from gptneo_cli import speculative
from gptneo_cli.hub import resolve_model_dir

#: Text that repeats, so drafts copied from it are often right.
CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef "
PROMPTS = [CODE, "Once upon a time", CODE[:30], "import os\nimport sys\nimport "]


@pytest.fixture(scope="module")
def tiny():
    return served_tiny()


@pytest.fixture(scope="module")
def srv(tiny):
    running = Running(*tiny, max_running=3, max_queue=64, prefill_chunk=16)
    yield running
    running.stop()


def _complete(srv, prompt: str, **extra):
    out = srv.client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=40,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )
    return out.choices[0]


def _stream(srv, prompt: str, **extra) -> list:
    """The streamed choices of a greedy 40-token completion (chunks without one dropped)."""
    chunks = srv.client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=40,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, **extra},
    )
    return [c.choices[0] for c in chunks if c.choices]


def test_greedy_text_is_the_same_with_prompt_lookup(srv) -> None:
    drafted = srv.metric("gptneo_draft_tokens_total")
    accepted = srv.metric("gptneo_draft_accepted_tokens_total")
    plain = [_complete(srv, p).text for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:  # rows that draft beside rows that don't
        jobs = [pool.submit(_complete, srv, p, prompt_lookup=3, draft_tokens=6) for p in PROMPTS]
        jobs += [pool.submit(_complete, srv, p) for p in PROMPTS]
        choices = [j.result() for j in jobs]
    assert [c.text for c in choices] == plain + plain
    assert all(c.finish_reason == "length" for c in choices)
    assert srv.metric("gptneo_draft_tokens_total") > drafted
    assert srv.metric("gptneo_draft_accepted_tokens_total") > accepted


def test_streaming_with_prompt_lookup_gives_the_same_text(srv) -> None:
    want = _complete(srv, CODE).text
    pieces = _stream(srv, CODE, prompt_lookup=2, draft_tokens=8)
    assert "".join(p.text for p in pieces) == want
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["length"]
    chat = dict(model="tiny", messages=[{"role": "user", "content": CODE}], max_tokens=30)
    whole = srv.client.chat.completions.create(**chat, temperature=0)
    streamed = srv.client.chat.completions.create(
        **chat, temperature=0, stream=True, extra_body={"prompt_lookup": 3}
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content


def test_stop_string_cuts_the_same_with_prompt_lookup(srv) -> None:
    full = _complete(srv, CODE).text
    stop = full[7:25]
    assert stop.strip()
    a = _complete(srv, CODE, stop=[stop])
    b = _complete(srv, CODE, stop=[stop], prompt_lookup=3)
    assert (
        (b.text, b.finish_reason) == (a.text, a.finish_reason) == (full[: full.index(stop)], "stop")
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("prompt_lookup", -1),
        ("prompt_lookup", 17),
        ("prompt_lookup", "3"),
        ("prompt_lookup", 2.5),
        ("prompt_lookup", True),
        ("draft_tokens", 0),
        ("draft_tokens", -2),
        ("draft_tokens", 33),
        ("draft_tokens", "many"),
        ("draft_model", "self-int8"),
    ],
)
def test_bad_drafting_values_are_one_line_400s(srv, field, value) -> None:
    for route, body in (
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        r = srv.http.post(route, json={**body, "max_tokens": 2, field: value})
        err = error_of(r)
        assert r.status_code == 400 and err["param"] == field
        assert "\n" not in err["message"] and field in err["message"]
    if field == "draft_model":
        assert "no draft model is loaded here" in err["message"]


def test_prompt_lookup_zero_is_plain_decoding(srv) -> None:
    drafted = srv.metric("gptneo_draft_tokens_total")
    r = srv.http.post("/v1/completions", json={"prompt": CODE, "max_tokens": 8, "prompt_lookup": 0})
    assert r.status_code == 200
    assert srv.metric("gptneo_draft_tokens_total") == drafted


def test_the_servers_default_applies_to_requests_that_leave_it_out(tiny) -> None:
    running = Running(*tiny, max_running=2, options={"drafting": {"prompt_lookup": 3}})
    try:
        before = running.metric("gptneo_draft_tokens_total")
        assert before == 0
        on = _complete(running, CODE)
        after = running.metric("gptneo_draft_tokens_total")
        assert after > 0
        off = _complete(running, CODE, prompt_lookup=0)
        assert running.metric("gptneo_draft_tokens_total") == after
        assert on.text == off.text
    finally:
        running.stop()


def test_a_served_draft_model_gives_the_same_text(tiny) -> None:
    """gptneo serve --draft-model self-int8: requests draft with it unless they ask for
    prompt lookup (or 0: no drafts); another draft model is a 400 naming the loaded one."""
    model, tokenizer = tiny
    speculative.load_draft(
        model, "self-int8", tokenizer=tokenizer, folder=resolve_model_dir("tiny")
    )
    options = {"drafting": {"draft_model": "self-int8", "draft_tokens": 4}}
    running = Running(model, tokenizer, max_running=3, options=options)
    try:
        plain = [_complete(running, p, prompt_lookup=0).text for p in PROMPTS]
        assert running.metric("gptneo_draft_tokens_total") == 0
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            drafted = list(pool.map(lambda p: _complete(running, p).text, PROMPTS))
        assert drafted == plain
        assert running.metric("gptneo_draft_accepted_tokens_total") > 0
        pieces = _stream(running, CODE, draft_model="self-int8", draft_tokens=7)
        assert "".join(p.text for p in pieces) == plain[0]
        assert _complete(running, CODE, prompt_lookup=3).text == plain[0]
        r = running.http.post("/v1/completions", json={"prompt": "x", "draft_model": "125m"})
        err = error_of(r)
        assert r.status_code == 400 and err["param"] == "draft_model"
        assert "'self-int8' only" in err["message"]
    finally:
        running.stop()


@pytest.mark.parametrize(
    "args,flag",
    [
        (("--prompt-lookup", "-1"), "--prompt-lookup"),
        (("--prompt-lookup", "17"), "--prompt-lookup"),
        (("--draft-tokens", "0"), "--draft-tokens"),
        (("--draft-tokens", "33"), "--draft-tokens"),
        (("--prompt-lookup", "2", "--draft-model", "self-int8"), "--draft-model"),
        (("--draft-model", " "), "--draft-model"),
    ],
)
def test_bad_serve_flags_are_one_line_errors_before_loading(tmp_path, args, flag) -> None:
    from helpers_cli import run_cli

    done = run_cli("serve", "--model", "tiny", "--port", "0", *args, home=tmp_path)
    err = done.stderr.decode().strip()
    assert done.returncode == 2 and flag in err and "\n" not in err
    assert "Traceback" not in err
