"""Shared pieces for the command-line tests: run the real entry point, build tiny checkpoints.

Every end-to-end test runs `gptneo` (the installed console script, or `python -m
gptneo_cli.cli` when it is missing) as a subprocess with pipes, in an environment cut off
from the user's config, history and the Hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
CORPUS = [
    "Once upon a time there was a little robot who loved to read books.",
    "The quick brown fox jumps over the lazy dog.",
    "User: hello there\nAssistant: hi, how can I help?\n",
    "def add(a, b):\n    return a + b\n",
    "Héllo wörld, naïve café: ünïcode text with émojis 🙂 too.",
]
ANSI_ESCAPE = b"\x1b"


def gptneo_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m gptneo_cli.cli`."""
    script = Path(sys.executable).with_name("gptneo")
    if script.is_file():
        return [str(script)]
    found = shutil.which("gptneo")
    return [found] if found else [sys.executable, "-m", "gptneo_cli.cli"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no GPTNEO_* from the caller, config/data dirs under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTNEO_")}
    for var in ("NO_COLOR", "FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE"):
        env.pop(var, None)
    env.update(
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_DATA_HOME=str(home / "data"),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home / "hf"),
        PYTHONIOENCODING="utf-8",
        COLUMNS="100",
    )
    env.update(extra)
    return env


def run_cli(
    *args: str,
    home: Path,
    input: str | bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Run gptneo with piped stdin/stdout/stderr; stdin is /dev/null unless `input` is given."""
    data = input.encode("utf-8") if isinstance(input, str) else input
    return subprocess.run(
        [*gptneo_command(), *args],
        input=data,
        stdin=subprocess.DEVNULL if data is None else None,
        capture_output=True,
        env=cli_env(home, **(env or {})),
        timeout=timeout,
        cwd=home,
    )


def on_a_pty(
    home: Path,
    argv: list[str],
    *,
    dimensions: tuple[int, int] = (40, 200),
    encoding: str | None = None,
    **env: str,
):
    """Run argv with stdin, stdout and stderr on a pseudo-terminal (pexpect) until it exits;
    the closed child: `.before` holds everything the terminal got, `.exitstatus` the code."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        argv[0],
        argv[1:],
        env=cli_env(home, **env),
        cwd=str(home),
        timeout=120,
        encoding=encoding,
        dimensions=dimensions,
    )
    child.expect(pexpect.EOF)
    child.close()
    return child


# --------------------------------------------------------------------------- checkpoints

_CACHE: dict[str, Path] = {}


def trained_bpe_json(corpus: list[str], vocab_size: int) -> str:
    """tokenizer.json text of a GPT-2-style byte-level BPE trained on `corpus`, by the
    package's own trainer (the one BPE trainer the tests use; every pair kept)."""
    from gptneo_cli.training import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus, vocab_size, min_frequency=0).backend.to_str()


def tiny_tokenizer_json() -> str:
    """A GPT-2-style byte-level BPE with a few hundred tokens, trained on CORPUS."""
    return trained_bpe_json(CORPUS * 10, vocab_size=350)


def build_causal_checkpoint(folder: Path, *, max_positions: int = 256, seed: int = 0) -> Path:
    """A random-weight transformers GPTNeoForCausalLM with the tiny tokenizer, saved to `folder`."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    tokenizer_json = tiny_tokenizer_json()
    tok = Tokenizer.from_str(tokenizer_json)
    eot = tok.token_to_id(EOT)
    config = transformers.GPTNeoConfig(
        vocab_size=tok.get_vocab_size() + 3,
        max_position_embeddings=max_positions,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=48,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    torch.manual_seed(seed)
    model = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():  # larger weights: sampled text is varied, eos is rare
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    return folder


def causal_checkpoint(tmp_path_factory: pytest.TempPathFactory, max_positions: int = 256) -> Path:
    """Build once per test session (per size) and share across test modules."""
    key = f"causal-{max_positions}"
    if key not in _CACHE:
        folder = tmp_path_factory.mktemp(key)
        _CACHE[key] = build_causal_checkpoint(folder / "model", max_positions=max_positions)
    return _CACHE[key]
