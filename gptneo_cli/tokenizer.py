"""GPT-2 byte-level BPE through the `tokenizers` library, and streaming detokenization.

GPT-Neo uses GPT-2's tokenizer. gpt-neo-125M ships a tokenizer.json; 1.3B and 2.7B ship
only vocab.json and merges.txt, so the same tokenizer is rebuilt from those: byte-level
pre-tokenizer without a prefix space, byte-level decoder, no post-processor (GPT-Neo was
trained without a BOS token), and `<|endoftext|>` registered as a special token so that
it is recognised inside text. The ids equal transformers' GPT2Tokenizer(Fast).

Streaming: a byte-level token is a fixed byte string, so the text of a token stream is the
UTF-8 decoding of the concatenated bytes. `StreamDecoder` feeds those bytes to Python's
incremental UTF-8 decoder, which emits every complete character at once and holds back a
partial one: O(1) work per token, never half a character, never a correction.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import TokenizerError
from .jsonfiles import read_json
from .stderr import native_stderr_hidden

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
#: Every file a model folder's tokenizer may come in (copied and downloaded with the model).
TOKENIZER_FILES = (TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
ENDOFTEXT = "<|endoftext|>"
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")

#: tokenizer_config.json writes "no limit" as a huge number; treat anything above as unset.
_NO_LIMIT = 10**9


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, soft
    hyphen...) map to the characters 256, 257, ... in byte order.
    """
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """Encode text to ids and back, with the model's special tokens."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        from tokenizers import AddedToken

        self.backend = backend
        tokens = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
        present = [t for t in tokens.values() if t]
        if present:
            # Registering keeps existing ids and makes the strings atomic in text.
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(present)]
            )
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token = unk_token
        # GPT-Neo has no pad token: padding uses eos (masked out by the attention mask).
        self.pad_token = pad_token or eos_token
        self.model_max_length = model_max_length
        self._byte_table: list[bytes] | None = None

    # ---- ids of special tokens ----------------------------------------------------
    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (50257 for GPT-2)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- encode / decode --------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        _check_utf8(text)
        return _native(self.backend.encode, text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Several texts at once (the Rust side runs them in parallel)."""
        for text in texts:
            _check_utf8(text)
        encoded = _native(self.backend.encode_batch, list(texts), add_special_tokens=False)
        return [e.ids for e in encoded]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are kept unless asked, so decode(encode(x)) == x."""
        return _native(
            self.backend.decode, [int(i) for i in ids], skip_special_tokens=skip_special_tokens
        )

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one stream of generated ids."""
        return StreamDecoder(self)

    # ---- byte-level view ----------------------------------------------------------
    @property
    def is_byte_level(self) -> bool:
        from tokenizers import decoders

        return isinstance(self.backend.decoder, decoders.ByteLevel)

    def token_bytes(self) -> list[bytes] | None:
        """The bytes each id decodes to, for byte-level tokenizers (None otherwise).

        This mirrors the byte-level decoder exactly: a token whose characters are all in
        the byte alphabet maps to those bytes; any other token (e.g. an added token with a
        space) contributes its UTF-8 text.
        """
        if not self.is_byte_level:
            return None
        if self._byte_table is None:
            char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
            table = [b""] * self.vocab_size
            for token, index in self.backend.get_vocab(with_added_tokens=True).items():
                if index >= len(table):
                    table.extend([b""] * (index + 1 - len(table)))
                try:
                    table[index] = bytes(char_to_byte[c] for c in token)
                except KeyError:
                    table[index] = token.encode("utf-8")
            self._byte_table = table
        return self._byte_table

    # ---- files ----------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json, or build GPT-2's BPE from vocab.json + merges.txt."""
        folder = Path(folder)
        settings = _read_json(folder / TOKENIZER_CONFIG)
        specials = _special_tokens(folder, settings)
        if (folder / TOKENIZER_JSON).is_file():
            backend = _load_tokenizer_json(folder / TOKENIZER_JSON)
        elif (folder / VOCAB_JSON).is_file() and (folder / MERGES_TXT).is_file():
            backend = build_gpt2_bpe(
                folder / VOCAB_JSON,
                folder / MERGES_TXT,
                add_prefix_space=bool(settings.get("add_prefix_space")),
            )
        else:
            raise TokenizerError(
                f"no tokenizer in {folder}: expected {TOKENIZER_JSON}, or "
                f"{VOCAB_JSON} and {MERGES_TXT}"
            )
        _fill_specials(specials, folder, backend)
        max_length = settings.get("model_max_length")
        if not isinstance(max_length, int) or max_length >= _NO_LIMIT:
            max_length = _model_config(folder).get("max_position_embeddings")
        return cls(
            backend,
            bos_token=specials.get("bos"),
            eos_token=specials.get("eos"),
            unk_token=specials.get("unk"),
            pad_token=specials.get("pad"),
            model_max_length=max_length if isinstance(max_length, int) else None,
        )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        The output loads here and in transformers (AutoTokenizer / GPT2TokenizerFast).
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / TOKENIZER_JSON))
        specials = {f"{role}_token": getattr(self, f"{role}_token") for role in SPECIAL_ROLES}
        specials["pad_token"] = None if self.pad_token == self.eos_token else self.pad_token
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "errors": "replace",
            "model_max_length": self.model_max_length or _NO_LIMIT,
            **specials,
        }
        (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        mapping = {k: v for k, v in specials.items() if v is not None}
        (out / SPECIAL_TOKENS_MAP).write_text(
            json.dumps(mapping, indent=2) + "\n", encoding="utf-8"
        )
        return out


class StreamDecoder:
    """Text deltas for ids arriving one at a time (UTF-8 safe; joined == decode(all)).

    Byte-level tokenizers (every GPT-Neo one) go through an incremental UTF-8 decoder:
    exact and O(1) per token. Other tokenizers fall back to re-decoding a short window
    (the ids since the previous emission plus one id of context) and emit only text that
    ends in a whole character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._table = tokenizer.token_bytes()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # fallback window: context, then ids not yet emitted
        self._read = 0  # ids[:read] is context whose text was already returned

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        token_id = int(token_id)
        if self._table is not None:
            data = self._table[token_id] if 0 <= token_id < len(self._table) else b""
            return self._utf8.decode(data) + self._drop_surrogate_prefix()
        self._ids.append(token_id)
        return self._window_delta(final=False)

    def _drop_surrogate_prefix(self) -> str:
        """Python's incremental UTF-8 decoder holds ED A0..ED BF (the start of a UTF-16
        surrogate, never valid UTF-8) until a third byte arrives; tokenizers' decode already
        shows the lead byte as U+FFFD there. Emit it now, so at most one partial character
        is ever held back, and go on from the bytes after the lead."""
        pending, _ = self._utf8.getstate()
        if len(pending) < 2 or pending[0] != 0xED or pending[1] < 0xA0:
            return ""
        self._utf8.reset()
        return "\ufffd" + self._utf8.decode(pending[1:])

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in token_ids)

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        if self._table is not None:
            return self._utf8.decode(b"", final=True)
        return self._window_delta(final=True)

    def _window_delta(self, final: bool) -> str:
        decode = self._tokenizer.decode
        before = decode(self._ids[: self._read])
        after = decode(self._ids)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""  # maybe half a character: wait for the next id
        delta = after[len(before) :]
        # The ids just emitted become the context of the next step; older ones are dropped.
        self._ids = [] if final else self._ids[self._read :]
        self._read = len(self._ids)
        return delta


# ---- calling the native library ----------------------------------------------------------

#: Set by the CLI: while the tokenizers library works, the report a Rust panic writes
#: straight to file descriptor 2 is kept off the terminal (the CLI says it in one line).
#: Library users keep the default: a process-wide descriptor is not a library's to move.
HIDE_NATIVE_PANIC_OUTPUT = False


def _check_utf8(text: str) -> None:
    """Undecodable bytes (a non-UTF-8 argument or input arrives as lone surrogates) would
    fail deep in the native library; refuse them with a line that says what is wrong."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "the text is not valid UTF-8 (it holds undecodable bytes); give UTF-8 text"
        ) from None


def _native(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Call into `tokenizers`, turning a Rust panic (pyo3's PanicException, which is a
    BaseException that `except Exception` misses) into a TokenizerError."""
    try:
        with native_stderr_hidden() if HIDE_NATIVE_PANIC_OUTPUT else contextlib.nullcontext():
            return call(*args, **kwargs)
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else "no message"
        raise TokenizerError(
            f"the tokenizer failed (the tokenizers library panicked: "
            f"{reason}); its tokenizer files may be broken"
        ) from None


# ---- building and loading -----------------------------------------------------------
def build_gpt2_bpe(
    vocab_file: str | os.PathLike[str],
    merges_file: str | os.PathLike[str],
    add_prefix_space: bool = False,
) -> Any:
    """GPT-2's byte-level BPE from vocab.json and merges.txt (for repos without tokenizer.json)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    try:
        bpe = _native(models.BPE.from_file, str(vocab_file), str(merges_file))
    except TokenizerError:
        raise
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
        raise TokenizerError(f"cannot read {vocab_file} / {merges_file}: {exc}") from exc
    backend = Backend(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def _load_tokenizer_json(path: Path) -> Any:
    from tokenizers import Tokenizer as Backend

    try:
        return _native(Backend.from_file, str(path))
    except TokenizerError:
        raise
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
        raise TokenizerError(f"cannot read {path}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path, TokenizerError)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(folder: Path, settings: dict[str, Any]) -> dict[str, str | None]:
    """bos/eos/unk/pad from tokenizer_config.json, then special_tokens_map.json."""
    mapping = _read_json(folder / SPECIAL_TOKENS_MAP)
    found: dict[str, str | None] = {}
    for role in SPECIAL_ROLES:
        key = f"{role}_token"
        value = _token_text(settings.get(key))
        if value is None:
            value = _token_text(mapping.get(key))
        found[role] = value
    return found


def _model_config(folder: Path) -> dict[str, Any]:
    try:
        return _read_json(folder / "config.json")
    except TokenizerError:
        return {}


def _fill_specials(specials: dict[str, str | None], folder: Path, backend: Any) -> None:
    """Roles the tokenizer files leave open: ids from config.json, else GPT-2's convention
    (`<|endoftext|>` is bos, eos and unk)."""
    config = _model_config(folder)
    has_endoftext = backend.token_to_id(ENDOFTEXT) is not None
    for role in ("bos", "eos", "unk"):
        if specials.get(role) is not None:
            continue
        token_id = config.get(f"{role}_token_id")
        token = backend.id_to_token(token_id) if isinstance(token_id, int) else None
        if token is None and has_endoftext:
            token = ENDOFTEXT
        specials[role] = token


def load_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a model folder (gptneo_cli.load_tokenizer also takes Hub names)."""
    return Tokenizer.from_folder(folder)
