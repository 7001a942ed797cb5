"""`gptneo batch`: the input and output files, resume after SIGKILL, bad lines, duplicate
ids, stdin, chat and classify, memory that does not grow with the input.

The model is the bundled demo `tiny`, loaded as `gptneo batch` loads it; greedy results
are compared with an uninterrupted run (in-process, through the same runner).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers_cli import cli_env, gptneo_command, run_cli

from gptneo_cli.batch.jobs import (
    BatchInput,
    BatchInputError,
    Item,
    OutputWriter,
    parse_line,
    scan_output,
)
from gptneo_cli.batch.runner import make_runner


@pytest.fixture(scope="module")
def tiny():
    from gptneo_cli.fast import FastCausalLM
    from gptneo_cli.hub import resolve_model_dir
    from gptneo_cli.tokenizer import load_tokenizer

    path = resolve_model_dir("tiny")
    return FastCausalLM.from_pretrained(path), load_tokenizer(path)


def run_items(tiny, items, max_running=4, **kw):
    runner, scheduler = make_runner(*tiny, model_name="tiny", max_running=max_running, **kw)
    records: list[dict] = []
    try:
        runner.run(items, records.append)
    finally:
        scheduler.close(0)
    return records


def request(
    cid: str, prompt: str, max_tokens: int = 6, url: str = "/v1/completions", **body
) -> str:
    if url == "/v1/completions":
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def by_id(lines: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for line in lines:
        record = json.loads(line)
        assert record["custom_id"] not in out, f"{record['custom_id']} twice"
        out[record["custom_id"]] = record
    return out


def text_of(record: dict) -> str:
    return record["response"]["body"]["choices"][0]["text"]


PROMPTS = [f"def f{i}(x):" if i % 2 else f"Once upon a time {i}" for i in range(24)]


# ---------------------------------------------------------------------------- the input
def test_line_formats_and_bad_lines_name_their_line() -> None:
    assert parse_line("  \n", 3, plain=False) is None
    short = parse_line('{"prompt": "hi", "max_tokens": 2}', 4, plain=False)
    assert short.custom_id == "line-4" and short.body == {"prompt": "hi", "max_tokens": 2}
    assert parse_line("hello\n", 7, plain=True).body == {"prompt": "hello"}
    full = parse_line(request("a", "x"), 1, plain=False)
    assert (full.custom_id, full.url, full.error) == ("a", "/v1/completions", None)
    cases = {
        "{not json": "not valid JSON",
        "[1, 2]": "not a JSON object",
        '{"custom_id": "z", "url": "/v1/embeddings", "body": {}}': "url must be one of",
        '{"custom_id": "z", "method": "GET", "url": "/v1/completions", "body": {}}': "POST",
        '{"custom_id": "z", "url": "/v1/completions", "body": "x"}': "body must be",
        '{"custom_id": 5, "url": "/v1/completions", "body": {}}': "custom_id must be",
        '{"hello": 1}': 'needs "custom_id"',
    }
    for text, reason in cases.items():
        item = parse_line(text, 9, plain=False)
        assert item.error.startswith("line 9: ") and reason in item.error, (text, item.error)


def test_duplicate_ids_are_found_with_their_lines(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [request(f"id{i}", "x") for i in range(50)] + [request("id7", "y")]
    src.write_text("\n".join(lines) + "\n")
    with BatchInput(src) as source, pytest.raises(BatchInputError) as err:
        source.check_ids()
    assert "'id7'" in str(err.value) and "lines 8 and 51" in str(err.value)
    src.write_text("\n".join(lines[:-1]) + "\n")
    with BatchInput(src) as source:
        assert source.check_ids() == 50


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_memory_does_not_grow_with_the_input(tmp_path: Path) -> None:
    """Streaming the items holds one line; the duplicate check 8 bytes per line (+ sort)."""
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    line = '{"prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 1}\n'
    small.write_text(line * 2_000)
    big.write_text(line * 100_000)

    def stream(path: Path) -> None:
        with BatchInput(path) as source:
            for _ in source.items():
                pass

    def check(path: Path) -> None:
        with BatchInput(path) as source:
            source.check_ids()

    assert _peak(lambda: stream(big)) - _peak(lambda: stream(small)) < 64 * 1024
    grown = _peak(lambda: check(big)) - _peak(lambda: check(small))
    assert grown < 24 * 100_000  # array growth slack included; a set of strings is ~150 B/line


def test_the_runner_reads_only_as_far_as_the_scheduler_has_room(tiny) -> None:
    pulled: list[int] = []
    emitted_at: list[int] = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield Item(
                i + 1, f"r{i}", body={"prompt": PROMPTS[i % 24], "max_tokens": 3, "temperature": 0}
            )

    runner, scheduler = make_runner(*tiny, model_name="tiny", max_running=2)
    records: list[dict] = []

    def sink(record: dict) -> None:
        records.append(record)
        emitted_at.append(len(pulled))

    try:
        runner.run(items(), sink)
    finally:
        scheduler.close(0)
    assert len(records) == 40 and all(r["error"] is None for r in records)
    # before the first result only the in-flight limit (rows + queue) + 1 was read
    assert emitted_at[0] <= runner.limit + 1


# ---------------------------------------------------------------------------- requests
def test_completion_chat_classify_and_errors_in_batch_output(tiny) -> None:
    items = [
        parse_line(request("c1", "Once upon a time", 5), 1, plain=False),
        parse_line(
            json.dumps(
                {
                    "custom_id": "chat",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4,
                        "temperature": 0,
                    },
                }
            ),
            2,
            plain=False,
        ),
        parse_line(
            json.dumps(
                {
                    "custom_id": "cls",
                    "method": "POST",
                    "url": "/v1/classify",
                    "body": {"input": ["a cat", "stock prices"], "labels": ["animals", "finance"]},
                }
            ),
            3,
            plain=False,
        ),
        parse_line(request("badtemp", "x", temperature=-1), 4, plain=False),
        parse_line(request("toolong", "x", max_tokens=100000), 5, plain=False),
        parse_line("{oops", 6, plain=False),
        parse_line(request("n2", "def f(", 4, n=2, seed=3, temperature=1.0), 7, plain=False),
    ]
    out = {r["custom_id"]: r for r in run_items(tiny, items)}
    assert set(out) == {"c1", "chat", "cls", "badtemp", "toolong", "line-6", "n2"}
    assert out["c1"]["error"] is None and out["c1"]["response"]["status_code"] == 200
    assert out["c1"]["response"]["body"]["usage"]["completion_tokens"] == 5
    assert out["chat"]["response"]["body"]["object"] == "chat.completion"
    assert out["chat"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    data = out["cls"]["response"]["body"]["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert all(abs(sum(d["scores"].values()) - 1) < 1e-4 for d in data)
    bad = out["badtemp"]
    assert bad["response"]["status_code"] == 400 and "temperature" in bad["error"]["message"]
    assert out["toolong"]["error"]["code"] == "context_length_exceeded"
    assert out["line-6"]["error"]["line"] == 6 and out["line-6"]["response"] is None
    assert len(out["n2"]["response"]["body"]["choices"]) == 2


def test_results_equal_single_requests_whatever_the_batch(tiny) -> None:
    """Greedy and seeded rows do not depend on their neighbours or on max_running."""
    items = [
        parse_line(request(f"p{i}", p, 8), i + 1, plain=False) for i, p in enumerate(PROMPTS[:10])
    ]
    items.append(parse_line(request("seeded", "The", 8, temperature=0.9, seed=11), 11, plain=False))
    wide = {r["custom_id"]: r for r in run_items(tiny, items, max_running=8)}
    narrow = {r["custom_id"]: r for r in run_items(tiny, items, max_running=1)}
    assert {k: text_of(v) for k, v in wide.items()} == {k: text_of(v) for k, v in narrow.items()}


# ---------------------------------------------------------------------------- the output
def test_scan_cuts_a_torn_last_line_and_refuses_foreign_files(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with OutputWriter(out) as writer:
        writer.write({"custom_id": "a", "error": None})
        writer.write({"custom_id": "b", "error": {"message": "x"}})
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"custom_id": "c", "resp')
    prev = scan_output(out)
    assert prev.torn and "a" in prev.done and "b" in prev.done and "c" not in prev.done
    assert prev.failed == 1 and out.read_bytes() == whole
    out.write_bytes(b"hello\n" + whole)
    with pytest.raises(BatchInputError, match="line 1 is not a batch output record"):
        scan_output(out)


# ---------------------------------------------------------------------------- the command
def write_requests(path: Path, n: int, max_tokens: int = 12) -> None:
    path.write_text(
        "".join(request(f"q{i}", PROMPTS[i % 24] + f" {i}", max_tokens) + "\n" for i in range(n))
    )


def test_sigkill_part_way_then_resume_equals_an_uninterrupted_run(tiny, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_requests(src, 40)
    cmd = [
        *gptneo_command(),
        "batch",
        str(src),
        "-o",
        str(out),
        "-m",
        "tiny",
        "--max-running",
        "2",
        "--threads",
        "1",
        "--dtype",
        "float32",
    ]
    proc = subprocess.Popen(
        cmd, env=cli_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_bytes().count(b"\n")
    assert 5 <= first < 40
    with open(out, "ab") as f:  # what a kill inside a write leaves: a torn last line
        f.write(b'{"id": "batch_req_x", "custom_id": "q39", "response": {"status')
    again = run_cli(
        "batch",
        str(src),
        "-o",
        str(out),
        "-m",
        "tiny",
        "--dtype",
        "float32",
        home=tmp_path,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    summary = again.stderr.decode()
    assert f"{first} already in" in summary and "torn last line" in summary
    resumed = by_id(out.read_text().splitlines())  # asserts one line per id
    assert set(resumed) == {f"q{i}" for i in range(40)}
    with BatchInput(src) as source:
        fresh = {r["custom_id"]: r for r in run_items(tiny, list(source.items()))}
    assert {k: text_of(v) for k, v in resumed.items()} == {k: text_of(v) for k, v in fresh.items()}
    # a third run has nothing left to do and does not load the model
    third = run_cli("batch", str(src), "-o", str(out), "-m", "does-not-exist", home=tmp_path)
    assert third.returncode == 0 and "0 done" in third.stderr.decode()
    assert len(out.read_text().splitlines()) == 40


def test_stdin_shorthand_bad_lines_exit_1_and_quiet_stderr(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    text = (
        '{"prompt": "Once upon", "max_tokens": 3}\n\n{broken\n{"prompt": "def f(", '
        '"max_tokens": 2}\n'
    )
    result = run_cli(
        "batch", "-", "-o", str(out), "-m", "tiny", "--temperature", "0", home=tmp_path, input=text
    )
    assert result.returncode == 1  # one line failed; the others ran
    stderr = result.stderr.decode().strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("batch: 3 done (1 failed)")
    records = by_id(out.read_text().splitlines())
    assert set(records) == {"line-1", "line-3", "line-4"}
    assert records["line-3"]["error"]["line"] == 3
    assert records["line-4"]["response"]["body"]["usage"]["completion_tokens"] == 2


def test_txt_input_and_restart_needs_yes(tmp_path: Path) -> None:
    src, out = tmp_path / "p.txt", tmp_path / "out.jsonl"
    src.write_text("Once upon a time\ndef add(a, b):\n")
    args = ("batch", str(src), "-o", str(out), "-m", "tiny", "-n", "3", "--temperature", "0")
    assert run_cli(*args, home=tmp_path).returncode == 0
    first = by_id(out.read_text().splitlines())
    assert set(first) == {"line-1", "line-2"}
    refused = run_cli(*args, "--restart", home=tmp_path)
    assert refused.returncode == 2 and "--yes" in refused.stderr.decode()
    assert len(out.read_text().splitlines()) == 2
    redone = run_cli(*args, "--restart", "--yes", home=tmp_path)
    assert redone.returncode == 0 and "2 done" in redone.stderr.decode()
    again = by_id(out.read_text().splitlines())
    assert {k: text_of(v) for k, v in again.items()} == {k: text_of(v) for k, v in first.items()}


def test_unusable_input_is_exit_2_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    src = tmp_path / "dup.jsonl"
    src.write_text(request("a", "x") + "\n" + request("a", "y") + "\n")
    dup = run_cli("batch", str(src), "-o", str(out), "-m", "tiny", home=tmp_path)
    assert dup.returncode == 2 and "appears twice" in dup.stderr.decode()
    assert not out.exists()
    missing = run_cli("batch", str(tmp_path / "nope.jsonl"), "-o", str(out), home=tmp_path)
    assert missing.returncode == 2 and "no such input file" in missing.stderr.decode()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    none = run_cli("batch", str(empty), "-o", str(out), "-m", "tiny", home=tmp_path)
    assert none.returncode == 0 and "0 done" in none.stderr.decode()
    assert out.read_text() == ""


def test_ray_is_imported_by_nothing_but_the_ray_adapter(tmp_path: Path) -> None:
    import pkgutil
    import sys

    import gptneo_cli

    names = [
        m.name
        for m in pkgutil.walk_packages(gptneo_cli.__path__, "gptneo_cli.")
        if not m.name.endswith("ray_job") and ".cli.__main__" not in m.name
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ray' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(gptneo_cli.__file__).parents[1])},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_ray_flag_without_ray_says_how_to_install(tmp_path: Path) -> None:
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    src = tmp_path / "p.txt"
    src.write_text("hi\n")
    result = run_cli(
        "batch",
        str(src),
        "-o",
        str(tmp_path / "o.jsonl"),
        "--ray",
        "-m",
        "tiny",
        home=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "noray")},
    )
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert 'pip install "gptneo-cli[ray]"' in lines[0]
