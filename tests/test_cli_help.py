"""Every command's --help reads like a CLI: plain type labels, unbroken sentences, examples.

The commands are found by walking the Typer app, so a new command is checked without
editing this file.
"""

from __future__ import annotations

import inspect
import re

import pytest
import typer
from helpers_cli import run_cli

from gptneo_cli.cli.app import app
from gptneo_cli.cli.help import reflow

Found = list[tuple[tuple[str, ...], object]]


def _commands(typer_app: typer.Typer, prefix: tuple[str, ...] = ()) -> Found:
    found = []
    for info in typer_app.registered_commands:
        found.append(((*prefix, info.name), info.callback))
    for group in typer_app.registered_groups:
        found += _commands(group.typer_instance, (*prefix, group.name))
    return found


COMMANDS = _commands(app)
PYTHON_LABELS = re.compile(
    r"<(str|int|float|bool|path|list\[[a-z]+\]|int range|float range)>|\[x[<>]="
)


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {
        "generate",
        "chat",
        "classify",
        "tag",
        "answer",
        "info",
        "bench",
        "models list",
        "models rm",
    } <= names


@pytest.mark.parametrize("path,callback", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_is_plain_and_ends_with_examples(tmp_path, path, callback):
    done = run_cli(*path, "--help", home=tmp_path, env={"COLUMNS": "400"})
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert not PYTHON_LABELS.search(text), PYTHON_LABELS.search(text).group(0)
    # ends with two or three examples, each a described gptneo command line
    tail = text[text.rindex("Examples") :]
    commands = [
        line.strip()
        for line in tail.splitlines()
        if line.strip().startswith(("gptneo ", "echo ", "printf ", "cat "))
    ]
    assert 2 <= len(commands) <= 3, tail
    assert all("gptneo " in c for c in commands)
    # every paragraph of the docstring is on one line of a wide terminal
    help_text = reflow(inspect.getdoc(callback)) or ""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    for paragraph in help_text.split("\n\n"):
        assert " ".join(paragraph.split()) in lines, paragraph


def test_labels_say_types_and_ranges_in_words(tmp_path):
    done = run_cli("answer", "--help", home=tmp_path, env={"COLUMNS": "200"})
    text = done.stdout.decode()
    assert re.search(r"--max-answer-tokens\s+INTEGER, at least 1", text)
    assert re.search(r"--context\s+-c\s+TEXT", text)
    assert re.search(r"--debug\s+Show the full traceback", text)  # a flag has no label


def test_reflow_joins_wrapped_lines_and_keeps_indented_blocks():
    assert reflow("One\nline.\n\nTwo\n  kept\n  as is") == "One line.\n\nTwo\n  kept\n  as is"
