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
from ..settings import default_history_file, load_settings
from .errors import EXIT_RUNTIME, EXIT_USAGE, report_error
from .help import examples
from .inputs import MAX_PROMPT_BYTES, check_text, read_text_file
from .loading import LoadedModel, ModelOptions, load_model
from .options import (
    AttnOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    FrequencyPenaltyOpt,
    GreedyOpt,
    MaxNewTokensOpt,
    MinPOpt,
    ModelOpt,
    NoRepeatNgramOpt,
    PresencePenaltyOpt,
    RepetitionPenaltyOpt,
    RevisionOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    TypicalPOpt,
    generation_config,
)
from .output import Diagnostics, TextStream, is_tty
from .userfiles import WriteError, write_text_atomic

CHAT_PANEL = "Chat"
#: GenerationConfig fields a chat cannot use: the template owns the stops, replies stream.
UNSETTABLE = ("stop", "num_return_sequences")
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
                'Chat with a system text',
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
        self, loaded: LoadedModel, config: Any, conversation: Conversation, diag: Diagnostics
    ) -> None:
        self.loaded, self.config, self.conv, self.diag = loaded, config, conversation, diag
        self.positions = loaded.model.config.max_position_embeddings
        self.replies = 0
        self.failures = 0  # /save calls that failed: the exit code of a piped session says so

    def _max_new(self) -> int:
        from ..generation import DEFAULT_MAX_NEW_TOKENS

        return self.config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS

    def reply(self, message: str, out: TextStream) -> Turn:
        """Stream the reply to `message`, record the turn, and return it (even if cut short)."""
        from ..generation import stream

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
            self.diag.note(
                f"(context full: {_turns(dropped)} dropped out; {kept} kept with the system text)"
            )
        config = self.config.replace(stop=[*self.config.stop, *self.conv.stops()])
        if config.seed is not None:  # reproducible sessions, yet /regen gives a new reply
            config = config.replace(seed=config.seed + self.replies)
        self.replies += 1
        run = stream(self.loaded.model, self.loaded.tokenizer, prompt, config)
        pieces: list[str] = []
        try:
            for delta in run:
                if not pieces:
                    delta = delta.lstrip()
                    if not delta:
                        continue
                pieces.append(delta)
                out.write(delta)
        except KeyboardInterrupt:
            pass
        finally:
            result = run.close()
            out.end()
        if not pieces:
            out.write("\n")  # one line per reply, even an empty one
        if result.finish_reason == "cancelled":
            # on a terminal the echoed ^C sits at the start of a line: start a fresh one
            self.diag.note(("\n" if out.tty else "") + "(reply stopped)")
        turn = Turn(message, "".join(pieces).strip())
        self.conv.turns.append(turn)
        return turn

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
        if key in ("system", "user_prefix", "assistant_prefix"):
            setattr(self.conv, key, raw)
        elif key in self.config.to_dict() and key not in UNSETTABLE:
            self.config = self.config.replace(**{key: _parse_value(raw)})
        else:
            names = [k for k in self.config.to_dict() if k not in UNSETTABLE]
            raise ValueError(f"unknown setting {key!r}; settable: {', '.join(names)}, "
                             "system, user_prefix, assistant_prefix")
        self.diag.note(f"({key} = {raw})")

    def _show(self) -> None:
        options = self.loaded.options
        in_context = len(self.conv.turns) - self.conv.first_in_context
        rows = [
            ("model", f"{options.model} ({self.loaded.path})"),
            ("device", f"{self.loaded.model.device}, {str(self.loaded.model.dtype)[6:]}"),
            ("system", self.conv.system or "(none)"),
            ("template", f"{self.conv.user_prefix!r} / {self.conv.assistant_prefix!r}"),
            ("turns", f"{len(self.conv.turns)} ({in_context} in the context)"),
            ("context", f"{self.positions} positions, {self._max_new()} kept for the reply"),
        ]
        rows += [(k, str(v)) for k, v in self.config.to_dict().items()]
        self.diag.table("Chat", rows)

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
        known = self.config.to_dict()
        changes = {k: v for k, v in saved.items() if k in known and k not in UNSETTABLE}
        try:
            return self.config.replace(**changes)
        except (TypeError, ValueError) as exc:
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


def _parse_value(raw: str) -> Any:
    """A /set value: none, true/false, an int, a float, else the text itself."""
    low = raw.lower()
    if low in ("none", "null", "off"):
        return None
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


# --------------------------------------------------------------------------- the command


def chat(
    system: Annotated[
        str | None,
        typer.Option("--system", help="System text kept at the top of every prompt. "
                     "(env GPTNEO_SYSTEM)", rich_help_panel=CHAT_PANEL, show_default=False),
    ] = None,
    user_prefix: Annotated[
        str | None,
        typer.Option("--user-prefix", help='How user turns start. (default "User:")',
                     rich_help_panel=CHAT_PANEL, show_default=False),
    ] = None,
    assistant_prefix: Annotated[
        str | None,
        typer.Option("--assistant-prefix", help='How replies start. (default "Assistant:")',
                     rich_help_panel=CHAT_PANEL, show_default=False),
    ] = None,
    history: Annotated[
        bool,
        typer.Option("--history/--no-history", help="Keep line history across sessions "
                     "(interactive only).", rich_help_panel=CHAT_PANEL),
    ] = True,
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    typical_p: TypicalPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = None,
    frequency_penalty: FrequencyPenaltyOpt = None,
    no_repeat_ngram_size: NoRepeatNgramOpt = None,
    greedy: GreedyOpt = False,
    seed: SeedOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    attn: AttnOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Chat with a GPT-Neo model. With piped stdin, each line is one turn."""
    settings = load_settings()
    config = generation_config(
        settings,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        do_sample=False if greedy else None,
        seed=seed,
    )
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
    options = ModelOptions.merge(
        settings, model=model, revision=revision, device=device, dtype=dtype, attn=attn
    )
    diag = Diagnostics()
    loaded = load_model(options)
    session = ChatSession(loaded, config, conversation, diag)
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
            raise ValueError(f"stdin line {number} is longer than "
                             f"{MAX_PROMPT_BYTES // 2**20} MB; skipped")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"stdin line {number} is not valid UTF-8 text; skipped") from None
    return raw.rstrip("\r\n")


def _interactive(session: ChatSession, diag: Diagnostics, history_file: str | None) -> None:
    out = TextStream(sys.stdout)
    history = _History(history_file)
    diag.note(f"Chatting with {session.loaded.options.model}. /help for commands, "
              "Ctrl-D to leave.")
    try:
        while True:
            try:
                message = _read_message()
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


def _read_message() -> str:
    """One message: a line, or a \"\"\" block spanning several lines."""
    line = input(">>> ")
    if not line.lstrip().startswith(BLOCK):
        return line
    first = line.lstrip()[len(BLOCK) :]
    if first.rstrip().endswith(BLOCK):  # """one line"""
        return first.rstrip()[: -len(BLOCK)].strip()
    lines = [first] if first else []
    while True:
        more = input("... ")
        if more.rstrip().endswith(BLOCK):
            tail = more.rstrip()[: -len(BLOCK)]
            if tail:
                lines.append(tail)
            return "\n".join(lines).strip()
        lines.append(more)


class _History:
    """readline line editing plus a history file that persists across sessions."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path).expanduser() if path else None
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input()
            self.readline = None
            return
        self.readline = readline
        readline.set_history_length(1000)
        if self.path is not None and self.path.is_file():
            try:
                readline.read_history_file(str(self.path))
            except OSError:
                pass

    def save(self) -> None:
        if self.readline is None or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self.path))
        except OSError:
            pass
