"""The server's edges: bodies that are too large without a content-length, text that is not
valid Unicode, bodies that are not objects, methods a route does not take, `--log-prompts`,
the metric types, and a shutdown whose grace period runs out."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time

import httpx
import pytest
from helpers_cli import cli_env, gptneo_command
from helpers_server import Running, error_of, served_tiny


@pytest.fixture(scope="module")
def tiny():
    return served_tiny()


@pytest.fixture(scope="module")
def srv(tiny):
    running = Running(*tiny, key=None, options={"log_prompts": True})
    yield running
    running.stop()


def _raw(srv: Running, path: str, content: bytes | object) -> httpx.Response:
    return srv.http.post(path, content=content, headers={"content-type": "application/json"})


def test_a_streamed_body_past_the_cap_is_413(srv) -> None:
    def chunks():  # no content-length: the cap applies while it arrives
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = _raw(srv, "/v1/completions", chunks())
    assert r.status_code == 413 and "larger than 65536 bytes" in error_of(r)["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "a\\ud800"}', "prompt"),
        ("/v1/completions", '{"prompt": "a", "stop": ["\\udc00"]}', "stop"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
        ("/v1/classify", '{"input": ["ok", "\\ud800"], "labels": ["a", "b"]}', "input"),
        ("/v1/classify", '{"input": "ok", "labels": ["\\ud800", "b"]}', "labels"),
        ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ],
)
def test_text_that_is_not_unicode_is_a_400_naming_the_field(srv, path, body, param) -> None:
    r = _raw(srv, path, body.encode())
    err = error_of(r)
    assert r.status_code == 400 and "lone surrogate" in err["message"]
    if param is not None:
        assert err["param"] == param
    else:
        assert err["param"].startswith("messages.0")


def test_bodies_that_are_not_objects_and_wrong_methods(srv) -> None:
    r = _raw(srv, "/v1/completions", b"")
    assert r.status_code == 400 and error_of(r)["message"] == (
        "the request body is missing: send a JSON object"
    )
    r = _raw(srv, "/v1/completions", b"[1, 2]")
    assert r.status_code == 400 and error_of(r)
    r = srv.http.get("/v1/completions")
    assert r.status_code == 405 and "GET is not allowed" in error_of(r)["message"]
    r = srv.http.post("/v1/models")
    assert r.status_code == 405 and error_of(r)


def test_log_prompts_puts_the_prompt_in_the_line(srv) -> None:
    srv.lines.clear()
    srv.http.post("/v1/completions", json={"prompt": "SECRET\nline", "max_tokens": 1})
    deadline = time.monotonic() + 10
    while not srv.lines and time.monotonic() < deadline:
        time.sleep(0.01)
    (line,) = srv.lines
    assert line.startswith("POST /v1/completions 200 1 tokens")
    assert line.endswith("prompt='SECRET\\nline'")  # quoted: one log line per request


def test_token_totals_are_counters(srv) -> None:
    text = httpx.get(srv.url + "/metrics").text
    assert "# TYPE gptneo_prompt_tokens_total counter" in text
    assert "# TYPE gptneo_generation_tokens_total counter" in text
    assert "# TYPE gptneo_running_rows gauge" in text


def test_shutdown_cancels_what_outlives_the_grace_period(tiny) -> None:
    """SIGTERM as `gptneo serve` handles it, with a grace of 1 s that the request cannot
    meet (the scheduler's thread is held): it is cancelled, and its stream still ends
    cleanly, with finish_reason "abort" and [DONE]; the server stops."""
    srv = Running(*tiny, key=None, close_on_exit=True)
    events: list[str] = []
    blocker = threading.Event()

    def client() -> None:
        body = {"prompt": "a", "max_tokens": 240, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                events.extend(line for line in r.iter_lines() if line)
        except httpx.HTTPError:
            events.append("cut")

    reader = threading.Thread(target=client)
    reader.start()
    deadline = time.monotonic() + 30
    while len(events) < 2:
        assert time.monotonic() < deadline, "no token arrived"
        time.sleep(0.01)
    srv.scheduler.call(blocker.wait)  # from the next step on, nothing advances
    srv.server.handle_exit(signal.SIGTERM, None)
    try:
        while not srv.scheduler._stopped:  # the grace ran out: close() cancelled the rest
            assert time.monotonic() < deadline + 60, "the scheduler was not closed"
            time.sleep(0.01)
    finally:
        blocker.set()
    reader.join(60)
    srv.thread.join(60)
    assert not reader.is_alive() and not srv.thread.is_alive()
    srv.http.close()
    assert events[-1] == "data: [DONE]" and "cut" not in events
    finals = [
        json.loads(e[6:])["choices"][0]["finish_reason"]
        for e in events
        if e.startswith("data: {") and json.loads(e[6:])["choices"]
    ]
    assert finals[-1] == "abort" and "length" not in finals
    assert srv.scheduler.generated_tokens_total < 240


def test_serve_command_with_no_grace_still_ends_streams_cleanly(tmp_path) -> None:
    """--shutdown-timeout 0: SIGTERM cancels the request in flight at once; its stream ends
    with a finish reason and [DONE] (not a cut connection), and the command exits 0."""
    args = ["serve", "--model", "tiny", "--port", "0", "--shutdown-timeout", "0"]
    proc = subprocess.Popen(
        [*gptneo_command(), *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=cli_env(tmp_path),
        cwd=tmp_path,
        text=True,
    )
    events: list[str] = []
    try:
        match = re.search(r"http://127\.0\.0\.1:\d+", proc.stderr.readline())
        assert match
        body = {"prompt": "a", "max_tokens": 240, "ignore_eos": True, "stream": True, "n": 8}
        with httpx.stream("POST", match.group(0) + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert events[-1] == "data: [DONE]"
    finals = {}
    for e in events[:-1]:
        choice = json.loads(e[6:])["choices"][0]
        if choice["finish_reason"]:
            finals[choice["index"]] = choice["finish_reason"]
    assert sorted(finals) == list(range(8))  # every choice got its ending
    assert "abort" in finals.values()
