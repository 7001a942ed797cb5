"""A chat on a plain causal LM: the turn template, the turns, and the sliding context.

GPT-Neo has no chat format, so a conversation renders one:

    {system}

    User: {message}
    Assistant: {reply}
    User: {message}
    Assistant:

and a reply stops at the next "User:". The conversation slides through the model's
positions: the oldest turns drop out first, the system text never does. No torch, no
terminal: `gptneo chat` (and later a server) drive it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
