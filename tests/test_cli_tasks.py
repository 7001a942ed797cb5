"""`gptneo classify`, `tag` and `answer` through the real entry point, with pipes.

Tiny random checkpoints with each head come from test_tasks.make_checkpoint; the numbers
the commands print are checked against transformers (classify) or against the library
functions that test_tasks.py checks against transformers (tag, answer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers_cli import ANSI_ESCAPE, gptneo_command, on_a_pty, run_cli
from test_tasks import load_ours, make_checkpoint, oracle_probs, raw_tokenizer, reference_zero_shot

from gptneo_cli import tasks

CPU = ("--device", "cpu", "--dtype", "float32")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One folder per head, with the transformers model that wrote it (the oracle)."""
    root = tmp_path_factory.mktemp("cli-tasks")
    return {
        head: (root / head, make_checkpoint(root / head, head, scale=0.3))
        for head in ("sequence", "causal", "token", "qa")
    }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def records(out: bytes) -> list[dict]:
    return [json.loads(line) for line in out.decode("utf-8").splitlines()]


def errors(err: bytes) -> list[str]:
    return [line for line in err.decode("utf-8").splitlines() if line.startswith("Error:")]


# ---- classify ---------------------------------------------------------------------------
def test_classify_head_files_folder_and_stdin(ckpt, home):
    folder, theirs = ckpt["sequence"]
    (home / "a.txt").write_text("Paris is the capital of France.", encoding="utf-8")
    (home / "docs" / "deep").mkdir(parents=True)
    (home / "docs" / "deep" / "b.txt").write_text("Stocks fell.", encoding="utf-8")
    (home / "docs" / ".git").mkdir()
    (home / "docs" / ".git" / "HEAD").write_text("ref: hidden, skipped", encoding="utf-8")
    proc = run_cli(
        "classify",
        "a.txt",
        "docs",
        "-",
        "--recursive",
        "--model",
        str(folder),
        *CPU,
        "--format",
        "jsonl",
        home=home,
        input="Héllo café 🙂",
    )
    assert proc.returncode == 0, proc.stderr
    got = records(proc.stdout)
    assert [r["source"] for r in got] == ["a.txt", str(Path("docs/deep/b.txt")), "stdin"]
    for r, text in zip(
        got, ["Paris is the capital of France.", "Stocks fell.", "Héllo café 🙂"], strict=True
    ):
        want = oracle_probs(theirs, raw_tokenizer().encode(text).ids).tolist()
        assert list(r["scores"]) == ["negative", "neutral", "positive"]
        assert list(r["scores"].values()) == pytest.approx(want, abs=1e-5)
        assert r["score"] == pytest.approx(max(want), abs=1e-5)
        assert r["label"] == max(r["scores"], key=r["scores"].get)


def test_classify_bad_items_fail_alone_and_exit_1(ckpt, home):
    folder, _ = ckpt["sequence"]
    (home / "good.txt").write_text("Stocks fell.", encoding="utf-8")
    (home / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR")
    (home / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (home / "empty.txt").write_text("  \n", encoding="utf-8")
    (home / "dir").mkdir()
    proc = run_cli(
        "classify",
        "blob.bin",
        "good.txt",
        "missing.txt",
        "latin1.txt",
        "empty.txt",
        "dir",
        "--model",
        str(folder),
        *CPU,
        home=home,
    )
    assert proc.returncode == 1
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("good.txt\t")
    errs = errors(proc.stderr)
    assert len(errs) == 5, proc.stderr
    for name, words in [
        ("blob.bin", "binary"),
        ("missing.txt", "not found"),
        ("latin1.txt", "UTF-8"),
        ("empty.txt", "empty"),
        ("dir", "--recursive"),
    ]:
        assert any(name in e and words in e for e in errs), (name, errs)
    # an empty folder is an error too, never a silent success
    proc = run_cli("classify", "dir", "--recursive", "--model", str(folder), *CPU, home=home)
    assert proc.returncode == 1 and proc.stdout == b""
    (err,) = errors(proc.stderr)
    assert "dir holds no files" in err


def test_classify_plain_output_when_piped(ckpt, home):
    folder, _ = ckpt["sequence"]
    (home / "a.txt").write_text("Stocks fell.", encoding="utf-8")
    proc = run_cli(
        "classify", "a.txt", "--model", str(folder), *CPU, home=home, env={"FORCE_COLOR": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    assert ANSI_ESCAPE not in proc.stdout
    source, label, score, probs = proc.stdout.decode().rstrip("\n").split("\t")
    pairs = dict(p.split("=") for p in probs.split(" "))
    assert (source, list(pairs)) == ("a.txt", ["negative", "neutral", "positive"])
    assert pairs[label] == score and float(score) == max(map(float, pairs.values()))


def test_classify_table_on_a_terminal(ckpt, home):
    """On a TTY: a table with one probability column per label (NO_COLOR: no escapes)."""
    folder, _ = ckpt["causal"]
    (home / "a.txt").write_text("Stocks fell.", encoding="utf-8")
    argv = ["classify", "a.txt", "--labels", "finance,sport", "--model", str(folder), *CPU]
    child = on_a_pty(
        home,
        [*gptneo_command(), *argv],
        dimensions=(24, 120),
        encoding="utf-8",
        NO_COLOR="1",
        TERM="xterm",
    )
    assert child.exitstatus == 0
    # the pty merges stderr, where the loading spinner moves the cursor; styles are SGR (m)
    screen = re.sub(r"\x1b\[[0-9;?]*[ABCDHJKhl]", "", child.before)
    assert not re.search(r"\x1b\[[0-9;]*m", screen)
    lines = [line.split() for line in screen.splitlines() if line.strip()]
    assert lines[-2] == ["input", "label", "prob", "p(finance)", "p(sport)"]
    source, label, prob, p_finance, p_sport = lines[-1]
    assert source == "a.txt" and label in ("finance", "sport")
    assert float(prob) == max(float(p_finance), float(p_sport))


def test_classify_zero_shot_matches_reference(ckpt, home):
    folder, theirs = ckpt["causal"]
    lines = [{"text": "Stocks fell sharply.", "id": "s1"}, {"text": "The match ended in a draw"}]
    jsonl = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n" + '{"txt": 1}\n'
    (home / "in.jsonl").write_text(jsonl, encoding="utf-8")
    labels = ["finance", "football match", "café 🙂"]
    proc = run_cli(
        "classify",
        "--input",
        "in.jsonl",
        "--labels",
        ",".join(labels),
        "--template",
        "Text: {text}\\nAbout:",
        "--model",
        str(folder),
        *CPU,
        "--format",
        "jsonl",
        home=home,
    )
    assert proc.returncode == 1  # the two malformed lines
    got = records(proc.stdout)
    assert [r["source"] for r in got] == ["s1", "in.jsonl:2", "in.jsonl:3", "in.jsonl:4"]
    assert "not valid JSON" in got[2]["error"] and "text" in got[3]["error"]
    assert len(errors(proc.stderr)) == 2
    for r, line in zip(got[:2], lines, strict=True):
        want = reference_zero_shot(theirs, line["text"], labels, "Text: {text}\nAbout:")
        assert list(r["scores"]) == labels
        assert list(r["scores"].values()) == pytest.approx(want, abs=1e-5)
        assert set(r["logprobs"]) == set(r["calibration"]) == set(labels)


def test_classify_zero_shot_default_template_from_stdin(ckpt, home):
    folder, theirs = ckpt["causal"]
    proc = run_cli(
        "classify",
        "--labels",
        "finance, sport",
        "--no-calibrate",
        "--model",
        str(folder),
        *CPU,
        "--format",
        "json",
        home=home,
        input="Stocks fell.",
    )
    assert proc.returncode == 0, proc.stderr
    (got,) = json.loads(proc.stdout)
    want = reference_zero_shot(
        theirs, "Stocks fell.", ["finance", "sport"], tasks.DEFAULT_TEMPLATE, calibrate=False
    )
    assert got["source"] == "stdin" and got["calibration"] is None
    assert list(got["scores"].values()) == pytest.approx(want, abs=1e-5)


def test_classify_refuses_checkpoint_without_head(ckpt, home):
    folder, _ = ckpt["causal"]
    proc = run_cli("classify", "-", "--model", str(folder), *CPU, home=home, input="hi")
    assert proc.returncode == 1
    (err,) = errors(proc.stderr)
    assert "score.weight" in err and "--labels" in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--labels", "a,,b"), "--labels"),
        (("--labels", "a", "--template", "no slot"), "{text}"),
        (("--batch-size", "0"), "batch-size"),
        (("--format", "xml"), "--format"),
    ],
)
def test_classify_bad_values_exit_2(ckpt, home, args, words):
    folder, _ = ckpt["causal"]
    proc = run_cli("classify", "-", "--model", str(folder), *args, home=home, input="hi")
    assert proc.returncode == 2
    (err,) = errors(proc.stderr)
    assert words in err


# ---- tag --------------------------------------------------------------------------------
def test_tag_prints_spans_from_file_and_stdin(ckpt, home):
    folder, _ = ckpt["token"]
    text = "Alice met Bob in London on a rainy Tuesday 🙂"
    (home / "t.txt").write_text(text, encoding="utf-8")
    model, tok = load_ours(folder, "token")
    want = [s.to_dict() for s in tasks.tag(model, tok, text)]
    assert want, "the random head should tag something"

    proc = run_cli("tag", "t.txt", "--model", str(folder), *CPU, "--format", "json", home=home)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["source"] == "t.txt"
    assert [{**s, "score": pytest.approx(s["score"], abs=1e-5)} for s in want] == got["spans"]

    proc = run_cli("tag", "--model", str(folder), *CPU, home=home, input=text)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.decode().splitlines()]
    assert [(r[0], int(r[1]), int(r[2]), r[4]) for r in rows] == [
        (s["label"], s["start"], s["end"], s["text"]) for s in want
    ]
    assert all(text[int(r[1]) : int(r[2])] == r[4] for r in rows)


def test_tag_empty_or_binary_input_exits_2(ckpt, home):
    folder, _ = ckpt["token"]
    assert run_cli("tag", "-", "--model", str(folder), home=home, input=" \n").returncode == 2
    (home / "b.bin").write_bytes(b"\x00\x01")
    proc = run_cli("tag", "b.bin", "--model", str(folder), home=home)
    assert proc.returncode == 2 and "binary" in errors(proc.stderr)[0]


# ---- answer -----------------------------------------------------------------------------
def test_answer_from_context_file_and_stdin(ckpt, home):
    folder, _ = ckpt["qa"]
    question = "Where did Alice meet Bob?"
    context = "Alice met Bob in London on a rainy Tuesday morning."
    (home / "ctx.txt").write_text(context, encoding="utf-8")
    model, tok = load_ours(folder, "qa")
    want = tasks.answer(model, tok, question, context)

    proc = run_cli(
        "answer",
        question,
        "--context",
        "ctx.txt",
        "--model",
        str(folder),
        *CPU,
        "--format",
        "json",
        home=home,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["question"], got["answer"], got["start"], got["end"]) == (
        question,
        want.text,
        want.start,
        want.end,
    )
    assert got["score"] == pytest.approx(want.score, rel=1e-4)
    assert context[got["start"] : got["end"]] == got["answer"]

    proc = run_cli("answer", question, "--model", str(folder), *CPU, home=home, input=context)
    assert proc.returncode == 0, proc.stderr
    text, score = proc.stdout.decode().rstrip("\n").split("\t")
    assert text == want.text and float(score) == pytest.approx(want.score, abs=1e-4)


def test_answer_long_context_uses_windows(ckpt, home):
    folder, _ = ckpt["qa"]
    context = " ".join(["Alice met Bob in London on a rainy Tuesday morning."] * 12)
    model, tok = load_ours(folder, "qa")
    want = tasks.answer(model, tok, "Who?", context, stride=8)
    assert want.windows > 2  # the context is several times the 64 positions
    proc = run_cli(
        "answer",
        "Who?",
        "-c",
        "-",
        "--stride",
        "8",
        "--model",
        str(folder),
        *CPU,
        "--format",
        "jsonl",
        home=home,
        input=context,
    )
    assert proc.returncode == 0, proc.stderr
    (got,) = records(proc.stdout)
    assert (got["answer"], got["start"], got["window"], got["windows"]) == (
        want.text,
        want.start,
        want.window,
        want.windows,
    )


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("  ", "-c", "ctx.txt"), 2, "question"),
        (("Why?", "-c", "nope.txt"), 2, "not found"),
        (("Why?", "-c", "ctx.txt", "--max-answer-tokens", "0"), 2, "max-answer-tokens"),
    ],
)
def test_answer_errors(ckpt, home, args, code, words):
    folder, _ = ckpt["qa"]
    (home / "ctx.txt").write_text("Alice met Bob.", encoding="utf-8")
    proc = run_cli("answer", *args, "--model", str(folder), home=home)
    assert proc.returncode == code
    (err,) = errors(proc.stderr)
    assert words in err


def test_answer_refuses_checkpoint_without_qa_head(ckpt, home):
    folder, _ = ckpt["token"]
    proc = run_cli("answer", "Who?", "--model", str(folder), home=home, input="Alice met Bob.")
    assert proc.returncode == 1
    assert "qa_outputs" in errors(proc.stderr)[0]
