"""Error types shared by every layer.

The CLI turns a GPTNeoError into a one-line message and exit code 1; a ValueError from
bad user input becomes exit code 2. Keeping the hierarchy here lets the library raise
precise errors without knowing anything about the CLI.
"""

from __future__ import annotations


class GPTNeoError(Exception):
    """Base class for runtime and model errors a user can act on.

    str() is the library's wording; `cli` is the same message for command-line users where
    it differs (it names the flags: "--attn flash" rather than "attention backend 'flash'").
    """

    def __init__(self, message: str = "", *, cli: str | None = None) -> None:
        super().__init__(message)
        self.cli = cli


class ConfigError(GPTNeoError):
    """config.json is missing, unreadable, or does not describe a GPT-Neo model."""


class WeightsError(GPTNeoError):
    """Checkpoint tensors are missing, unexpected, wrongly shaped, or unreadable."""


class ModelNotFoundError(GPTNeoError):
    """A model name could not be resolved to a local folder."""


class HubError(GPTNeoError):
    """A download from the Hugging Face Hub failed."""


class BackendError(GPTNeoError):
    """A requested attention backend, device or dtype cannot run here."""


class TokenizerError(GPTNeoError):
    """Tokenizer files are missing or unreadable."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: MemoryError, torch's OutOfMemoryError (CUDA,
    MPS), or the RuntimeError torch's CPU allocator raises ("can't allocate memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )
