"""Shared pieces of the server tests: a server on a thread, the greedy reference, and the
OpenAI error shape."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import httpx
import openai
import torch

from gptneo_cli.api import make_scheduler
from gptneo_cli.server.app import ServeOptions, create_app
from gptneo_cli.server.run import bind, make_server, url

KEY = "test-key"


class Running:
    """A server on a thread, with what the tests need to check it. `options` go to
    ServeOptions (e.g. chat_template); `sched` to the scheduler."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        key: str | None = KEY,
        name: str = "tiny",
        options: dict[str, Any] | None = None,
        close_on_exit: bool = False,
        **sched: Any,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        sched.setdefault("max_running", 16)
        sched.setdefault("max_queue", 64)
        self.scheduler = make_scheduler(model, tokenizer, **sched)
        self.lines: list[str] = []
        app = create_app(
            model,
            tokenizer,
            self.scheduler,
            ServeOptions(
                name,
                api_key=key,
                max_body_bytes=64 * 1024,
                shutdown_timeout=1,
                log=self.lines.append,
                **(options or {}),
            ),
        )
        self.app = app
        sock = bind("127.0.0.1", 0)
        self.url = url(sock)
        on_exit = None
        if close_on_exit:  # as `gptneo serve` does: the grace period, then cancel the rest

            def on_exit() -> None:
                threading.Thread(target=self.scheduler.close, args=(1,), daemon=True).start()

        self.server = make_server(app, 1, on_exit=on_exit)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.http = httpx.Client(
            base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"} if key else {}
        )
        self.client = openai.OpenAI(
            base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60
        )

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))


def served_tiny() -> tuple[Any, Any]:
    """The bundled demo model as `gptneo serve` loads it (the fast layout), and its
    tokenizer: what the server tests serve (each file in a module-scoped fixture)."""
    from gptneo_cli.fast import FastCausalLM
    from gptneo_cli.hub import resolve_model_dir
    from gptneo_cli.tokenizer import load_tokenizer

    path = resolve_model_dir("tiny")
    return FastCausalLM.from_pretrained(path).eval(), load_tokenizer(path)


def greedy_ids(model: Any, ids: list[int], steps: int) -> list[int]:
    """The reference: greedy tokens from full forward passes, no cache, no batching."""
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
    return out


def error_of(response: httpx.Response) -> dict:
    """The error object of an answer, checked to be in OpenAI's shape."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]
