"""Downloads and the cache against the fake Hub: huggingface_hub's own log lines never come
before ours, and a cache that cannot be written is one clear line (issue 11)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hubserver import MAIN  # noqa: E402
from test_hub import env, one_error_line, repos, server  # noqa: E402, F401 - fixtures


def test_a_resumed_download_prints_nothing_but_our_line(env, server):  # noqa: F811
    server.cut_off("model.safetensors", after=11_000_000)
    result = env.cli("models", "pull", "tiny/big")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]]
    assert result.stderr.endswith("ready\n")
    assert "resume" not in result.stderr and "Error" not in result.stderr


def test_a_failed_download_is_only_our_one_line(env, server):  # noqa: F811
    server.cut_off("model.safetensors", after=11_000_000, times=6)
    result = env.cli("models", "pull", "tiny/big")
    line = one_error_line(result)
    assert result.stderr == line + "\n"
    assert "cut off" in line and "model.safetensors" in line


_READ_ONLY = """
import os, sys
real = os.access
os.access = lambda path, mode, **kw: False if mode == os.W_OK else real(path, mode, **kw)
from gptneo_cli.cli.app import main
sys.argv = ['gptneo', 'models', 'rm', 'tiny/gpt-neo', '--yes']
main()
"""

_DENIED = """
import os, sys
import huggingface_hub.utils._cache_manager as cm
def denied(path, *a, **k):
    raise PermissionError(13, 'Permission denied', str(path))
cm.os.remove = denied
cm.shutil.rmtree = denied
from gptneo_cli.cli.app import main
sys.argv = ['gptneo', 'models', 'rm', 'tiny/gpt-neo', '--yes']
main()
"""


def test_models_rm_on_a_read_only_cache_removes_nothing_and_says_so(env, server):  # noqa: F811
    assert env.cli("models", "pull", "tiny/gpt-neo").returncode == 0
    result = env.py(_READ_ONLY)
    line = one_error_line(result)
    assert result.stderr == line + "\n"
    assert "read-only" in line and "nothing was removed" in line
    assert env.snapshot("tiny/gpt-neo", MAIN).is_dir()
    listed = json.loads(env.cli("models", "list", "--format", "json").stdout)
    assert [m["id"] for m in listed["models"]] == ["tiny/gpt-neo"]


def test_models_rm_that_fails_half_way_is_an_error_not_a_warning(env, server):  # noqa: F811
    assert env.cli("models", "pull", "tiny/gpt-neo").returncode == 0
    result = env.py(_DENIED)
    line = one_error_line(result)
    assert result.stderr == line + "\n"  # no traceback logged by huggingface_hub
    assert "could not remove all of tiny/gpt-neo" in line and "permission denied" in line
    assert "Removed" not in result.stderr
