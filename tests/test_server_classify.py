"""A sequence-classification checkpoint behind `gptneo serve` and `gptneo batch`: its head
answers /v1/classify (the `classify` command's logic, gptneo_cli.tasks.classify_texts),
and the text-generation routes refuse it with a 400 in OpenAI's shape.

The checkpoint is a tiny random transformers model with a tiny BPE, built here
(test_tasks.make_checkpoint); transformers' own forward pass is the oracle.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch
from helpers_cli import run_cli
from helpers_server import Running, error_of
from test_tasks import make_checkpoint, oracle_probs, raw_tokenizer

from gptneo_cli import tasks
from gptneo_cli.batch.jobs import parse_line
from gptneo_cli.batch.runner import make_runner
from gptneo_cli.loader import load_folder

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["Stocks fell.", "The match ended in a draw", "Héllo café 🙂"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    theirs = make_checkpoint(folder, "sequence", scale=0.3)
    return folder, theirs


@pytest.fixture(scope="module")
def served(checkpoint):
    folder, theirs = checkpoint
    model, tokenizer = load_folder(folder, head=tasks.checkpoint_head(folder))
    running = Running(model, tokenizer, name="clf")
    yield running, theirs
    running.stop()


def test_checkpoint_head_tells_a_classifier_from_a_language_model(tmp_path) -> None:
    seq, seq_bin, lm = tmp_path / "seq", tmp_path / "seq-bin", tmp_path / "lm"
    make_checkpoint(seq, "sequence")
    make_checkpoint(lm, "causal")
    model = make_checkpoint(seq_bin, "sequence")
    for path in seq_bin.glob("*.safetensors"):
        path.unlink()
    model.save_pretrained(seq_bin, safe_serialization=False)  # .bin: read config.json
    assert tasks.checkpoint_head(seq) == tasks.SEQUENCE_HEAD
    assert tasks.checkpoint_head(seq_bin) == tasks.SEQUENCE_HEAD
    assert tasks.checkpoint_head(lm) == tasks.CAUSAL_LM


def test_classify_uses_the_head_and_its_labels(served) -> None:
    srv, theirs = served
    r = srv.http.post("/v1/classify", json={"input": TEXTS})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    for text, d in zip(TEXTS, data, strict=True):
        want = oracle_probs(theirs, raw_tokenizer().encode(text).ids)
        got = torch.tensor([d["scores"][lab] for lab in LABELS], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert d["label"] == LABELS[int(want.argmax())]
        assert "logprobs" not in d  # no zero-shot fields
    # the head's labels in another order are accepted: the same answer
    again = srv.http.post("/v1/classify", json={"input": TEXTS, "labels": LABELS[::-1]})
    assert again.json()["data"] == data


def test_labels_that_are_not_the_heads_are_a_400_naming_them(served) -> None:
    srv, _ = served
    r = srv.http.post("/v1/classify", json={"input": "x", "labels": ["sports", "finance"]})
    err = error_of(r)
    assert r.status_code == 400 and err["param"] == "labels"
    assert "sports" in err["message"] and "negative" in err["message"]
    r = srv.http.post("/v1/classify", json={"input": ["ok", ""]})
    assert r.status_code == 400 and error_of(r)["param"] == "input"


def test_generation_routes_refuse_a_classifier_in_openai_shape(served) -> None:
    srv, _ = served
    for route, body in (
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "Hello", "stream": True}),
    ):
        r = srv.http.post(route, json=body)
        err = error_of(r)
        assert r.status_code == 400 and err["code"] == "model_not_generative", route
        assert "no language-model head" in err["message"] and "/v1/classify" in err["message"]
    with pytest.raises(openai.BadRequestError, match="no language-model head"):
        srv.client.completions.create(model="clf", prompt="x", max_tokens=1)
    assert srv.http.post("/tokenize", json={"prompt": "Stocks"}).status_code == 200
    assert srv.scheduler.max_running == 1  # a classifier never decodes: one cache row


def test_zero_shot_server_still_needs_labels(tmp_path) -> None:
    folder = tmp_path / "lm"
    make_checkpoint(folder, "causal", scale=0.3)
    model, tokenizer = load_folder(folder, head=tasks.checkpoint_head(folder))
    srv = Running(model, tokenizer, name="lm")
    try:
        r = srv.http.post("/v1/classify", json={"input": "Stocks fell."})
        assert r.status_code == 400 and error_of(r)["param"] == "labels"
        r = srv.http.post("/v1/classify", json={"input": "x", "labels": ["a", "a"]})
        assert r.status_code == 400 and "distinct" in error_of(r)["message"]
        assert error_of(r)["param"] == "labels"
        ok = srv.http.post("/v1/classify", json={"input": "Stocks fell.", "labels": ["a", "b"]})
        want = tasks.zero_shot(model, tokenizer, ["Stocks fell."], ["a", "b"])
        assert ok.json()["data"][0]["scores"]["a"] == pytest.approx(want[0].scores["a"])
    finally:
        srv.stop()


def _line(cid: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def test_batch_lines_run_the_same_code_on_a_classifier(checkpoint) -> None:
    folder, theirs = checkpoint
    model, tokenizer = load_folder(folder, head=tasks.checkpoint_head(folder))
    lines = [
        _line("cls", "/v1/classify", {"input": TEXTS[0]}),
        _line("bad", "/v1/classify", {"input": TEXTS[0], "labels": ["x", "y"]}),
        _line("gen", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
    ]
    items = [parse_line(text, i + 1, plain=False) for i, text in enumerate(lines)]
    runner, scheduler = make_runner(model, tokenizer, model_name="clf", max_running=4)
    records: list[dict] = []
    try:
        runner.run(items, records.append)
    finally:
        scheduler.close(0)
    out = {r["custom_id"]: r for r in records}
    want = oracle_probs(theirs, raw_tokenizer().encode(TEXTS[0]).ids)
    got = out["cls"]["response"]["body"]["data"][0]["scores"]
    assert [got[lab] for lab in LABELS] == pytest.approx(want.tolist(), abs=1e-5)
    assert out["bad"]["response"]["status_code"] == 400
    assert out["bad"]["response"]["body"]["error"]["param"] == "labels"
    assert out["gen"]["error"]["code"] == "model_not_generative"


def test_batch_command_loads_the_head_of_a_classifier(checkpoint, tmp_path) -> None:
    folder, theirs = checkpoint
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        _line("cls", "/v1/classify", {"input": TEXTS[1]})
        + "\n"
        + _line("gen", "/v1/completions", {"prompt": "x"})
        + "\n",
        encoding="utf-8",
    )
    args = ("batch", str(src), "-o", str(out), "-m", str(folder), "--dtype", "float32")
    done = run_cli(*args, home=tmp_path)
    assert done.returncode == 1, done.stderr  # the completion line failed
    assert b"Traceback" not in done.stderr
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    want = oracle_probs(theirs, raw_tokenizer().encode(TEXTS[1]).ids)
    data = records["cls"]["response"]["body"]["data"][0]
    assert data["label"] == LABELS[int(want.argmax())]
    assert data["scores"]["neutral"] == pytest.approx(float(want[1]), abs=1e-5)
    assert records["gen"]["error"]["code"] == "model_not_generative"
