"""Shared fixtures. The builders live in oracle.py (import it as `from oracle import ...`)."""

from __future__ import annotations

import logging
import os
import signal

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from oracle import TINY_CONFIGS, build_reference, save_reference  # noqa: E402


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: (folder, reference model) for a head, config name and file format."""

    def make(
        head: str = "causal_lm",
        config: str = "local_first",
        fmt: str = "safetensors",
        seed: int = 0,
        **overrides,
    ):
        ref = build_reference(head, seed=seed, **{**TINY_CONFIGS[config], **overrides})
        folder = save_reference(ref, tmp_path / f"{head}-{config}-{fmt}-{seed}", fmt)
        return folder, ref

    return make


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_deliverable():
    """Tests that press Ctrl-C need SIGINT to reach the CLI. A test run started in the
    background of a non-interactive shell (`nohup pytest &`) ignores SIGINT, and every
    subprocess would inherit that; the run restores the default for itself and them."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory):
    """Measured kernel choices (gptneo_cli.kernels) go to a folder of this run, never to the
    user's ~/.cache; CLI subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        patch.delenv("GPTNEO_KERNEL", raising=False)
        yield


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield
