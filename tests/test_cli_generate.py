"""`gptneo generate` end to end: the real entry point in a subprocess, with pipes, on a tiny
random-weight checkpoint written by transformers."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
from helpers_cli import (
    ANSI_ESCAPE,
    causal_checkpoint,
    cli_env,
    gptneo_command,
    on_a_pty,
    run_cli,
)

RECORD_KEYS = {
    "model",
    "revision",
    "prompt",
    "text",
    "token_ids",
    "finish_reason",
    "usage",
    "timings",
    "seed",
    "settings",
    "index",
    "sequence",
    "truncated_tokens",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(causal_checkpoint(tmp_path_factory, max_positions=2048))


def generate_args(model: str, *args: str) -> list[str]:
    """`generate` on `model` in float32 on the CPU (runs are exactly repeatable), then args."""
    return ["generate", "--model", model, "--device", "cpu", "--dtype", "float32", *args]


@pytest.fixture
def gen(model, tmp_path):
    """gptneo generate on the tiny model (float32 on CPU, so runs are exactly repeatable)."""

    def run(*args: str, **kwargs):
        return run_cli(
            *generate_args(model, *args),
            home=tmp_path,
            **kwargs,
        )

    return run


def as_json(done: subprocess.CompletedProcess[bytes]):
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def test_piped_output_is_only_the_text_without_escapes(gen):
    args = ("Once upon a time", "--seed", "3", "-n", "12", "--ignore-eos")
    plain = gen(*args, env={"FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert plain.returncode == 0, plain.stderr
    assert ANSI_ESCAPE not in plain.stdout and ANSI_ESCAPE not in plain.stderr
    record = as_json(gen(*args, "--format", "json"))
    assert record["usage"]["completion_tokens"] == 12
    # the same seed gives the same text: stdout holds exactly that text and a newline
    assert plain.stdout.decode() == record["text"] + "\n"
    echoed = gen(*args, "--echo")
    assert echoed.stdout.decode() == "Once upon a time" + record["text"] + "\n"


def test_stdin_comes_first_then_a_blank_line_then_the_argument(gen):
    record = as_json(
        gen("Summarize it.", "-n", "2", "--format", "json", input="Some piped text.\n")
    )
    assert record["prompt"] == "Some piped text.\n\nSummarize it."
    assert as_json(gen("-", "-n", "2", "--format", "json", input="Only stdin\n"))["prompt"] == (
        "Only stdin"
    )
    assert as_json(gen("-n", "2", "--format", "json", input="Implicit stdin"))["prompt"] == (
        "Implicit stdin"
    )


def test_input_file_results_come_in_input_order(gen, tmp_path):
    prompts = ["The quick brown fox", "a", "Once upon a time there was", "def add(a, b):"]
    (tmp_path / "prompts.txt").write_text(
        f"{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n{prompts[3]}\n", encoding="utf-8"
    )
    done = gen(
        "--input",
        "prompts.txt",
        "--greedy",
        "-n",
        "6",
        "--ignore-eos",
        "--batch-size",
        "3",
        "--format",
        "jsonl",
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    # each text belongs to its own prompt: greedy text equals the prompt run alone (one at
    # a time, no batch to share; one process for the four instead of four)
    single = gen("--input", "prompts.txt", "--greedy", "-n", "6", "--ignore-eos",
                 "--batch-size", "1", "--format", "jsonl")  # fmt: skip
    assert single.returncode == 0, single.stderr
    alone = [json.loads(line) for line in single.stdout.decode().splitlines()]
    assert [r["prompt"] for r in alone] == prompts
    for record, by_itself in zip(records, alone, strict=True):
        assert record["token_ids"] == by_itself["token_ids"], record["prompt"]

    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)) + "\n",
        encoding="utf-8",
    )
    done = gen(
        "--input",
        "prompts.jsonl",
        "--greedy",
        "-n",
        "6",
        "--ignore-eos",
        "--output",
        "out.jsonl",
        "--format",
        "jsonl",
    )
    assert done.returncode == 0 and done.stdout == b""
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["token_ids"] for line in lines] == [r["token_ids"] for r in records]


def test_text_format_with_several_results_gives_one_line_per_result(gen, tmp_path):
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    done = gen("--input", "p.txt", "-n", "3", "--seed", "1", "--ignore-eos")
    assert done.returncode == 0, done.stderr
    texts = [
        r["text"]
        for r in map(
            json.loads,
            gen("--input", "p.txt", "-n", "3", "--seed", "1", "--ignore-eos", "--format", "jsonl")
            .stdout.decode()
            .splitlines(),
        )
    ]
    assert done.stdout.decode() == "".join(t + "\n" for t in texts)


def test_json_schema(gen, model):
    record = as_json(
        gen(
            "Hello world",
            "--seed",
            "7",
            "-n",
            "5",
            "--ignore-eos",
            "--temperature",
            "0.7",
            "--top-k",
            "20",
            "--logprobs",
            "2",
            "--format",
            "json",
        )
    )
    assert RECORD_KEYS | {"logprobs"} == set(record)
    assert record["model"] == model and record["revision"] is None
    assert record["prompt"] == "Hello world"
    assert isinstance(record["text"], str)
    assert len(record["token_ids"]) == 5 and all(isinstance(t, int) for t in record["token_ids"])
    assert record["finish_reason"] == "length"
    assert record["usage"]["completion_tokens"] == 5
    assert record["usage"]["prompt_tokens"] >= 2
    assert set(record["timings"]) == {"load_s", "ttft_s", "prompt_tok_s", "gen_tok_s"}
    assert all(isinstance(v, float) and v >= 0 for v in record["timings"].values())
    assert record["timings"]["load_s"] > 0
    assert record["seed"] == 7
    settings = record["settings"]
    assert settings["temperature"] == 0.7 and settings["top_k"] == 20
    assert settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert settings["attn"] in ("eager", "sdpa")
    assert len(record["logprobs"]) == 5
    first = record["logprobs"][0]
    assert first["token_id"] == record["token_ids"][0]
    assert first["logprob"] <= 0 and len(first["top_logprobs"]) == 2

    text = gen("Hello world", "-n", "2", "--logprobs", "2")
    assert b"Warning: --logprobs is reported in --format json or jsonl only" in text.stderr

    plain = as_json(gen("Hello world", "-n", "2", "--format", "json"))
    assert "logprobs" not in plain and RECORD_KEYS == set(plain)
    assert isinstance(plain["seed"], int)  # a drawn seed is reported so the run can be repeated


def test_json_with_several_sequences_is_a_list(gen):
    records = as_json(
        gen("Hi", "-n", "3", "--num-return-sequences", "2", "--seed", "1", "--format", "json")
    )
    assert isinstance(records, list) and [r["sequence"] for r in records] == [0, 1]
    assert {r["prompt"] for r in records} == {"Hi"}


def test_settings_precedence_end_to_end(gen, tmp_path):
    cfg = tmp_path / "config" / "gptneo" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("temperature = 0.3\ntop_k = 11\nmax_new_tokens = 2\n")
    base = ("Hi", "--format", "json")
    record = as_json(gen(*base))
    assert (record["settings"]["temperature"], record["settings"]["top_k"]) == (0.3, 11)
    assert record["settings"]["max_new_tokens"] == 2
    record = as_json(gen(*base, env={"GPTNEO_TEMPERATURE": "0.5"}))
    assert (record["settings"]["temperature"], record["settings"]["top_k"]) == (0.5, 11)
    record = as_json(gen(*base, "--temperature", "0.7", env={"GPTNEO_TEMPERATURE": "0.5"}))
    assert record["settings"]["temperature"] == 0.7


def test_show_config_and_stats_go_to_stderr(gen):
    done = gen(
        "Hi",
        "-n",
        "3",
        "--seed",
        "1",
        "--show-config",
        "--stats",
        "--top-p",
        "0.8",
        env={"GPTNEO_TOP_K": "9"},
    )
    assert done.returncode == 0
    err = done.stderr.decode()
    assert "Effective settings" in err and "top_p: 0.8 (flag)" in err
    assert "top_k: 9 (env GPTNEO_TOP_K)" in err and "min_p: 0.0 (default)" in err
    for label in ("load:", "time to first token:", "prompt:", "generation:", "peak memory:"):
        assert label in err
    quiet = gen("Hi", "-n", "3", "--seed", "1", "--top-p", "0.8", env={"GPTNEO_TOP_K": "9"})
    assert quiet.stdout == done.stdout and quiet.stderr == b""


def test_show_config_alone_exits_0_without_reading_a_prompt(gen):
    """No prompt and an empty stdin (</dev/null, a script): the settings only, exit 0."""
    done = gen("--show-config")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    err = done.stderr.decode()
    assert "Effective settings" in err and "Error" not in err
    assert "max_new_tokens: 100 (default)" in err  # the value in force, not a blank
    assert "quantize: - (default)" in err and "compile: False (default)" in err
    flagged = gen("--show-config", "--quantize", "int8", "--threads", "1").stderr.decode()
    assert 'quantize: "int8" (flag)' in flagged and "threads: 1 (flag)" in flagged
    assert "compile: False (default)" in flagged
    piped = gen("--show-config", "-n", "2", "--format", "json", input="Piped prompt")
    assert json.loads(piped.stdout)["prompt"] == "Piped prompt"


def test_usage_errors_that_need_the_model(gen):
    long_prompt = "word " * 3000
    done = gen(long_prompt, "-n", "2")
    assert done.returncode == 2
    assert "exceeds the model's 2048 positions" in done.stderr.decode()
    assert len(done.stderr.decode().splitlines()) == 1
    record = as_json(gen(long_prompt, "-n", "2", "--truncate", "left", "--format", "json"))
    assert record["truncated_tokens"] > 0
    assert (
        "Warning: prompt too long for the model: dropped its oldest"
        in gen(long_prompt, "-n", "2", "--truncate", "left").stderr.decode()
    )
    assert record["usage"]["prompt_tokens"] == 2046
    done = gen("Hi", "--truncate", "middle")
    assert done.returncode == 2 and b"truncate must be 'left' or 'error'" in done.stderr
    done = gen("Hi", "--greedy", "--num-return-sequences", "2")
    assert done.returncode == 2 and b"--num-return-sequences above 1 needs sampling" in done.stderr


def test_flash_on_cpu_is_a_runtime_error(gen):
    done = gen("Hi", "--attn", "flash")
    assert done.returncode == 1
    err = done.stderr.decode()
    assert err.startswith("Error: --attn flash cannot run") and len(err.splitlines()) == 1


def long_generation(model: str, home, *args: str) -> subprocess.Popen[bytes]:
    """gptneo generate running for 2000 tokens, its stdout and stderr on pipes."""
    argv = ["generate", "x", "--model", model, "--device", "cpu", "-n", "2000", "--ignore-eos"]
    return subprocess.Popen(
        [*gptneo_command(), *argv, "--seed", "1", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(home),
    )


def test_broken_pipe_exits_quietly(model, tmp_path):
    """`gptneo generate ... | head -c 10`: no traceback, no message, exit 0. --stats would
    print to stderr at the end, so an empty stderr shows the pipe broke mid-generation."""
    proc = long_generation(model, tmp_path, "--stats")
    head = os.read(proc.stdout.fileno(), 10)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    assert head and err == b""


def test_ctrl_c_keeps_the_text_and_exits_130(model, tmp_path):
    proc = long_generation(model, tmp_path)
    first = os.read(proc.stdout.fileno(), 1)  # generation has started
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130
    output = first + rest
    assert first and output.endswith(b"\n")  # what was generated stays, the line is ended
    assert b"Traceback" not in proc.stderr.read()


def run_on_a_terminal(model: str, home, *args: str, stderr_too: bool = True, **env: str) -> bytes:
    """gptneo generate with stdout (and stderr unless stderr_too is False) on a
    pseudo-terminal; everything the terminal got."""
    command = [*gptneo_command(), *generate_args(model, *args)]
    line = shlex.join(command) + ("" if stderr_too else " 2>/dev/null")
    child = on_a_pty(home, ["/bin/sh", "-c", line], TERM="xterm-256color", **env)
    assert child.exitstatus == 0
    return child.before


def test_on_a_terminal_the_prompt_is_dimmed_and_no_color_removes_escapes(gen, model, tmp_path):
    if sys.platform == "win32":
        pytest.skip("needs a POSIX pseudo-terminal")
    args = ("Once upon a time", "--seed", "3", "-n", "12", "--ignore-eos")
    text = as_json(gen(*args, "--format", "json"))["text"]
    shown = run_on_a_terminal(model, tmp_path, *args)
    assert b"Loading" in shown  # the spinner, on stderr
    assert b"\x1b[2mOnce upon a time" in shown  # the prompt, dim
    plain = run_on_a_terminal(model, tmp_path, *args, stderr_too=False, NO_COLOR="1")
    assert ANSI_ESCAPE not in plain
    # the terminal turns \n into \r\n; the prompt, then the same text as when piped
    assert plain.replace(b"\r\n", b"\n") == ("Once upon a time" + text + "\n").encode()
