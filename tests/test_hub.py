"""Model names, downloads, the cache and `gptneo models`, against a local fake Hub.

The download tests run the real entry point (or a short Python snippet) in a subprocess
with HF_ENDPOINT pointing at tests/hubserver.py on 127.0.0.1 and HF_HOME in tmp_path:
huggingface_hub reads those variables at import, and its real client does the talking.
The server logs every request, which is how "only the needed files" and "no network
call" are checked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hubserver import MAIN, V1, HubServer, build_repos, commit_id  # noqa: E402

from gptneo_cli import hub  # noqa: E402
from gptneo_cli.config import GPTNeoConfig  # noqa: E402
from gptneo_cli.errors import HubError, ModelNotFoundError  # noqa: E402

NEEDED_MAIN = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


# ---- fixtures -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def repos():
    return {repo.repo_id: repo for repo in build_repos()}


@pytest.fixture
def server(repos):
    srv = HubServer(list(repos.values())).start()
    yield srv
    try:
        srv.stop()
    except OSError:
        pass


class Env:
    """Runs gptneo (or Python) in a subprocess with the Hub pointed at the fake server."""

    def __init__(self, tmp_path: Path, endpoint: str) -> None:
        self.home = tmp_path / "hf"
        self.cache = self.home / "hub"
        self.vars = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_", "GPTNEO_", "TRANSFORMERS_"))
        }
        self.vars.update(
            HF_HOME=str(self.home),
            HF_ENDPOINT=endpoint,
            HF_HUB_DISABLE_TELEMETRY="1",
            XDG_CONFIG_HOME=str(tmp_path / "config"),
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            PYTHONIOENCODING="utf-8",
            NO_COLOR="1",
        )
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            self.vars.pop(var, None)

    def cli(self, *args: str, input: str | None = None, **extra: str):
        command = [sys.executable, "-c", "from gptneo_cli.cli.app import main; main()", *args]
        return subprocess.run(
            command,
            env={**self.vars, **extra},
            input=input or "",
            capture_output=True,
            text=True,
            timeout=120,
        )

    def py(self, code: str, **extra: str):
        return subprocess.run(
            [sys.executable, "-c", code],
            env={**self.vars, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def snapshot(self, repo_id: str, commit: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


@pytest.fixture
def env(tmp_path, server) -> Env:
    return Env(tmp_path, server.url)


def one_error_line(result) -> str:
    """The command failed with exit 1 and exactly one 'Error:' line on stderr."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


# ---- naming (in-process, no network) ----------------------------------------------
def test_aliases_and_default_model(monkeypatch):
    assert hub.expand_alias("125m") == "EleutherAI/gpt-neo-125M"
    assert hub.expand_alias("1.3B") == "EleutherAI/gpt-neo-1.3B"
    assert hub.expand_alias("2.7b") == "EleutherAI/gpt-neo-2.7B"
    assert hub.expand_alias("org/other") == "org/other"
    monkeypatch.delenv("GPTNEO_MODEL", raising=False)
    assert hub.default_model() == hub.DEFAULT_MODEL == "EleutherAI/gpt-neo-125M"
    monkeypatch.setenv("GPTNEO_MODEL", "1.3b")
    assert hub.default_model() == "1.3b"


def test_parse_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert hub.parse_model_name("mine").path == Path("mine")
    assert hub.parse_model_name(tmp_path / "mine").path == tmp_path / "mine"
    ref = hub.parse_model_name("125M", revision="v1")
    assert (ref.repo_id, ref.revision, ref.path) == ("EleutherAI/gpt-neo-125M", "v1", None)
    assert hub.parse_model_name("org/name").repo_id == "org/name"
    with pytest.raises(ModelNotFoundError, match="folder not found"):
        hub.parse_model_name("./missing")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        hub.parse_model_name("file.txt")
    with pytest.raises(ModelNotFoundError, match="not a model folder, a Hub id"):
        hub.parse_model_name("bad name!")
    with pytest.raises(ValueError, match="model"):
        hub.parse_model_name("  ")
    # An existing folder wins over a Hub id spelled the same way.
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert hub.parse_model_name("org/name").path == Path("org/name")


def test_local_folder_needs_no_hub(tmp_path):
    assert hub.resolve_model_dir(tmp_path) == tmp_path
    assert hub.resolve_model_dir(str(tmp_path), revision="ignored") == tmp_path


def test_file_selection_prefers_safetensors_and_never_takes_decoys():
    decoys = ["flax_model.msgpack", "rust_model.ot", "tf_model.h5", "model.onnx", "README.md"]
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "vocab.json", *decoys]
    assert hub.plan_files(both) == ["config.json", "vocab.json", "model.safetensors"]
    assert hub.select_weights(["pytorch_model.bin", *decoys]) == ["pytorch_model.bin"]
    assert hub.select_weights(["model.safetensors.index.json", "pytorch_model.bin"]) == [
        "model.safetensors.index.json"
    ]
    assert hub.select_weights(["pytorch_model.bin.index.json"]) == ["pytorch_model.bin.index.json"]
    assert hub.select_weights(decoys) == []
    assert hub.plan_files(both, parts=("config", "tokenizer")) == ["config.json", "vocab.json"]


def test_weights_present_checks_every_shard(tmp_path):
    assert not hub.weights_present(tmp_path)
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "s1.safetensors").write_bytes(b"x")
    assert not hub.weights_present(tmp_path)
    (tmp_path / "s2.safetensors").write_bytes(b"x")
    assert hub.weights_present(tmp_path)


def test_full_disk_error_is_one_actionable_line():
    from gptneo_cli.hub.errors import hub_error

    err = hub_error(
        OSError(errno.ENOSPC, "No space left on device"), "a/b", "main", "model.safetensors"
    )
    assert isinstance(err, HubError)
    assert "disk is full" in str(err) and "HF_HUB_CACHE" in str(err) and "\n" not in str(err)


def test_format_helpers():
    assert hub.format_bytes(999) == "999 B"
    assert hub.format_bytes(1536) == "1.5 KB"
    assert hub.format_bytes(526_000_000) == "526.0 MB"
    assert hub.format_count(125_198_592) == "125.2M"
    assert hub.format_count(2_651_307_520) == "2.7B"


# ---- downloads ------------------------------------------------------------------------
def test_first_pull_downloads_only_the_needed_files(env, server, repos):
    result = env.cli("models", "pull", "tiny/gpt-neo")
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder == env.snapshot("tiny/gpt-neo", MAIN)
    assert result.stdout.count("\n") == 1  # stdout: just the folder
    assert "tiny/gpt-neo@" in result.stderr  # the summary is a diagnostic: stderr
    assert sorted(server.downloaded()) == sorted(NEEDED_MAIN)
    served = repos["tiny/gpt-neo"].commits[MAIN]
    for name in NEEDED_MAIN:
        assert (folder / name).read_bytes() == served[name], name
    on_disk = {p.name for p in folder.iterdir()}
    assert on_disk == NEEDED_MAIN  # no flax/rust/tf/onnx/.bin
    refs = env.cache / "models--tiny--gpt-neo" / "refs" / "main"
    assert refs.read_text() == MAIN
    # A second pull asks the Hub what main is, and downloads nothing.
    server.clear_log()
    again = env.cli("models", "pull", "tiny/gpt-neo")
    assert again.returncode == 0 and Path(again.stdout.strip()) == folder
    assert server.downloaded() == []


def test_progress_bars_go_to_stderr_on_a_terminal(env, server):
    """huggingface_hub draws bars only on a terminal: give stderr a pty, keep stdout a pipe."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    # A fresh pty is 0 columns wide, which would squeeze the bars to nothing.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    command = [
        sys.executable,
        "-c",
        "from gptneo_cli.cli.app import main; main()",
        "models",
        "pull",
        "tiny/gpt-neo",
    ]
    proc = subprocess.Popen(
        command, env=env.vars, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    stdout = proc.stdout.read().decode()
    assert proc.wait(timeout=120) == 0
    terminal = b"".join(chunks).decode(errors="replace")
    assert "model.safetensors: 100%" in terminal and "config.json: 100%" in terminal
    assert "resolve/" not in terminal  # labelled by file name, not URL
    assert stdout.strip() == str(env.snapshot("tiny/gpt-neo", MAIN))


def test_alias_downloads_the_eleutherai_repo(env, server):
    result = env.cli("models", "pull", "125m")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == env.snapshot("EleutherAI/gpt-neo-125M", MAIN)
    assert all("/EleutherAI/gpt-neo-125M/" in e.path for e in server.log)


def test_cached_model_loads_with_the_server_gone(env, server):
    assert env.cli("models", "pull", "tiny/gpt-neo").returncode == 0
    folder = env.snapshot("tiny/gpt-neo", MAIN)
    server.stop()
    code = (
        "from gptneo_cli.hub import resolve_model_dir; from gptneo_cli import load_tokenizer;"
        "print(resolve_model_dir('tiny/gpt-neo')); print(load_tokenizer('tiny/gpt-neo')"
        ".encode('he the'))"
    )
    result = env.py(code)
    assert result.returncode == 0, result.stderr
    path, ids = result.stdout.splitlines()
    assert Path(path) == folder and ids == "[257, 256, 257]"


def test_offline_mode_makes_no_network_call(env, server):
    assert env.cli("models", "pull", "tiny/gpt-neo").returncode == 0
    server.clear_log()
    code = "from gptneo_cli.hub import resolve_model_dir; print(resolve_model_dir('tiny/gpt-neo'))"
    result = env.py(code, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == env.snapshot("tiny/gpt-neo", MAIN)
    assert server.log == []


def test_offline_and_not_cached_suggests_the_demo_model(env, server):
    line = one_error_line(env.cli("models", "pull", "tiny/gpt-neo", HF_HUB_OFFLINE="1"))
    assert "not in the cache" in line and "HF_HUB_OFFLINE" in line and "--model tiny" in line
    assert server.log == []


def test_unreachable_hub_and_not_cached(env, server):
    server.stop()
    line = one_error_line(env.cli("models", "pull", "tiny/gpt-neo"))
    assert "cannot be reached" in line and "--model tiny" in line


def test_revision_pins_a_commit(env, server, repos):
    result = env.cli("models", "pull", "tiny/gpt-neo", "--revision", "v1")
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder == env.snapshot("tiny/gpt-neo", V1)
    assert GPTNeoConfig.from_json_file(folder).window_size == 4
    assert not (folder / "tokenizer.json").exists()  # v1 had none
    assert (folder / "model.safetensors").read_bytes() == repos["tiny/gpt-neo"].commits[V1][
        "model.safetensors"
    ]
    main = Path(env.cli("models", "pull", "tiny/gpt-neo").stdout.strip())
    assert GPTNeoConfig.from_json_file(main).window_size == 8
    # A cached commit id is immutable: no request at all, even with the Hub up.
    server.clear_log()
    code = (
        "from gptneo_cli.hub import resolve_model_dir; "
        f"print(resolve_model_dir('tiny/gpt-neo', '{V1}'))"
    )
    result = env.py(code)
    assert result.returncode == 0 and Path(result.stdout.strip()) == folder
    assert server.log == []
    # And the tag still resolves offline, from the ref the download recorded.
    server.stop()
    result = env.py(code.replace(V1, "v1"))
    assert result.returncode == 0 and Path(result.stdout.strip()) == folder


def test_unknown_repo_is_404(env, server):
    line = one_error_line(env.cli("models", "pull", "tiny/does-not-exist"))
    assert "not found" in line and "404" in line
    assert server.downloaded() == []


@pytest.mark.parametrize("repo_id", ["tiny/private", "tiny/private-no-code"])
def test_private_repo_needs_hf_token(env, server, repo_id):
    line = one_error_line(env.cli("models", "pull", repo_id))
    assert "401" in line and "HF_TOKEN" in line
    assert server.downloaded() == []
    wrong = one_error_line(env.cli("models", "pull", repo_id, HF_TOKEN="wrong"))
    assert "HF_TOKEN" in wrong
    server.clear_log()
    result = env.cli("models", "pull", repo_id, HF_TOKEN="secret")
    assert result.returncode == 0, result.stderr
    assert server.log and all(entry.authorized for entry in server.log)
    assert sorted(server.downloaded()) == sorted(NEEDED_MAIN)


def test_gated_repo_mentions_hf_token(env, server):
    line = one_error_line(env.cli("models", "pull", "tiny/gated"))
    assert "gated" in line and "HF_TOKEN" in line


def test_revision_that_does_not_exist(env, server):
    line = one_error_line(env.cli("models", "pull", "tiny/gpt-neo", "--revision", "nope"))
    assert "revision 'nope' does not exist" in line


def test_not_a_gpt_neo_repo_stops_before_the_weights(env, server):
    line = one_error_line(env.cli("models", "pull", "tiny/gpt2"))
    assert "not a GPT-Neo model" in line and "'gpt2'" in line
    assert server.downloaded() == ["config.json"]
    # Its cached config.json is not listed as a model, but can be removed.
    assert json.loads(env.cli("models", "list", "--format", "json").stdout)["models"] == []
    assert env.cli("models", "rm", "tiny/gpt2", "--yes").returncode == 0
    assert not (env.cache / "models--tiny--gpt2").exists()


def test_bin_weights_only_when_there_are_no_safetensors(env, server):
    result = env.cli("models", "pull", "tiny/gpt-neo-bin")
    assert result.returncode == 0, result.stderr
    assert "pytorch_model.bin" in server.downloaded()
    assert not {"tf_model.h5", "flax_model.msgpack"} & set(server.downloaded())


def test_sharded_checkpoint_fetches_index_and_every_shard(env, server):
    result = env.cli("models", "pull", "tiny/gpt-neo-sharded")
    assert result.returncode == 0, result.stderr
    got = set(server.downloaded())
    assert {
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    } <= got
    assert not any(name.endswith(".bin") or name.endswith(".bin.index.json") for name in got)
    assert hub.weights_present(Path(result.stdout.strip()))


def test_cut_off_transfer_resumes_with_a_range_request(env, server, repos):
    server.cut_off("model.safetensors", after=11_000_000)
    result = env.cli("models", "pull", "tiny/big")
    assert result.returncode == 0, result.stderr
    gets = [e for e in server.log if e.method == "GET" and e.path.endswith("model.safetensors")]
    assert len(gets) == 2
    assert gets[0].range is None
    # huggingface_hub keeps what it received in whole 10 MiB chunks and asks for the rest.
    assert gets[1].range == f"bytes={10 * 1024 * 1024}-"
    data = (Path(result.stdout.strip()) / "model.safetensors").read_bytes()
    assert (
        hashlib.sha256(data).digest()
        == hashlib.sha256(
            repos["tiny/big"].commits[commit_id("tiny/big")]["model.safetensors"]
        ).digest()
    )


def test_transfer_that_stays_broken_fails_cleanly_and_the_next_try_finishes(env, server):
    server.cut_off("model.safetensors", after=11_000_000, times=6)
    line = one_error_line(env.cli("models", "pull", "tiny/big"))
    assert "model.safetensors" in line and "cut off" in line and "run the command again" in line
    repo_dir = env.cache / "models--tiny--big"
    assert not list(repo_dir.rglob("*.incomplete"))  # no half file left behind
    assert (env.snapshot("tiny/big", commit_id("tiny/big")) / "config.json").is_file()
    server.state.cutoffs.clear()
    server.clear_log()
    result = env.cli("models", "pull", "tiny/big")
    assert result.returncode == 0, result.stderr
    assert server.downloaded() == ["model.safetensors"]  # config.json was kept


def test_not_enough_disk_space_is_caught_before_downloading(env, server):
    code = (
        "import shutil, sys; shutil.disk_usage = lambda p: shutil._ntuple_diskusage("
        "10**9, 10**9 - 100, 100); from gptneo_cli.cli.app import main; "
        "sys.argv = ['gptneo', 'models', 'pull', 'tiny/gpt-neo']; main()"
    )
    line = one_error_line(env.py(code))
    assert "not enough disk space" in line and "HF_HUB_CACHE" in line
    assert server.downloaded() == ["config.json"]


_FULL_DISK = """
import errno, sys
import huggingface_hub.file_download as fd

class FullDisk:
    # A download file on a disk that fills up after 1 MiB; the real client writes to it.
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        self.written += len(data)
        if self.written > 2**20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)

real_get = fd.http_get
fd.http_get = lambda url, temp_file, **kw: real_get(url, FullDisk(temp_file), **kw)
from gptneo_cli.cli.app import main
sys.argv = ["gptneo", "models", "pull", "tiny/big"]
main()
"""


def test_disk_filling_up_during_the_download(env, server):
    """The real client writes into a file whose disk fills up midway (ENOSPC)."""
    line = one_error_line(env.py(_FULL_DISK))
    assert "disk is full" in line and "HF_HUB_CACHE" in line and "tiny/big" in line
    assert not list((env.cache / "models--tiny--big").rglob("*.incomplete"))


def test_load_tokenizer_from_the_hub_fetches_no_weights(env, server):
    code = (
        "from gptneo_cli import load_tokenizer; t = load_tokenizer('tiny/gpt-neo');"
        "print(t.encode('the he'), t.eos_id, t.pad_id)"
    )
    result = env.py(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[116, 257, 32, 257] 258 258"  # t he Ġ he
    assert "model.safetensors" not in server.downloaded()
    assert "tokenizer.json" in server.downloaded()


def test_load_downloads_and_loads(env, server):
    pytest.importorskip("torch")
    code = (
        "import gptneo_cli;"
        "m, _ = gptneo_cli.load('tiny/gpt-neo', reference=True, revision='v1');"
        "print(m.config.window_size, sum(p.numel() for p in m.parameters()))"
    )
    result = env.py(code)
    assert result.returncode == 0, result.stderr
    window, count = result.stdout.split()
    assert window == "4"
    assert (
        int(count)
        == GPTNeoConfig.from_dict(
            json.loads((env.snapshot("tiny/gpt-neo", V1) / "config.json").read_text())
        ).num_parameters()
    )


# ---- the cache commands -----------------------------------------------------------------
def _tensor_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def test_models_list_info_and_rm_agree_with_the_cache(env, server):
    for args in (["--revision", "v1"], []):
        assert env.cli("models", "pull", "tiny/gpt-neo", *args).returncode == 0
    listed = env.cli("models", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["cache_dir"] == str(env.cache)
    rows = {row["revision"]: row for row in report["models"]}
    assert set(rows) == {"main", "v1"}
    for revision, commit in (("main", MAIN), ("v1", V1)):
        folder = env.snapshot("tiny/gpt-neo", commit)
        row = rows[revision]
        assert row["id"] == "tiny/gpt-neo" and row["commit"] == commit and row["complete"]
        assert row["size_on_disk"] == sum(p.stat().st_size for p in folder.iterdir())
        # The count from config.json equals the elements stored in the checkpoint.
        assert row["parameters"] == _tensor_count(folder / "model.safetensors")

    plain = env.cli("models", "list")
    assert "\x1b" not in plain.stdout
    header, *lines = plain.stdout.splitlines()
    assert header.split() == ["ID", "REVISION", "SIZE", "PARAMS", "NOTE"]
    assert sorted(line.split()[1] for line in lines) == ["main", "v1"]

    info = json.loads(env.cli("models", "info", "tiny/gpt-neo", "--format", "json").stdout)
    files = {f["name"]: f for f in info["files"]}
    assert files["model.safetensors"]["needed"] and files["model.safetensors"]["present"]
    for decoy in ("flax_model.msgpack", "rust_model.ot", "tf_model.h5", "pytorch_model.bin"):
        assert not files[decoy]["needed"] and not files[decoy]["present"]
    assert info["memory_bytes"]["float32"] == 4 * info["parameters"]
    assert info["memory_bytes"]["bfloat16"] == 2 * info["parameters"]
    assert info["memory_bytes"]["int8"] == info["parameters"]
    assert info["commit"] == MAIN and info["weights_present"]

    removed = env.cli("models", "rm", "tiny/gpt-neo", "--revision", "v1", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert not env.snapshot("tiny/gpt-neo", V1).exists()
    assert env.snapshot("tiny/gpt-neo", MAIN).is_dir()
    report = json.loads(env.cli("models", "list", "--format", "json").stdout)
    assert [row["revision"] for row in report["models"]] == ["main"]

    declined = env.cli("models", "rm", "tiny/gpt-neo", input="n\n")
    assert declined.returncode == 1 and "Nothing removed" in declined.stderr
    assert env.snapshot("tiny/gpt-neo", MAIN).is_dir()
    accepted = env.cli("models", "rm", "tiny/gpt-neo", input="y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert not (env.cache / "models--tiny--gpt-neo").exists()
    empty = env.cli("models", "list")
    assert empty.returncode == 0 and empty.stdout == "" and "No GPT-Neo models" in empty.stderr
    line = one_error_line(env.cli("models", "rm", "tiny/gpt-neo", "--yes"))
    assert "not in the cache" in line


def test_models_info_answers_from_config_alone(env, server):
    result = env.cli("models", "info", "tiny/gpt-neo-sharded", "--format", "json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert server.downloaded() == ["config.json"]
    assert not info["weights_present"]
    assert (
        info["parameters"]
        == GPTNeoConfig.from_dict(
            json.loads((Path(info["folder"]) / "config.json").read_text())
        ).num_parameters()
    )
    needed = {f["name"] for f in info["files"] if f["needed"]}
    assert {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
    } <= needed
    assert not any(name.endswith(".bin") for name in needed)
    text = env.cli("models", "info", "tiny/gpt-neo-sharded")
    assert "not downloaded" in text.stdout and "float32" in text.stdout
    # With the Hub gone, info still answers from the cached config.json.
    server.stop()
    offline = json.loads(
        env.cli("models", "info", "tiny/gpt-neo-sharded", "--format", "json").stdout
    )
    assert offline["parameters"] == info["parameters"]
    assert [f["name"] for f in offline["files"]] == ["config.json"]


def test_models_info_on_a_local_folder(env, tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    GPTNeoConfig(
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        vocab_size=100,
    ).save(folder)
    result = env.cli("models", "info", str(folder), "--format", "json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["repo_id"] is None and info["config"]["num_layers"] == 2
    assert [f["name"] for f in info["files"]] == ["config.json"]


def test_pinned_commit_with_only_the_config_cached_still_fetches_the_rest(env, server):
    assert env.cli("models", "info", "tiny/gpt-neo", "--revision", V1).returncode == 0
    assert server.downloaded() == ["config.json"]
    server.clear_log()
    code = (
        "from gptneo_cli import load_tokenizer; from gptneo_cli.hub import resolve_model_dir;"
        f"load_tokenizer('tiny/gpt-neo', '{V1}'); resolve_model_dir('tiny/gpt-neo', '{V1}')"
    )
    result = env.py(code)
    assert result.returncode == 0, result.stderr
    assert sorted(server.downloaded()) == sorted(
        [
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "model.safetensors",
        ]
    )


def test_hf_hub_cache_decides_where_models_go(env, server, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    result = env.cli("models", "pull", "tiny/gpt-neo", HF_HUB_CACHE=str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(elsewhere)
    assert not env.cache.exists()
    listed = json.loads(
        env.cli("models", "list", "--format", "json", HF_HUB_CACHE=str(elsewhere)).stdout
    )
    assert listed["cache_dir"] == str(elsewhere) and len(listed["models"]) == 1
    assert json.loads(env.cli("models", "list", "--format", "json").stdout)["models"] == []


def test_bundled_models_resolve_by_name(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    monkeypatch.setattr(hub.names, "BUNDLED_DIR", tmp_path)  # where names are resolved
    monkeypatch.chdir(tmp_path / "tiny")  # no folder named "tiny" here
    assert hub.resolve_model_dir("tiny") == tmp_path / "tiny"
    with pytest.raises(ModelNotFoundError):
        hub.parse_model_name("tiny/")
