"""How every command's --help reads: like a CLI, not like Python.

- Value labels are TEXT, INTEGER, FLOAT, PATH (a flag shows none), with any range in
  words ("INTEGER, at least 1"), instead of Typer's `<str>`, `<int range> [x>=1]`, `<bool>`.
- A docstring's paragraphs are reflowed, so a sentence never breaks mid-line on a terminal
  wider or narrower than the source.
- The help ends with a few examples, as llm's and ollama's do.

A new command gets all of this by passing its examples when it registers:

    def register(app: typer.Typer) -> None:
        app.command("train-tagger", epilog=examples(
            ("Train a tiny tagger from the demo model", "gptneo train-tagger tiny tags.jsonl"),
        ))(train_tagger)

`use_cli_help(app)` (called once in app.py) gives every registered command the `Command`
class below; nothing else is needed.
"""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.core import TyperCommand

_LABELS = {
    "integer": "INTEGER",
    "integer range": "INTEGER",
    "float": "FLOAT",
    "float range": "FLOAT",
    "text": "TEXT",
    "path": "PATH",
    "file": "FILE",
    "boolean": "BOOLEAN",
}


def examples(*items: tuple[str, str]) -> str:
    """An epilog of (what it does, command line) pairs, rendered as a comment over each line.

    The description lines are flush left on purpose: Typer dedents the epilog, and an
    unindented line keeps the commands' two-space indent.
    """
    from rich.markup import escape

    lines = ["[bold]Examples[/bold]"]
    for what, command in items:
        lines += ["", f"[dim]{escape(what)}:[/dim]", f"  {escape(command)}"]
    return "\n".join(lines)


def reflow(text: str | None) -> str | None:
    """Join the hard-wrapped lines of each paragraph; indented blocks keep their lines."""
    if not text:
        return text
    paragraphs = re.split(r"\n\s*\n", _dedent(text).strip())
    out = []
    for para in paragraphs:
        lines = para.split("\n")
        if para.startswith("\b") or any(line.startswith(" ") for line in lines):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _dedent(text: str) -> str:
    import inspect

    return inspect.cleandoc(text)


def type_label(param: Any) -> str:
    """TEXT / INTEGER / FLOAT / PATH, plus the range in words; empty for a flag."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    descriptor = getattr(param, "type_descriptor", None)  # Typer >= 0.2x
    if descriptor is not None:
        annotation = descriptor.annotation
        if descriptor.is_list:
            annotation = (getattr(annotation, "__args__", None) or (str,))[0]
        name = "path" if descriptor.is_path else getattr(annotation, "__name__", "text")
        name = {"int": "integer", "str": "text", "bool": "boolean"}.get(name, name)
        repeatable = descriptor.is_list
    else:  # Click's parameter types
        name = str(getattr(getattr(param, "type", None), "name", "text"))
        repeatable = bool(getattr(param, "multiple", False))
    label = _LABELS.get(name, name.upper())
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is None and high is None:
        kind = getattr(param, "type", None)
        low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    if low is not None and high is not None:
        label += f", {low} to {high}"
    elif low is not None:
        label += f", at least {low}"
    elif high is not None:
        label += f", at most {high}"
    return label + (" (repeatable)" if repeatable else "")


class Command(TyperCommand):
    """A Typer command whose help uses `type_label`, `reflow` and an examples epilog."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = reflow(kwargs.get("help"))
        super().__init__(*args, **kwargs)

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            option = getattr(param, "param_type_name", "") == "option"
            label = param.metavar if option and param.metavar else type_label(param)
            # Instance attributes shadow Typer's own label and range renderers (the range
            # is in the label); an older Typer, which has neither, uses the metavar.
            param.display_type_rich = lambda ctx, label=label: label
            param._get_number_range_help_str = lambda: None
            if option and label:
                param.metavar = label
        return params


def use_cli_help(app: typer.Typer) -> None:
    """Give every command of `app` (and of its sub-apps, such as `models`) `Command`."""
    for info in app.registered_commands:
        if info.cls is None or info.cls is TyperCommand:
            info.cls = Command
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_cli_help(group.typer_instance)
