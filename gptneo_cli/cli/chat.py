"""`gptneo chat`: a REPL on a plain causal LM, with a configurable turn template.

The template and the sliding context are gptneo_cli.conversation's; this module owns the
terminal. With a terminal on stdin it is an interactive REPL (line editing, persisted
history, slash commands, multi-line blocks); otherwise every stdin line is one turn and
it ends at EOF.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from ..conversation import Conversation, Turn
from ..options import GENERATION, Option, OptionError
from ..settings import default_history_file, load_settings
from .errors import EXIT_RUNTIME, EXIT_USAGE, report_error
from .help import examples
from .inputs import MAX_PROMPT_BYTES, check_text, read_text_file
from .loading import LoadedModel, ModelOptions, load_draft, load_model
from .options import DebugOpt, generation_config, generation_options, loading_options
from .output import Diagnostics, TextStream, is_tty, write_json
from .userfiles import WriteError, write_text_atomic

CHAT_PANEL = "Chat"
#: Settings of the conversation itself, next to the generation options marked chat=True.
TEMPLATE_KEYS = ("system", "user_prefix", "assistant_prefix")
FORMATS = ("text", "jsonl")
BLOCK = '"""'
HELP = """\
/help               this list
/clear              forget the conversation (keeps the system text and settings)
/system [TEXT]      show or set the system text
/set KEY VALUE      change a setting, e.g. /set temperature 0.7 (KEY as in /show)
/show               model, settings, template and context use
/save FILE          save the conversation as JSON
/load FILE          load a conversation and its settings saved with /save
/regen              generate the last reply again
/undo               drop the last exchange
/exit               leave (Ctrl-D works too)
Start a line with \"\"\" to write several lines; end the block with \"\"\".
Ctrl-C stops a reply and keeps the session."""


def register(app: typer.Typer) -> None:
    app.command(
        "chat",
        epilog=examples(
            (
                "Chat with a system text",
                'gptneo chat -m 125m --system "A Python expert answers in code."',
            ),
            (
                "One turn per piped line, one JSON object per reply",
                "printf 'hi\\nhow are you?\\n' | gptneo chat -m tiny --format jsonl",
            ),
        ),
    )(chat)


# --------------------------------------------------------------------------- the session


class ChatSession:
    """One conversation with a loaded model; commands and turns, no terminal handling."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: Any,
        conversation: Conversation,
        diag: Diagnostics,
        fmt: str = "text",
    ) -> None:
        self.loaded, self.config, self.conv, self.diag = loaded, config, conversation, diag
        self.positions = loaded.model.config.max_position_embeddings
        self.replies = 0
        self.fmt = fmt
        self.printed = 0
        self.failures = 0  # /save calls that failed: the exit code of a piped session says so

    def _max_new(self) -> int:
        from ..options import DEFAULT_MAX_NEW_TOKENS

        return self.config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS

    def reply(self, message: str, out: TextStream) -> Turn:
        """Stream the reply to `message`, record the turn, and return it (even if cut short).

        Text: replies stream to `out`; piped, a blank line separates one reply from the
        next. jsonl: one object per turn once the reply is done (reply, tokens, finish
        reason), nothing streamed.
        """
        budget = self.positions - self._max_new()
        if budget < 1:
            raise ValueError(
                f"max_new_tokens {self._max_new()} leaves no room for the conversation in the "
                f"model's {self.positions} positions: lower it (/set max_new_tokens N)"
            )
        prompt, dropped = self.conv.fit(
            message, lambda text: len(self.loaded.tokenizer.encode(text)), budget
        )
        if dropped:
            kept = len(self.conv.turns) - self.conv.first_in_context
            where = " with the system text" if self.conv.system.strip() else ""
            self.diag.note(f"(context full: {_turns(dropped)} dropped out; {kept} kept{where})")
        config = self.config.replace(stop=[*self.config.stop, *self.conv.stops()])
        if config.seed is not None:  # reproducible sessions, yet /regen gives a new reply
            config = config.replace(seed=config.seed + self.replies)
        self.replies += 1
        if self.fmt == "text" and not out.tty and self.printed:
            out.write("\n")  # piped: a blank line between replies
        text, result = self._stream(prompt, config, out if self.fmt == "text" else None)
        self.printed += 1
        if self.fmt == "jsonl":
            record = {
                "user": message,
                "reply": text,
                "tokens": result.completion_tokens,
                "prompt_tokens": result.prompt_tokens,
                "finish_reason": result.finish_reason,
            }
            if config.speculative:
                record["speculative"] = {"drafted": result.drafted, "accepted": result.accepted}
            write_json(record, out.stream, lines=True)
        if result.finish_reason == "cancelled":
            # on a terminal the echoed ^C sits at the start of a line: start a fresh one
            self.diag.note(("\n" if out.tty else "") + "(reply stopped)")
        turn = Turn(message, text)
        self.conv.turns.append(turn)
        return turn

    def _stream(self, prompt: str, config: Any, out: TextStream | None) -> tuple[str, Any]:
        """Run one reply (leading spaces dropped); write it to `out` as it comes, if any."""
        from ..generation import stream

        run = stream(self.loaded.model, self.loaded.tokenizer, prompt, config)
        pieces: list[str] = []
        try:
            for delta in run:
                if not pieces:
                    delta = delta.lstrip()
                    if not delta:
                        continue
                pieces.append(delta)
                if out is not None:
                    out.write(delta)
        except KeyboardInterrupt:
            pass
        finally:
            result = run.close()
            if out is not None:
                out.end()
        if out is not None and not pieces:
            out.write("\n")  # one line per reply, even an empty one
        return "".join(pieces).strip(), result

    def handle(self, line: str, out: TextStream) -> bool:
        """One line of input: a /command or a message to reply to. False means leave."""
        if line.startswith("/"):
            return self.command(line, out)
        self.reply(line, out)
        return True

    # ---- slash commands ----------------------------------------------------------------

    def command(self, line: str, out: TextStream) -> bool:
        """Run a /command; False means leave the session."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        handler = {
            "/help": lambda: self.diag.note(HELP),
            "/clear": self._clear,
            "/system": lambda: self._system(arg),
            "/set": lambda: self._set(arg),
            "/show": self._show,
            "/save": lambda: self._save(arg),
            "/load": lambda: self._load(arg),
            "/regen": lambda: self._regen(out),
            "/undo": self._undo,
        }.get(name)
        if handler is None:
            self.diag.warn(f"unknown command {name}: /help lists the commands")
            return True
        try:
            handler()
        except ValueError as exc:
            self.diag.warn(str(exc))
        except WriteError as exc:  # not a mere warning: the session was not saved
            report_error(str(exc))
            self.failures += 1
        return True

    def _clear(self) -> None:
        self.conv.turns.clear()
        self.conv.first_in_context = 0
        self.diag.note("(conversation cleared)")

    def _system(self, text: str) -> None:
        if text:
            self.conv.system = text
            self.diag.note("(system text set)")
        else:
            self.diag.note(f"system: {self.conv.system or '(none)'}")

    def _set(self, arg: str) -> None:
        key, _, raw = arg.partition(" ")
        key = key.strip().replace("-", "_").lower()
        raw = raw.strip()
        if not key or not raw:
            raise ValueError("usage: /set KEY VALUE, e.g. /set temperature 0.7")
        if key in TEMPLATE_KEYS:
            setattr(self.conv, key, raw)
        elif key in CHAT_OPTIONS:
            self.config = self.config.replace(**{key: CHAT_OPTIONS[key].parse(raw)})
        else:
            raise ValueError(f"unknown setting {key!r}; settable: {', '.join(settable())}")
        self.diag.note(f"({key} = {raw})")

    def settings(self) -> list[tuple[str, str]]:
        """Every setting /set changes, with its value: the rows /show lists under them."""
        rows = [(key, getattr(self.conv, key) or "(none)") for key in TEMPLATE_KEYS]
        return rows + [(key, _show(getattr(self.config, key))) for key in CHAT_OPTIONS]

    def _show(self) -> None:
        options = self.loaded.options
        in_context = len(self.conv.turns) - self.conv.first_in_context
        rows = [
            ("model", f"{options.model} ({self.loaded.path})"),
            ("device", f"{self.loaded.model.device}, {str(self.loaded.model.dtype)[6:]}"),
            ("turns", f"{len(self.conv.turns)} ({in_context} in the context)"),
            ("context", f"{self.positions} positions, {self._max_new()} kept for the reply"),
        ]
        self.diag.table("Chat", rows)
        self.diag.table("Settings (/set KEY VALUE)", self.settings())

    def _save(self, arg: str) -> None:
        if not arg:
            raise ValueError("usage: /save FILE")
        data = {**self.conv.to_dict(), "settings": self.config.to_dict()}
        # All or nothing: a full disk leaves an earlier save of the same name whole.
        try:
            path = write_text_atomic(arg, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except ValueError as exc:  # an unwritable path: still an error, not a warning
            raise WriteError(str(exc)) from None
        self.diag.note(f"(saved {_turns(len(self.conv.turns))} to {path})")

    def _load(self, arg: str) -> None:
        if not arg:
            raise ValueError("usage: /load FILE")
        try:
            data = json.loads(read_text_file(arg))
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{arg} is not JSON saved by /save") from None
        conv = Conversation.from_dict(data, arg)
        self.config = self._saved_settings(data.get("settings"), arg)
        self.conv = conv
        self.diag.note(f"(loaded {_turns(len(self.conv.turns))} from {arg})")

    def _saved_settings(self, saved: Any, source: str) -> Any:
        """The settings /save wrote, over the current ones (checked before anything changes)."""
        if saved is None:
            return self.config
        if not isinstance(saved, dict):
            raise ValueError(f"{source} is not a conversation saved by /save")
        changes = {k: v for k, v in saved.items() if k in CHAT_OPTIONS}
        try:
            return self.config.replace(**changes)
        except (TypeError, ValueError, OptionError) as exc:
            raise ValueError(f"{source}: bad settings: {exc}") from None

    def _regen(self, out: TextStream) -> None:
        if not self.conv.turns:
            raise ValueError("nothing to regenerate yet")
        last = self.conv.turns.pop()
        self.conv.first_in_context = min(self.conv.first_in_context, len(self.conv.turns))
        try:
            self.reply(last.user, out)
        except ValueError:
            self.conv.turns.append(last)
            raise

    def _undo(self) -> None:
        if not self.conv.turns:
            raise ValueError("nothing to undo")
        self.conv.turns.pop()
        self.conv.first_in_context = min(self.conv.first_in_context, len(self.conv.turns))
        self.diag.note("(last exchange removed)")


def _turns(n: int) -> str:
    return f"{n} turn{'' if n == 1 else 's'}"


#: The generation options a chat uses (and /set changes), by name.
CHAT_OPTIONS: dict[str, Option] = {opt.name: opt for opt in GENERATION if opt.chat}


def settable() -> list[str]:
    return [*TEMPLATE_KEYS, *CHAT_OPTIONS]


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ", ".join(repr(v) for v in value) or "(none)"
    return str(value).lower() if isinstance(value, bool) else str(value)


# --------------------------------------------------------------------------- the command


@generation_options("chat")
@loading_options()
def chat(
    system: Annotated[
        str | None,
        typer.Option(
            "--system",
            help="System text kept at the top of every prompt. (env GPTNEO_SYSTEM)",
            rich_help_panel=CHAT_PANEL,
            show_default=False,
        ),
    ] = None,
    user_prefix: Annotated[
        str | None,
        typer.Option(
            "--user-prefix",
            help='How user turns start. (default "User:")',
            rich_help_panel=CHAT_PANEL,
            show_default=False,
        ),
    ] = None,
    assistant_prefix: Annotated[
        str | None,
        typer.Option(
            "--assistant-prefix",
            help='How replies start. (default "Assistant:")',
            rich_help_panel=CHAT_PANEL,
            show_default=False,
        ),
    ] = None,
    history: Annotated[
        bool,
        typer.Option(
            "--history/--no-history",
            help="Keep line history across sessions (interactive only).",
            rich_help_panel=CHAT_PANEL,
        ),
    ] = True,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="text (replies as they stream; piped, a blank line "
            "between replies) or jsonl (one object per turn: user, reply, tokens, "
            "finish_reason).",
            rich_help_panel=CHAT_PANEL,
        ),
    ] = "text",
    generation: dict[str, Any] | None = None,
    loading: dict[str, Any] | None = None,
    debug: DebugOpt = False,
) -> None:
    """Chat with a GPT-Neo model. With piped stdin, each line is one turn."""
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}: use text or jsonl")
    settings = load_settings()
    config = generation_config(settings, generation or {}, command="chat")
    conversation = Conversation(
        system=settings.get("system", system) or "",
        user_prefix=settings.get("user_prefix", user_prefix),
        assistant_prefix=settings.get("assistant_prefix", assistant_prefix),
    )
    check_text(conversation.system, "--system")
    check_text(conversation.user_prefix, "--user-prefix")
    check_text(conversation.assistant_prefix, "--assistant-prefix")
    if not conversation.user_prefix.strip() or not conversation.assistant_prefix.strip():
        raise ValueError("--user-prefix and --assistant-prefix must not be empty")
    options = ModelOptions.merge(settings, **(loading or {}))
    diag = Diagnostics()
    loaded = load_model(options, long_running=True)
    load_draft(loaded, config)
    session = ChatSession(loaded, config, conversation, diag, fmt)
    if is_tty(sys.stdin):
        history_file = settings.get("history_file") if history else None
        if history and not history_file:
            history_file = str(default_history_file())
        _interactive(session, diag, history_file)
    else:
        _piped(session)


def _piped(session: ChatSession) -> None:
    """Each stdin line is one turn (a /command runs as in the REPL); replies go to stdout.

    A message that cannot be answered (too long for the context) is reported and skipped, as
    in the REPL, so the lines after it still run; the exit code then says that one failed.
    """
    out = TextStream(sys.stdout)
    refused = 0
    for number, raw in enumerate(_stdin_lines(), start=1):
        try:
            line = _decode_line(raw, number)
            if not line.strip():
                continue
            if not session.handle(line, out):
                break
        except ValueError as exc:
            report_error(str(exc))
            refused += 1
    if session.failures:
        raise typer.Exit(EXIT_RUNTIME)
    if refused:
        raise typer.Exit(EXIT_USAGE)


def _stdin_lines() -> Iterator[bytes | str]:
    """stdin line by line, as bytes where there are bytes (each line is decoded on its own,
    so one undecodable line is refused without ending the session). A line longer than a
    prompt may be is cut at that size (and refused); the rest of it is skipped unread."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a StringIO in tests, or a stdin the shell closed
        yield from sys.stdin
        return
    while line := buffer.readline(MAX_PROMPT_BYTES + 1):
        yield line
        while len(line) > MAX_PROMPT_BYTES and not line.endswith(b"\n"):
            line = buffer.readline(MAX_PROMPT_BYTES + 1)


def _decode_line(raw: bytes | str, number: int) -> str:
    if isinstance(raw, bytes):
        if len(raw) > MAX_PROMPT_BYTES:
            raise ValueError(
                f"stdin line {number} is longer than {MAX_PROMPT_BYTES // 2**20} MB; skipped"
            )
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"stdin line {number} is not valid UTF-8 text; skipped") from None
    return raw.rstrip("\r\n")


def _interactive(session: ChatSession, diag: Diagnostics, history_file: str | None) -> None:
    out = TextStream(sys.stdout)
    history = _History(history_file)
    diag.note(f"Chatting with {session.loaded.options.model}. /help for commands, Ctrl-D to leave.")
    try:
        while True:
            try:
                message = _read_message(history)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, like Python
                sys.stdout.write("\n")
                continue
            except EOFError:  # Ctrl-D
                sys.stdout.write("\n")
                return
            if not message.strip():
                continue
            try:
                if not session.handle(message, out):
                    return
            except ValueError as exc:
                diag.warn(str(exc))
            except KeyboardInterrupt:  # between tokens the engine handles it; this is the rest
                out.end()
                diag.note("(reply stopped)")
    finally:
        history.save()


def _read_message(history: _History) -> str:
    """One message: a line, or a \"\"\" block spanning several lines (one history entry)."""
    start = history.length()
    line = input(">>> ")
    if not line.lstrip().startswith(BLOCK):
        return line
    first = line.lstrip()[len(BLOCK) :]
    if first.rstrip().endswith(BLOCK):  # """one line""", or a block recalled from history
        return first.rstrip()[: -len(BLOCK)].strip()
    typed, lines = [line], [first] if first else []
    while True:
        more = input("... ")
        typed.append(more)
        if more.rstrip().endswith(BLOCK):
            tail = more.rstrip()[: -len(BLOCK)]
            if tail:
                lines.append(tail)
            history.collapse(start, "\n".join(typed))
            return "\n".join(lines).strip()
        lines.append(more)


class _History:
    """readline line editing plus a history file that persists across sessions.

    The file has one entry per line. An entry holding a newline (a \"\"\" block, a pasted
    paragraph) is written as a JSON string, as is one that starts with a quote, so every
    entry comes back whole; files written by plain readline read the same.
    """

    LIMIT = 1000

    def __init__(self, path: str | None) -> None:
        self.path = Path(path).expanduser() if path else None
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input()
            self.readline = None
            return
        self.readline = readline
        if self.path is not None and self.path.is_file():
            try:
                text = read_text_file(self.path)
            except ValueError:  # unreadable, binary or huge: start without history
                return
            for entry in text.splitlines()[-self.LIMIT :]:
                readline.add_history(_decode_entry(entry))

    def length(self) -> int:
        return self.readline.get_current_history_length() if self.readline else 0

    def collapse(self, start: int, entry: str) -> None:
        """Replace the entries added since `start` (a block's lines) with one entry."""
        if self.readline is None:
            return
        while self.readline.get_current_history_length() > start:
            self.readline.remove_history_item(self.readline.get_current_history_length() - 1)
        self.readline.add_history(entry)

    def save(self) -> None:
        if self.readline is None or self.path is None:
            return
        count = self.readline.get_current_history_length()
        items = [self.readline.get_history_item(i) for i in range(1, count + 1)]
        lines = [_encode_entry(item) for item in items[-self.LIMIT :] if item]
        try:  # all or nothing: a full disk keeps the old history whole
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, "".join(line + "\n" for line in lines))
        except (OSError, ValueError, WriteError):
            pass


def _encode_entry(entry: str) -> str:
    if "\n" in entry or "\r" in entry or entry.startswith('"'):
        return json.dumps(entry, ensure_ascii=False)
    return entry


def _decode_entry(line: str) -> str:
    if line.startswith('"'):
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            return line
        if isinstance(value, str):
            return value
    return line
