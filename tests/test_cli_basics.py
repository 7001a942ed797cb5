"""The command line without a model: start-up imports, completion, settings, prompt reading,
and the exit code + one-line error for every bad input that fails before a model loads."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest
from helpers_cli import ANSI_ESCAPE, cli_env, run_cli

from gptneo_cli.cli import completions
from gptneo_cli.cli.inputs import read_prompt, read_text_file
from gptneo_cli.cli.loading import sigint_deferred
from gptneo_cli.settings import config_path, load_settings

HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "starlette")


def imported_modules(
    args: list[str], env: dict[str, str]
) -> tuple[set[str], subprocess.CompletedProcess]:
    """Run `python -X importtime -m gptneo_cli.cli ARGS` and list every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gptneo_cli.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return names, done


def test_only_torchs_numpy_warning_is_hidden():
    """torch warns when numpy is missing (gptneo never needs it): importing gptneo_cli hides
    that one message, for the CLI and library users, and no other warning."""
    code = (
        "import warnings, gptneo_cli\n"
        "warnings.warn(\"Failed to initialize NumPy: No module named 'numpy'\", UserWarning)\n"
        "warnings.warn('something else', UserWarning)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "NumPy" not in done.stderr and "something else" in done.stderr


def test_importing_the_app_does_not_import_torch(tmp_path):
    code = (
        "import sys, gptneo_cli.cli.app\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["generate", "--help"],
        ["chat", "--help"],
        ["info", "--help"],
        ["serve", "--help"],
        ["--version"],
    ],
)
def test_help_does_not_import_torch(tmp_path, args):
    names, done = imported_modules(args, cli_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gptneo_cli.cli.app" in names  # the measurement itself works
    assert not {n for n in names if n.split(".")[0] in HEAVY}
    assert done.stdout.strip()


def test_completion_lists_commands_and_values_without_torch(tmp_path):
    env = cli_env(
        tmp_path, _GPTNEO_COMPLETE="complete_bash", COMP_WORDS="gptneo gen", COMP_CWORD="1"
    )
    names, done = imported_modules([], env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["generate"]
    assert not {n for n in names if n.split(".")[0] in HEAVY}

    env.update(COMP_WORDS="gptneo generate --dtype b", COMP_CWORD="3")
    _, done = imported_modules([], env)
    assert done.stdout.split() == ["bfloat16"]


def test_completion_scripts_are_current():
    """Fails when completions/ no longer matches what the app generates; regenerate with
    `python -m gptneo_cli.cli.completions`."""
    assert completions.stale() == []
    for shell, name in completions.FILES.items():
        text = (completions.DEFAULT_DIR / name).read_text(encoding="utf-8")
        assert "_GPTNEO_COMPLETE" in text, shell
    assert (completions.DEFAULT_DIR / "_gptneo").read_text().startswith("#compdef gptneo")


def test_stale_check_notices_an_edited_script(tmp_path):
    completions.write_all(tmp_path)
    assert completions.stale(tmp_path) == []
    (tmp_path / "gptneo.fish").write_text("# edited\n")
    assert completions.stale(tmp_path) == ["gptneo.fish"]
    assert completions.main(["--check", str(tmp_path)]) == 1


# --------------------------------------------------------------------------- settings


def test_settings_precedence_flag_env_file_default(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('model = "from-file"\ntemperature = 1\ntop_k = 7\ndtype = "float32"\n')
    env = {"GPTNEO_CONFIG": str(cfg), "GPTNEO_TEMPERATURE": "0.25", "GPTNEO_DTYPE": ""}
    settings = load_settings(env)
    assert settings.values["temperature"] == 0.25  # env beats file
    assert settings.sources["temperature"] == "env GPTNEO_TEMPERATURE"
    assert settings.values["top_k"] == 7  # file beats default
    assert settings.sources["top_k"].startswith("file ")
    assert settings.values["dtype"] == "float32"  # an empty env var does not count
    assert settings.values["device"] == "auto"  # default
    assert settings.get("temperature", 0.5) == 0.5  # a flag beats everything
    assert settings.model() == "from-file"
    assert settings.model("flag-model") == "flag-model"
    assert load_settings({"XDG_CONFIG_HOME": str(tmp_path / "none")}).model() == (
        "EleutherAI/gpt-neo-125M"
    )


def test_config_file_lives_in_the_user_config_dir(tmp_path):
    if sys.platform in ("win32", "darwin"):
        pytest.skip("XDG layout is the Linux convention")
    assert config_path({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "gptneo" / "config.toml"


@pytest.mark.parametrize(
    "content, env, message",
    [
        ("temperature = 'hot'\n", {}, "temperature in"),
        ("colour = 1\n", {}, "unknown key 'colour'"),
        ("model = \n", {}, "not valid TOML"),
        ("", {"GPTNEO_TOP_K": "many"}, "GPTNEO_TOP_K must be an integer"),
    ],
)
def test_bad_settings_are_value_errors(tmp_path, content, env, message):
    cfg = tmp_path / "config.toml"
    cfg.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_settings({"GPTNEO_CONFIG": str(cfg), **env})


# --------------------------------------------------------------------------- prompts


class FakeStdin(io.BytesIO):
    """stdin as a pipe (isatty False) or a terminal (True), with a .buffer like sys.stdin."""

    def __init__(self, data: bytes = b"", tty: bool = False) -> None:
        super().__init__(data)
        self.tty = tty

    @property
    def buffer(self) -> io.BytesIO:
        return self

    def isatty(self) -> bool:
        return self.tty


def test_prompt_sources():
    terminal = FakeStdin(tty=True)
    assert read_prompt("Hello", stdin=terminal) == "Hello"
    assert read_prompt(None, stdin=FakeStdin(b"piped text\n")) == "piped text"
    assert read_prompt("-", stdin=FakeStdin(b"dash\r\n")) == "dash"
    # stdin first, then a blank line, then the argument (llm / Ollama convention)
    assert read_prompt("Summarize.", stdin=FakeStdin(b"Some text.\n")) == "Some text.\n\nSummarize."
    # empty piped stdin (e.g. </dev/null) does not count
    assert read_prompt("Only arg", stdin=FakeStdin(b"")) == "Only arg"


def test_prompt_from_file_then_argument(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("From a file.\n", encoding="utf-8")
    assert read_prompt(None, f, stdin=FakeStdin(tty=True)) == "From a file."
    assert read_prompt("And more.", f, stdin=FakeStdin(b"ignored")) == "From a file.\n\nAnd more."


@pytest.mark.parametrize("arg, data", [("", b""), ("   ", b""), (None, b"\n\n"), ("-", b"")])
def test_empty_prompt_is_refused(arg, data):
    with pytest.raises(ValueError, match="prompt is empty"):
        read_prompt(arg, stdin=FakeStdin(data))


def test_no_prompt_on_a_terminal_says_how_to_give_one():
    with pytest.raises(ValueError, match="no prompt"):
        read_prompt(None, stdin=FakeStdin(tty=True))


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is a directory"):
        read_text_file(tmp_path)
    (tmp_path / "nul.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    with pytest.raises(ValueError, match="binary"):
        read_text_file(tmp_path / "nul.bin")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_text_file(tmp_path / "latin1.txt")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhi")
    assert read_text_file(tmp_path / "bom.txt") == "hi"
    with pytest.raises(ValueError, match="binary"):
        read_prompt(None, stdin=FakeStdin(b"\x00\x01binary"))


def test_ctrl_c_during_the_torch_import_is_held_until_it_ends():
    """torch's import swallows or crashes on a KeyboardInterrupt; the CLI holds it back."""
    if sys.platform == "win32":
        pytest.skip("SIGINT to one's own process is POSIX")
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            reached_end = True  # the signal did not interrupt the block
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with sigint_deferred():  # no signal: nothing raised
        pass


# --------------------------------------------------------------------------- exit codes


def one_error_line(done: subprocess.CompletedProcess[bytes]) -> str:
    """stderr must be exactly one line starting with 'Error:', with no traceback."""
    err = done.stderr.decode()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    assert done.stdout == b""
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--temperature", "-1"], "--temperature must be at least 0"),
        (["generate", "hi", "--top-p", "0"], "--top-p must be more than 0 and at most 1"),
        (["generate", "hi", "--top-p", "1.5"], "--top-p must be more than 0 and at most 1"),
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["generate", "hi", "--format", "xml"], "unknown --format 'xml'"),
        (["generate", "hi", "--attn", "fast"], "unknown attention backend 'fast'"),
        (["generate", "hi", "--device", "tpu"], "unknown device 'tpu'"),
        (["generate", "hi", "--dtype", "int3"], "unknown dtype 'int3'"),
        (["generate", ""], "the prompt is empty"),
        (["generate", "--file", "missing.txt"], "file not found: missing.txt"),
        (["generate", "--input", "missing.txt"], "file not found: missing.txt"),
        (["generate", "hi", "--output", "no/such/dir/out.txt"], "cannot write no/such/dir"),
        (["generate", "hi", "--temperature", "warm"], "Invalid value for '--temperature'"),
        (["generate", "hi", "--no-such-flag"], "No such option: --no-such-flag"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    done = run_cli(*args, home=tmp_path)
    assert done.returncode == 2
    assert message in one_error_line(done)


def test_binary_file_exits_2(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    done = run_cli("generate", "--file", "blob.bin", home=tmp_path)
    assert done.returncode == 2
    assert "binary" in one_error_line(done)


def test_bad_env_value_exits_2(tmp_path):
    done = run_cli("generate", "hi", home=tmp_path, env={"GPTNEO_TEMPERATURE": "hot"})
    assert done.returncode == 2
    assert "GPTNEO_TEMPERATURE must be a number" in one_error_line(done)


@pytest.mark.parametrize("model", ["./no/such/folder", "no-such-org/no-such-model"])
def test_unknown_model_exits_1(tmp_path, model):
    done = run_cli("generate", "hi", "--model", model, "--device", "cpu", home=tmp_path)
    assert done.returncode == 1
    assert model.lstrip("./") in one_error_line(done)


def test_debug_shows_the_traceback(tmp_path):
    done = run_cli(
        "--debug", "generate", "hi", "--model", "./nowhere", "--device", "cpu", home=tmp_path
    )
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("Error: ")
    again = run_cli("generate", "hi", "--model", "./nowhere", "--debug", home=tmp_path)
    assert "Traceback" in again.stderr.decode()


def test_no_arguments_prints_help(tmp_path):
    done = run_cli(home=tmp_path)
    assert done.returncode == 2
    assert b"generate" in done.stdout and b"chat" in done.stdout
    assert done.stdout.count(b"Usage:") == 1


def test_info_piped_is_plain_and_json_is_complete(tmp_path):
    cfg = tmp_path / "config" / "gptneo" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("temperature = 0.5\n")
    done = run_cli("info", home=tmp_path, env={"GPTNEO_MODEL": "125m", "FORCE_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    assert ANSI_ESCAPE not in done.stdout
    text = done.stdout.decode()
    assert "GPTNEO_MODEL: 125m" in text
    assert f"{cfg} (found)" in text
    assert "flash: no: FlashAttention-2 needs a CUDA device" in text
    assert f"temperature: 0.5 (file {cfg})" in text
    assert "model: '125m' (env GPTNEO_MODEL)" in text
    assert "top_k:" not in text  # only values that differ from the defaults are listed

    import json

    done = run_cli("info", "--format", "json", home=tmp_path, env={"GPTNEO_MODEL": "125m"})
    report = json.loads(done.stdout)
    assert report["config"]["model"] == "125m"
    assert report["config"]["sources"]["model"] == "env GPTNEO_MODEL"
    assert report["config"]["settings"]["temperature"] == 0.5
    assert report["config"]["file"] == str(cfg)
    cpu = next(d for d in report["devices"] if d["name"] == "cpu")
    assert cpu["attention"]["eager"] is None and cpu["attention"]["sdpa"] is None
    assert "CUDA" in cpu["attention"]["flash"]
    assert cpu["attention_auto"] == "sdpa"
    assert report["packages"]["torch"]


def test_module_entry_point_matches_console_script(tmp_path):
    a = run_cli("--version", home=tmp_path)
    b = subprocess.run(
        [sys.executable, "-m", "gptneo_cli.cli", "--version"],
        capture_output=True,
        env=cli_env(tmp_path),
    )
    assert a.stdout == b.stdout and a.stdout.startswith(b"gptneo ")
