"""A chat on a plain causal LM: the turn template, the turns, and the sliding context.

GPT-Neo has no chat format, so a conversation renders one:

    {system}

    User: {message}
    Assistant: {reply}
    User: {message}
    Assistant:

and a reply stops at the next "User:". The conversation slides through the model's
positions: the oldest turns drop out first, the system text never does. No torch, no
terminal: `gptneo chat` and `gptneo serve`'s /v1/chat/completions drive it. The prefixes
(and a default system text) are a `ChatTemplate`: a built-in name or a file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Turn:
    user: str
    assistant: str


@dataclass
class Conversation:
    """The template, the turns, and which of them still fit in the context."""

    system: str = ""
    user_prefix: str = "User:"
    assistant_prefix: str = "Assistant:"
    turns: list[Turn] = field(default_factory=list)
    first_in_context: int = 0
    """Turns before this index slid out of the context window; they stay out."""

    def render(self, message: str, start: int | None = None) -> str:
        """The prompt for the next reply: system, the turns from `start`, the new message."""
        parts = [self.system.strip() + "\n\n"] if self.system.strip() else []
        for turn in self.turns[self.first_in_context if start is None else start :]:
            parts.append(f"{self.user_prefix} {turn.user}\n")
            parts.append(f"{self.assistant_prefix} {turn.assistant}\n")
        parts.append(f"{self.user_prefix} {message}\n{self.assistant_prefix}")
        return "".join(parts)

    def fit(self, message: str, count_tokens: Any, budget: int) -> tuple[str, int]:
        """Slide the window until the prompt fits `budget` tokens; (prompt, turns dropped).

        The system text and the new message always stay; if they alone do not fit, that is
        a ValueError the user can act on (shorter message or system text, fewer new tokens),
        and the window stays where it was: the next message still sees the earlier turns.
        """
        start = self.first_in_context
        while True:
            prompt = self.render(message, start)
            if count_tokens(prompt) <= budget:
                dropped = start - self.first_in_context
                self.first_in_context = start
                return prompt, dropped
            if start >= len(self.turns):
                raise ValueError(
                    f"the system text and this message need more than {budget} tokens: "
                    "shorten them or lower max_new_tokens (/set max_new_tokens N)"
                )
            start += 1

    def stops(self) -> list[str]:
        return [self.user_prefix]

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "user_prefix": self.user_prefix,
            "assistant_prefix": self.assistant_prefix,
            "turns": [asdict(t) for t in self.turns],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Conversation:
        try:
            turns = [Turn(str(t["user"]), str(t["assistant"])) for t in data["turns"]]
            return cls(
                system=str(data.get("system") or ""),
                user_prefix=str(data.get("user_prefix") or "User:"),
                assistant_prefix=str(data.get("assistant_prefix") or "Assistant:"),
                turns=turns,
            )
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{source} is not a conversation saved by /save") from None


@dataclass(frozen=True)
class ChatTemplate:
    """The turn template: how user turns and replies start, and the system text a
    conversation gets when it brings none. `Conversation.render` lays turns out with it."""

    user_prefix: str = "User:"
    assistant_prefix: str = "Assistant:"
    system: str = ""

    def conversation(
        self, system: str | None = None, turns: list[Turn] | None = None
    ) -> Conversation:
        return Conversation(
            system=self.system if system is None else system,
            user_prefix=self.user_prefix,
            assistant_prefix=self.assistant_prefix,
            turns=list(turns or []),
        )


#: Named templates for `--chat-template`.
BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    "default": ChatTemplate(),
    "human-ai": ChatTemplate("Human:", "AI:"),
    "qa": ChatTemplate("Q:", "A:"),
}
TEMPLATE_FIELDS = ("user_prefix", "assistant_prefix", "system")


def load_chat_template(spec: str) -> ChatTemplate:
    """A built-in template by name, or one read from a JSON or TOML file holding
    `user_prefix`, `assistant_prefix` and optionally `system` (a conversation saved by
    chat's /save works too: its turns are ignored). ValueError says what is wrong."""
    name = spec.strip()
    if name.lower() in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name.lower()]
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(
            f"chat template {spec!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
            "nor a file"
        )
    data = _read_template_file(path)
    unknown = sorted(set(data) - {*TEMPLATE_FIELDS, "turns"})
    if unknown:
        raise ValueError(
            f"{path}: unknown chat template keys {', '.join(unknown)} "
            f"(use {', '.join(TEMPLATE_FIELDS)})"
        )
    values: dict[str, str] = {}
    for key in TEMPLATE_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{path}: {key} must be a string")
        values[key] = value
    template = ChatTemplate(**values)
    if not template.user_prefix.strip() or not template.assistant_prefix.strip():
        raise ValueError(f"{path}: user_prefix and assistant_prefix must not be empty")
    return template


def _read_template_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the chat template {path}: {exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            from .settings import tomllib

            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path} is not a valid chat template file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold an object with user_prefix and assistant_prefix")
    return data
