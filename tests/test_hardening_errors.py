"""Failures that escape `except Exception` or arrive as raw RuntimeErrors are still one line
with the documented exit code (issue 11)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers_cli import cli_env

from gptneo_cli.cli.errors import OUT_OF_MEMORY, exit_code_for
from gptneo_cli.cli.userfiles import AtomicTextFile, WriteError, write_text_atomic
from gptneo_cli.errors import TokenizerError
from gptneo_cli.hub import BUNDLED_DIR
from gptneo_cli.tokenizer import Tokenizer, load_tokenizer


class PanicException(BaseException):
    """What pyo3 raises for a Rust panic (its real class lives in pyo3_runtime)."""


class PanickingBackend:
    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def encode(self, *args, **kwargs):
        raise PanicException("regex automaton panicked\nstack backtrace: ...")


def test_a_tokenizer_panic_is_a_tokenizer_error():
    tok = load_tokenizer(BUNDLED_DIR / "tiny")
    broken = Tokenizer(PanickingBackend(tok.backend), eos_token=tok.eos_token)
    with pytest.raises(
        TokenizerError,
        match="tokenizers library panicked: regex automaton "
        "panicked\\); its tokenizer files may be broken",
    ):
        broken.encode("hello")


def test_lone_surrogates_are_a_value_error_not_a_native_failure():
    tok = load_tokenizer(BUNDLED_DIR / "tiny")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        tok.encode("caf\udce9")


_PANIC = """
import os, sys
class PanicException(BaseException):
    pass
import gptneo_cli.tokenizer as t
real = t.load_tokenizer
def load(*a, **k):
    tok = real(*a, **k)
    inner = tok.backend
    class Backend:
        def __getattr__(self, name):
            return getattr(inner, name)
        def encode(self, *a, **k):
            os.write(2, b"thread '<unnamed>' panicked at src/lib.rs:1:1\\nnote: run with "
                        b"RUST_BACKTRACE=1\\n")  # what Rust's hook writes to fd 2
            raise PanicException("regex panicked")
    tok.backend = Backend()
    return tok
t.load_tokenizer = load
from gptneo_cli.cli.app import main
sys.argv = ["gptneo", "generate", "--model", "tiny", "-n", "2", "Hello"]
main()
"""


def test_a_tokenizer_panic_in_the_cli_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _PANIC],
        capture_output=True,
        env=cli_env(tmp_path),
        cwd=tmp_path,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert done.stderr.decode() == (
        "Error: the tokenizer failed (the tokenizers library panicked: regex "
        "panicked); its tokenizer files may be broken\n"
    )


def test_a_raw_panic_at_the_boundary_is_one_line(capsys):
    assert exit_code_for(PanicException("boom\nmore")) == 1
    assert capsys.readouterr().err == (
        "Error: internal error in a native library (it panicked: boom)\n"
    )


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 80000000000 bytes. Error code 12"
        ),
    ],
)
def test_allocation_failures_are_the_documented_line(capsys, exc):
    assert exit_code_for(exc) == 1
    assert capsys.readouterr().err == f"Error: {OUT_OF_MEMORY}\n"


def test_error_lines_are_inert(capsys):
    exit_code_for(ValueError("file not found: a\x1b[2Jb\x9bc\rd"))
    assert capsys.readouterr().err == "Error: file not found: a\\x1b[2Jb\\x9bc d\n"


# ---- atomic user files ----------------------------------------------------------------


def test_atomic_write_replaces_only_on_commit(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    out = AtomicTextFile(path)
    out.write("new")
    assert path.read_text() == "old"
    out.commit()
    assert path.read_text() == "new" and sorted(tmp_path.iterdir()) == [path]


def test_atomic_write_failure_names_the_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(
        WriteError, match=f"cannot write {path}: No space left on device; the old file is unchanged"
    ):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_atomic_write_into_a_missing_folder_is_a_usage_error_naming_it(tmp_path):
    target = tmp_path / "no" / "f.txt"
    with pytest.raises(ValueError, match=f"cannot write {target}: No such file or directory"):
        write_text_atomic(target, "x")


def test_atomic_write_failing_on_a_new_file_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(WriteError, match="nothing was written"):
        write_text_atomic(tmp_path / "f.txt", "x")
    assert list(tmp_path.iterdir()) == []


# ---- a held-out share that leaves nothing to train on -----------------------------------


def test_val_fraction_that_leaves_no_training_block_names_val_fraction():
    from gptneo_cli.training.data import Document
    from gptneo_cli.training.packing import prepare_lm_data

    tok = load_tokenizer(BUNDLED_DIR / "tiny")
    docs = [Document("one.txt", "the cat sat on the mat and the dog ran far away " * 20)]
    assert len(prepare_lm_data(docs, tok, 32, 0.05).train) > 0
    with pytest.raises(
        ValueError,
        match="val_fraction: holding out 0.99 of the data leaves "
        r"\d+ training tokens, fewer than one block of 33",
    ):
        prepare_lm_data(docs, tok, 32, 0.99)


def test_val_fraction_never_holds_out_every_example_of_a_label():
    from gptneo_cli.training.classifier import LabeledExample, split_examples

    examples = [LabeledExample(f"text {i}", "pos" if i % 2 else "neg") for i in range(20)]
    train, val = split_examples(examples, 0.99, seed=0)
    assert {e.label for e in train} == {"pos", "neg"}
    assert len(train) == 2 and len(val) == 18


def test_library_warnings_shown_by_the_cli_are_inert(capsys):
    import logging

    from gptneo_cli.cli.streams import library_warnings_inert

    logger = logging.getLogger("gptneo")
    before = list(logger.handlers)
    library_warnings_inert()
    try:
        logger.warning("folder%s has no score.weight weights", "\x1b]0;x\x07")
    finally:
        logger.handlers = before
    assert capsys.readouterr().err == "folder\\x1b]0;x\\x07 has no score.weight weights\n"


# ---- deeply nested JSON anywhere is one line, never a RecursionError ----------------------

DEEP = "[" * 100000 + "]" * 100000


def test_deep_json_in_inputs_is_a_clear_error(tmp_path):
    from gptneo_cli.cli.generate import read_input_file
    from gptneo_cli.training.data import read_documents

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": ' + DEEP + "}\n")
    with pytest.raises(ValueError, match="line 1: JSON nested too deeply"):
        read_input_file(prompts)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": ' + DEEP + "}\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        read_documents([data])


def test_deep_json_in_model_files_is_a_clear_error(tmp_path):
    import struct

    from gptneo_cli.errors import WeightsError
    from gptneo_cli.tokenizer import _read_json
    from gptneo_cli.weights import read_safetensors_header

    (tmp_path / "tokenizer_config.json").write_text(DEEP)
    with pytest.raises(TokenizerError, match="nested too deeply"):
        _read_json(tmp_path / "tokenizer_config.json")
    header = DEEP.encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(WeightsError, match="nested too deeply"):
        read_safetensors_header(tmp_path / "model.safetensors")


def test_training_data_that_is_a_fifo_is_refused_without_reading(tmp_path):
    import os

    from gptneo_cli.training.data import read_documents

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="is not a regular file"):
        read_documents([tmp_path / "fifo"])
