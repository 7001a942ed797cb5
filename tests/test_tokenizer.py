"""The GPT-2 tokenizer: ids equal to transformers' (and to a plain-Python BPE), loading
from tokenizer.json or vocab.json + merges.txt, special tokens, and streaming decoding.

The parity tests use the real GPT-2 vocabulary from ../shared/assets/gpt2-tokenizer and
skip when it is absent (a fresh clone has no ../shared).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import GPT2_ASSETS

from gptneo_cli.errors import TokenizerError
from gptneo_cli.tokenizer import (
    ENDOFTEXT,
    StreamDecoder,
    Tokenizer,
    build_gpt2_bpe,
    bytes_to_unicode,
    load_tokenizer,
)

needs_vocab = pytest.mark.skipif(
    not (GPT2_ASSETS / "vocab.json").is_file(),
    reason=f"real GPT-2 vocabulary not found at {GPT2_ASSETS}",
)


def _long_text() -> str:
    rng = random.Random(1234)
    pieces = [
        "The quick brown fox jumps over the lazy dog. ",
        "def f(x):\n\treturn x  *  2\r\n",
        "naïve café — déjà vu; ",
        "日本語のテキスト、中文文本。",
        "emoji 😀🙂👩‍👩‍👧 flags 🇫🇷 ",
        "e\u0301 a\u0308 o\u0302\u0323 ",
        "    indented     spaces\t\t\ttabs ",
        "it's we're they'll I'd ",
        "1234567890 3.14159 ",
        ENDOFTEXT,
    ]
    out: list[str] = []
    size = 0
    while size < 100_000:
        piece = rng.choice(pieces)
        out.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(out)


CORPUS = {
    "empty": "",
    "prose": "Once upon a time there was a little robot who loved to read books.",
    "leading_space": " Hello world",
    "trailing_spaces": "Hello world   ",
    "code_tabs_spaces": "def add(a, b):\n\tif a:\n\t\treturn a  +  b\n    x =     1\n",
    "crlf": "line one\r\nline two\r\n\r\n",
    "emoji": "I ❤️ 🦀 and 😀! 👩‍👩‍👧‍👦 🇯🇵",
    "cjk": "日本語のテキストと中文文本，한국어 텍스트",
    "combining": "Cafe\u0301 nai\u0308ve Zoe\u0308 a\u030a",
    "endoftext_inside": f"first document{ENDOFTEXT}second document {ENDOFTEXT} third",
    "endoftext_only": ENDOFTEXT,
    "contractions": "I'm sure it's theirs, we've said they'll come, you'd agree.",
    "unicode_spaces": "a\u00a0b\u3000c\u2009d \u200b e",
    "controls": "bell\x07 nul\x00 esc\x1b[31m",
    "numbers": "3.14159 2,718 1e-9 0x1F 100000000000",
    "punctuation": "!!! ??? ... --- *** ((()))",
    "long_100kb": _long_text(),
}


# ---- a plain-Python GPT-2 BPE: an oracle independent of the tokenizers library ---------
class ReferenceBPE:
    """GPT-2's encoder as originally described: regex split, byte map, rank-ordered merges."""

    def __init__(self, folder: Path) -> None:
        regex = pytest.importorskip("regex")
        self.vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text("utf-8"))
        lines = (folder / "merges.txt").read_text("utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        self.pattern = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
        )
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            best = min(
                range(len(parts) - 1),
                key=lambda i: self.ranks.get((parts[i], parts[i + 1]), float("inf")),
            )
            pair = (parts[best], parts[best + 1])
            if pair not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        chunks = text.split(ENDOFTEXT)
        for n, chunk in enumerate(chunks):
            if n:
                ids.append(self.vocab[ENDOFTEXT])
            for piece in self.pattern.findall(chunk):
                if piece not in self.cache:
                    mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
                    self.cache[piece] = [self.vocab[t] for t in self._bpe(mapped)]
                ids.extend(self.cache[piece])
        return ids


# ---- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab_tokenizer() -> Tokenizer:
    """Built from vocab.json + merges.txt (the gpt-neo-1.3B / 2.7B case)."""
    if not (GPT2_ASSETS / "vocab.json").is_file():
        pytest.skip(f"real GPT-2 vocabulary not found at {GPT2_ASSETS}")
    return load_tokenizer(GPT2_ASSETS)


@pytest.fixture(scope="module")
def json_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer.json written by transformers from the real vocabulary (the 125M case)."""
    if not (GPT2_ASSETS / "vocab.json").is_file():
        pytest.skip(f"real GPT-2 vocabulary not found at {GPT2_ASSETS}")
    from transformers import GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("gpt2-json")
    GPT2TokenizerFast.from_pretrained(str(GPT2_ASSETS)).save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    assert not (folder / "vocab.json").exists()  # so only tokenizer.json can be used
    return folder


@pytest.fixture(scope="module")
def json_tokenizer(json_folder: Path) -> Tokenizer:
    return load_tokenizer(json_folder)


@pytest.fixture(scope="module")
def hf_tokenizers():
    if not (GPT2_ASSETS / "vocab.json").is_file():
        pytest.skip(f"real GPT-2 vocabulary not found at {GPT2_ASSETS}")
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    return {
        "GPT2Tokenizer": GPT2Tokenizer.from_pretrained(str(GPT2_ASSETS)),
        "GPT2TokenizerFast": GPT2TokenizerFast.from_pretrained(str(GPT2_ASSETS)),
    }


@pytest.fixture(scope="module")
def reference() -> ReferenceBPE:
    if not (GPT2_ASSETS / "vocab.json").is_file():
        pytest.skip(f"real GPT-2 vocabulary not found at {GPT2_ASSETS}")
    return ReferenceBPE(GPT2_ASSETS)


# ---- parity ---------------------------------------------------------------------------
@needs_vocab
@pytest.mark.parametrize("build", ["vocab_merges", "tokenizer_json"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_ids_match_transformers_and_reference(
    build, name, vocab_tokenizer, json_tokenizer, hf_tokenizers, reference
):
    tok = vocab_tokenizer if build == "vocab_merges" else json_tokenizer
    text = CORPUS[name]
    ids = tok.encode(text)
    for label, hf in hf_tokenizers.items():
        expected = hf(text, add_special_tokens=True)["input_ids"]
        assert ids == expected, f"{label} disagrees on {name}"
    assert ids == reference.encode(text)
    assert tok.decode(ids) == text


@needs_vocab
def test_known_ids_and_special_tokens(vocab_tokenizer, json_tokenizer):
    for tok in (vocab_tokenizer, json_tokenizer):
        assert tok.encode("Once upon a time there was") == [7454, 2402, 257, 640, 612, 373]
        assert tok.encode("Hello world") == [15496, 995]
        assert tok.encode(" Hello world") == [18435, 995]
        assert tok.encode(f"a{ENDOFTEXT}b") == [64, 50256, 65]
        assert (tok.bos_id, tok.eos_id, tok.unk_id) == (50256, 50256, 50256)
        assert tok.pad_id == 50256  # no pad token in GPT-Neo: pad is eos
        assert tok.vocab_size == 50257
        assert tok.decode([15496, 50256, 995], skip_special_tokens=True) == "Hello world"
        assert tok.encode_batch(["Hello world", ""]) == [[15496, 995], []]


@needs_vocab
def test_vocab_merges_build_is_gpt2_shaped(vocab_tokenizer):
    from tokenizers import decoders, pre_tokenizers

    backend = vocab_tokenizer.backend
    assert isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
    assert backend.pre_tokenizer.add_prefix_space is False
    assert isinstance(backend.decoder, decoders.ByteLevel)
    assert backend.post_processor is None
    assert backend.encode("hi", add_special_tokens=True).ids == backend.encode("hi").ids


def _copy_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((GPT2_ASSETS / name).read_bytes())
    return folder


@needs_vocab
def test_special_tokens_from_tokenizer_config_and_map(tmp_path):
    folder = _copy_vocab(tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": {"__type": "AddedToken", "content": ENDOFTEXT, "lstrip": False},
                "pad_token": None,
                "model_max_length": 2048,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": ENDOFTEXT,
                "eos_token": "<|wrong|>",
                "pad_token": "<|pad|>",
            }
        )
    )
    tok = load_tokenizer(folder)
    assert tok.eos_token == ENDOFTEXT and tok.eos_id == 50256  # tokenizer_config wins
    assert tok.bos_id == 50256
    assert tok.pad_token == "<|pad|>" and tok.pad_id == 50257  # from the map, added
    assert tok.encode("x<|pad|>y") == [87, 50257, 88]
    assert tok.model_max_length == 2048


@needs_vocab
def test_special_tokens_fall_back_to_config_json(tmp_path):
    folder = _copy_vocab(tmp_path / "m")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt_neo",
                "bos_token_id": 50256,
                "eos_token_id": 50256,
                "max_position_embeddings": 2048,
            }
        )
    )
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (50256, 50256, 50256)
    assert tok.model_max_length == 2048


@needs_vocab
def test_add_prefix_space_from_tokenizer_config(tmp_path):
    folder = _copy_vocab(tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": True}))
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(GPT2_ASSETS), add_prefix_space=True)
    assert load_tokenizer(folder).encode("Hello world") == hf("Hello world")["input_ids"]


@needs_vocab
def test_save_round_trips_through_transformers(tmp_path, vocab_tokenizer):
    from transformers import AutoTokenizer

    out = vocab_tokenizer.save(tmp_path / "saved")
    again = load_tokenizer(out)
    hf = AutoTokenizer.from_pretrained(str(out))
    for text in (CORPUS["prose"], CORPUS["endoftext_inside"], CORPUS["emoji"]):
        assert again.encode(text) == vocab_tokenizer.encode(text) == hf(text)["input_ids"]
    assert again.eos_id == hf.eos_token_id == 50256
    assert hf.pad_token is None and again.pad_id == 50256


def test_missing_tokenizer_files_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neo"}))
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(info.value) and "\n" not in str(info.value)


def test_broken_tokenizer_json_is_tokenizer_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_tokenizer(tmp_path)


def test_bytes_to_unicode_is_gpt2s_map():
    mapping = bytes_to_unicode()
    assert len(mapping) == 256 and len(set(mapping.values())) == 256
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ" and mapping[ord("A")] == "A"
    assert all(not c.isspace() and c.isprintable() for c in mapping.values())


# ---- a tiny byte-level tokenizer for tests that must run without ../shared ------------
def tiny_byte_level(folder: Path) -> Path:
    """vocab.json + merges.txt of a byte-level BPE with 2 merges and <|endoftext|>."""
    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab.update({"Ġt": 256, "he": 257, ENDOFTEXT: 258})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\n", encoding="utf-8")
    return folder


def test_tiny_byte_level_tokenizer_round_trips(tmp_path):
    tok = load_tokenizer(tiny_byte_level(tmp_path / "tiny"))
    ids = tok.encode("he the 😀")
    assert ids == [257, 256, 257, 32, 0xF0, 0x9F, 0x98, 0x80]  # merges applied, bytes kept
    assert tok.decode(ids) == "he the 😀"
    assert tok.eos_id == 258 and tok.pad_id == 258


# ---- streaming --------------------------------------------------------------------------
def _check_stream(tok: Tokenizer, ids: list[int], fallback: bool = False) -> None:
    """Deltas only ever extend the text, hold back at most one partial character, and
    join to decode(all ids)."""
    stream = tok.stream_decoder()
    if fallback:
        stream._table = None  # exercise the generic window path on the same tokenizer
    emitted = ""
    for k, token_id in enumerate(ids, start=1):
        emitted += stream.push(token_id)
        so_far = tok.decode(ids[:k])
        assert so_far.startswith(emitted)
        held = so_far[len(emitted) :]
        assert held in ("", "\ufffd") or (fallback and held.endswith("\ufffd")), (k, held)
    emitted += stream.finish()
    assert emitted == tok.decode(ids)


def _byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    chars = bytes_to_unicode()
    return [tok.token_to_id(chars[b]) for b in text.encode("utf-8")]


stream_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@needs_vocab
@pytest.mark.parametrize("fallback", [False, True], ids=["byte_level", "window"])
class TestStreamDecoder:
    @stream_settings
    @given(ids=st.lists(st.integers(min_value=0, max_value=50256), max_size=40))
    def test_random_ids(self, vocab_tokenizer, fallback, ids):
        _check_stream(vocab_tokenizer, ids, fallback)

    @stream_settings
    @given(text=st.text(max_size=40))
    def test_split_characters(self, vocab_tokenizer, fallback, text):
        _check_stream(vocab_tokenizer, _byte_token_ids(vocab_tokenizer, text), fallback)

    @stream_settings
    @given(
        text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
        extra=st.lists(st.sampled_from([50256, 163, 226, 254, 30325, 47249]), max_size=4),
    )
    def test_encoded_text_with_specials(self, vocab_tokenizer, fallback, text, extra):
        ids = vocab_tokenizer.encode(text) + extra + vocab_tokenizer.encode(text[::-1])
        _check_stream(vocab_tokenizer, ids, fallback)

    def test_corpus(self, vocab_tokenizer, fallback):
        for name, text in CORPUS.items():
            if name == "long_100kb":
                text = text[:5000]
            ids = vocab_tokenizer.encode(text)
            stream = vocab_tokenizer.stream_decoder()
            if fallback:
                stream._table = None
            out = "".join(stream.push(i) for i in ids) + stream.finish()
            assert out == text, name


@needs_vocab
def test_stream_never_emits_half_an_emoji(vocab_tokenizer):
    ids = _byte_token_ids(vocab_tokenizer, "a😀b")  # a, F0, 9F, 98, 80, b
    stream = vocab_tokenizer.stream_decoder()
    assert [stream.push(i) for i in ids] == ["a", "", "", "", "😀", "b"]
    assert stream.finish() == ""


@needs_vocab
def test_stream_finish_flushes_an_incomplete_character(vocab_tokenizer):
    stream = vocab_tokenizer.stream_decoder()
    ids = _byte_token_ids(vocab_tokenizer, "😀")[:2]
    assert stream.push_many(ids) == ""
    assert stream.finish() == "\ufffd" == vocab_tokenizer.decode(ids)


@needs_vocab
def test_stream_ignores_unknown_ids_like_decode(vocab_tokenizer):
    stream = vocab_tokenizer.stream_decoder()
    assert stream.push(10**6) == "" and vocab_tokenizer.decode([10**6]) == ""
    assert stream.push(15496) == "Hello"


def test_stream_decoder_works_without_real_vocab(tmp_path):
    tok = load_tokenizer(tiny_byte_level(tmp_path / "tiny"))
    text = "the 日本 😀 he"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    assert isinstance(stream, StreamDecoder)
    assert "".join(stream.push(i) for i in ids) + stream.finish() == text


def test_stream_holds_at_most_one_partial_character_after_any_bytes(tmp_path):
    """Every lead byte followed by every continuation byte (and an ASCII one), then one more
    continuation: invalid starts (overlong, surrogate ED A0.., past U+10FFFF) must show as
    U+FFFD as soon as decode() shows them, never pile up behind a held character."""
    tok = load_tokenizer(tiny_byte_level(tmp_path / "tiny"))  # byte b is id b
    for lead in range(0x80, 0x100):
        for second in [*range(0x80, 0xC0), 0x41]:
            _check_stream(tok, [lead, second, 0x80])


def test_build_gpt2_bpe_reports_bad_files(tmp_path):
    (tmp_path / "vocab.json").write_text("[]")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(TokenizerError):
        build_gpt2_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_encode_rejects_non_text(tmp_path):
    tok = load_tokenizer(tiny_byte_level(tmp_path / "tiny"))
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
