"""Schema fuzzing: schemathesis generates requests from the server's own /openapi.json, for
every route, schema-valid ones and schema-breaking ones, and runs them against the app in
process (ASGI, no socket). Its checks: never a 5xx, only documented statuses and content
types, error bodies in the documented (OpenAI) shape, schema-breaking data rejected, and
the API key enforced where the schema says it is. Afterwards the server still answers.

One check is left out on purpose: "schema-valid data is accepted". Some limits are the
model's, not the schema's (token ids below the vocabulary size, a prompt that fits the
context, a `model` that is the one served), so a schema-valid body may rightly get a 400.
"""

from __future__ import annotations

import pytest
from helpers_server import KEY
from hypothesis import HealthCheck, given, settings
from starlette.testclient import TestClient

from gptneo_cli.api import make_scheduler
from gptneo_cli.fast import FastCausalLM
from gptneo_cli.hub import resolve_model_dir
from gptneo_cli.server.app import ServeOptions, create_app

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

ROUTES = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/classify"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app():
    from gptneo_cli.tokenizer import load_tokenizer

    path = resolve_model_dir("tiny")
    model, tokenizer = FastCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    scheduler = make_scheduler(model, tokenizer, max_running=4, max_queue=8)
    options = ServeOptions("tiny", api_key=KEY, max_body_bytes=64 * 1024)
    yield _without_lifespan(create_app(model, tokenizer, scheduler, options))
    scheduler.close(0)


def _without_lifespan(app):
    """The app, minus its lifespan: the in-process client starts and stops the app around
    every call, and the app's shutdown closes the scheduler (a real server stops once)."""

    async def wrapped(scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return

    return wrapped


@pytest.fixture(scope="module")
def schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_schema_lists_every_route_and_documents_errors(schema) -> None:
    raw = schema.raw_schema
    found = sorted((m.upper(), p) for p, ops in raw["paths"].items() for m in ops)
    assert found == sorted(ROUTES)
    completions = raw["paths"]["/v1/completions"]["post"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(completions["responses"])
    assert "422" not in completions["responses"]  # FastAPI's default: never sent here
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert "ErrorResponse" in raw["components"]["schemas"]
    assert "HTTPValidationError" not in raw["components"]["schemas"]
    assert completions["security"] and "security" not in raw["paths"]["/health"]["get"]


def _small(case) -> None:
    """Keep generated work small: at most 3 new tokens and 2 choices."""
    if not isinstance(case.body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = case.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 3:
            case.body[name] = 3
    n = case.body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 2:
        case.body["n"] = 2


#: Schema-breaking requests need something to break: a body (the GET routes take nothing).
RUNS = [(m, p, GenerationMode.POSITIVE) for m, p in ROUTES] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in ROUTES if m == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), RUNS)
def test_fuzzed_requests_get_documented_answers(app, schema, method, path, mode) -> None:
    operation = schema[path][method]

    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: CI is reproducible
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        _small(case)
        case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

    check()
    with TestClient(app) as client:  # the server still answers, and still generates
        assert client.get("/health").json() == {"status": "ok"}
        r = client.post(
            "/v1/completions",
            headers=AUTH,
            json={"prompt": "Hello", "max_tokens": 2, "temperature": 0, "ignore_eos": True},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
