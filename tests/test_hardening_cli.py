"""The command line under a hostile or careless user (issue 11): no hang on stdin it does not
need, bounded reads, closed streams, undecodable bytes, raw terminal escapes, lost files."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from helpers_cli import cli_env, gptneo_command, on_a_pty, run_cli

TINY = ("--model", "tiny", "--device", "cpu")
GEN = ("generate", *TINY, "-n", "4", "--greedy")


def one_line(done: subprocess.CompletedProcess[bytes], code: int) -> str:
    """The run failed with `code` and printed exactly one 'Error:' line and nothing else."""
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == code, (done.returncode, err)
    assert err.count("\n") == 1 and err.startswith("Error: "), err
    return err.strip()


def sh(command: str, home, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run a bash line (redirections such as `>&-`, `<(...)`) with gptneo as "$G"."""
    line = f"G={shlex.join(gptneo_command())}; {command}"
    return subprocess.run(
        ["bash", "-c", line], capture_output=True, timeout=120, env=cli_env(home, **env), cwd=home
    )


# ---- stdin it does not need ---------------------------------------------------------------


def with_an_idle_stdin(home, *args: str) -> tuple[int, bytes, bytes]:
    """Run gptneo with a stdin pipe that stays open and silent: (exit code, stdout, stderr).
    The timeout is a guard against a hang, not a measurement."""
    proc = subprocess.Popen(
        [*gptneo_command(), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(home),
        cwd=home,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.stdin.close()
    return proc.returncode, out, err


def test_an_idle_stdin_pipe_does_not_hold_a_prompt_argument(tmp_path):
    """`sleep 1000 | gptneo generate "prompt"`: the pipe never sends and never closes."""
    code, out, err = with_an_idle_stdin(tmp_path, *GEN, "Once upon a time")
    assert code == 0, err
    alone = run_cli(*GEN, "Once upon a time", home=tmp_path)
    assert out == alone.stdout and out.strip()


def test_piped_text_is_still_put_before_the_argument(tmp_path):
    both = run_cli(*GEN, "--format", "json", "and then", input="Once upon a time", home=tmp_path)
    assert json.loads(both.stdout)["prompt"] == "Once upon a time\n\nand then"


def test_show_config_does_not_wait_for_an_idle_pipe(tmp_path):
    code, _, err = with_an_idle_stdin(tmp_path, "generate", "--show-config")
    assert code == 0 and b"Effective settings" in err


# ---- inputs are size-checked before they are read whole -----------------------------------


def test_file_on_a_fifo_nobody_writes_to_does_not_block(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = one_line(run_cli(*GEN, "--file", str(fifo), home=tmp_path), 2)
    assert "empty" in line


def test_file_from_process_substitution_still_works(tmp_path):
    for line in (
        '$G generate --model tiny -n 2 --format json --file <(echo "Once upon")',
        'echo "Once upon" | $G generate --model tiny -n 2 --format json --file /dev/stdin',
    ):
        done = sh(line, tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["prompt"] == "Once upon"


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_dev_zero_is_refused_after_a_bounded_read(tmp_path, how):
    if how == "file":
        done = run_cli(*GEN, "--file", "/dev/zero", home=tmp_path)
    else:
        done = sh("$G generate --model tiny -n 2 < /dev/zero", tmp_path)
    assert "more than the 1 MB" in one_line(done, 2)


def test_a_huge_prompt_file_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(50 * 2**20)  # sparse: 50 MB without writing them
    line = one_line(run_cli(*GEN, "--file", str(big), home=tmp_path), 2)
    assert "big.txt is 50 MB: more than the 1 MB a text input may hold" in line


def test_a_huge_stdin_chat_line_is_refused_and_the_session_goes_on(tmp_path):
    data = b"x" * (2**20 + 10) + b"\nHello\n"
    done = run_cli("chat", *TINY, "-n", "3", "--greedy", input=data, home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.decode() == "Error: stdin line 1 is longer than 1 MB; skipped\n"
    assert done.stdout.count(b"\n") == 1  # the reply to "Hello"


# ---- closed streams, undecodable bytes, help into a closed pipe ---------------------------


def test_closed_stdout_is_one_line(tmp_path):
    line = one_line(sh('$G generate --model tiny -n 2 "Hello" >&-', tmp_path), 1)
    assert "stdout is closed" in line


def test_closed_stdout_is_fine_with_output_file(tmp_path):
    done = sh('$G generate --model tiny -n 2 --greedy -o out.txt "Hello" >&-', tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.txt").read_text().strip()


def test_closed_stdin_without_a_prompt_is_one_line(tmp_path):
    assert "empty" in one_line(sh("$G generate --model tiny -n 2 0<&-", tmp_path), 2)


def test_closed_stdin_with_a_prompt_argument_generates(tmp_path):
    done = sh('$G generate --model tiny -n 2 --greedy "Hello" 0<&-', tmp_path)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr


def test_help_into_a_closed_pipe_exits_0(tmp_path):
    for args in (["generate", "--help"], ["--help"], ["models", "list", "--help"]):
        proc = subprocess.Popen(
            [*gptneo_command(), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(tmp_path),
            cwd=tmp_path,
        )
        proc.stdout.readline()  # `| head -1`
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, err
        assert err == b""


def _argv_bytes(*args: bytes) -> list[bytes]:
    return [os.fsencode(a) for a in gptneo_command()] + list(args)


@pytest.mark.parametrize(
    "args, named",
    [
        ([b"generate", b"--model", b"tiny", b"caf\xe9 \xff"], "PROMPT"),
        ([b"generate", b"--model", b"tiny", b"--stop", b"\xff", b"Hello"], "--stop"),
        ([b"classify", b"--model", b"tiny", b"--labels", b"pos\xff,neg", b"-"], "--labels"),
        ([b"chat", b"--model", b"tiny", b"--system", b"\xfe"], "--system"),
    ],
)
def test_undecodable_argument_bytes_are_one_line(tmp_path, args, named):
    done = subprocess.run(
        _argv_bytes(*args),
        input=b"great\n",
        capture_output=True,
        env=cli_env(tmp_path),
        cwd=tmp_path,
        timeout=120,
    )
    line = one_line(done, 2)
    assert f"{named} is not valid UTF-8 text" in line


def test_an_undecodable_chat_line_is_refused_and_the_next_is_answered(tmp_path):
    done = run_cli("chat", *TINY, "-n", "3", "--greedy", input=b"caf\xe9\nHello\n", home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.decode() == "Error: stdin line 1 is not valid UTF-8 text; skipped\n"
    assert done.stdout.count(b"\n") == 1


# ---- escape sequences from data never reach the terminal raw ------------------------------

EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m"


def on_a_terminal(home, command: str, **env: str) -> bytes:
    line = f"G={shlex.join(gptneo_command())}; {command}"
    return on_a_pty(home, ["/bin/sh", "-c", line], TERM="xterm-256color", **env).before


def _no_raw_data_escapes(shown: bytes) -> None:
    assert b"\x1b]0;pwned" not in shown and b"\x1b[2J" not in shown
    assert "\x9b".encode() not in shown
    assert b"\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m" in shown


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
@pytest.mark.parametrize("no_color", ["1", ""])
def test_a_prompt_file_echoed_on_a_terminal_is_inert(tmp_path, no_color):
    (tmp_path / "p.txt").write_text(f"Once {EVIL} upon", encoding="utf-8")
    shown = on_a_terminal(
        tmp_path, "$G generate --model tiny -n 3 --greedy --file p.txt", NO_COLOR=no_color
    )
    _no_raw_data_escapes(shown)


def test_piped_output_stays_byte_exact(tmp_path):
    (tmp_path / "p.txt").write_text(f"Once {EVIL} upon", encoding="utf-8")
    done = run_cli(*GEN, "--echo", "--file", "p.txt", home=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith(f"Once {EVIL} upon".encode())


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_chat_show_system_text_is_inert_on_a_terminal(tmp_path):
    (tmp_path / "in.txt").write_text(f"/system {EVIL}\n/show\n/system\n", encoding="utf-8")
    shown = on_a_terminal(tmp_path, "$G chat --model tiny < in.txt", NO_COLOR="1")
    _no_raw_data_escapes(shown)


def test_file_names_and_labels_in_error_lines_are_inert(tmp_path):
    line = one_line(run_cli(*GEN, "--file", f"missing{EVIL}.txt", home=tmp_path), 2)
    assert "\x1b" not in line and "\x9b" not in line and "\x07" not in line
    assert "missing\\x1b]0;pwned\\x07" in line
    bad = run_cli("classify", *TINY, "--labels", f"a{EVIL},", "-", input="x", home=tmp_path)
    assert "\x1b" not in bad.stderr.decode()


# ---- user files are replaced all or nothing ----------------------------------------------

_FULL_DISK = """
import errno, os, sys
def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = full
from gptneo_cli.cli.app import main
sys.argv = ["gptneo", *sys.argv[1:]]
main()
"""


def full_disk(home, *args: str, input: bytes | None = None):
    return subprocess.run(
        [sys.executable, "-c", _FULL_DISK, *args],
        input=input,
        capture_output=True,
        env=cli_env(home),
        cwd=home,
        timeout=120,
    )


def test_generate_output_on_a_full_disk_keeps_the_old_file_and_names_it(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("precious\n")
    line = one_line(full_disk(tmp_path, *GEN, "-o", str(out), "Hello"), 1)
    assert f"cannot write {out}: No space left on device" in line
    assert "old file is unchanged" in line
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir() if "out.txt" in p.name) == ["out.txt"]


def test_generate_output_replaces_the_file_when_it_succeeds(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old\n")
    out.chmod(0o640)
    done = run_cli(*GEN, "-o", str(out), "Hello", home=tmp_path)
    assert done.returncode == 0 and done.stdout == b""
    assert out.read_text() != "old\n" and out.read_text().endswith("\n")
    assert oct(out.stat().st_mode & 0o777) == "0o640"
    assert [p.name for p in tmp_path.iterdir() if "out.txt" in p.name] == ["out.txt"]


def test_a_failed_run_leaves_the_old_output_file(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("precious\n")
    done = run_cli(
        "generate", "--model", str(tmp_path / "nope"), "-o", str(out), "Hello", home=tmp_path
    )
    assert done.returncode == 1
    assert out.read_text() == "precious\n"
    assert [p.name for p in tmp_path.iterdir() if "out.txt" in p.name] == ["out.txt"]


def test_chat_save_on_a_full_disk_keeps_the_old_session_and_fails(tmp_path):
    saved = tmp_path / "s.json"
    saved.write_text('{"old": true}\n')
    done = full_disk(
        tmp_path, "chat", *TINY, "-n", "2", "--greedy", input=f"Hello\n/save {saved}\n".encode()
    )
    assert done.returncode == 1
    err = done.stderr.decode()
    assert err == (
        f"Error: cannot write {saved}: No space left on device; the old file is unchanged\n"
    )
    assert saved.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir() if "s.json" in p.name] == ["s.json"]


def test_chat_save_then_load_round_trips(tmp_path):
    saved = tmp_path / "s.json"
    done = run_cli(
        "chat",
        *TINY,
        "-n",
        "2",
        "--greedy",
        input=f"Hello\n/save {saved}\n/load {saved}\n",
        home=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(saved.read_text())["turns"][0]["user"] == "Hello"


def test_sigterm_mid_write_keeps_the_old_output_and_leaves_no_temporary_file(tmp_path):
    import signal
    import time

    out = tmp_path / "out.txt"
    out.write_text("precious\n")
    proc = subprocess.Popen(
        [
            *gptneo_command(),
            "generate",
            *TINY,
            "-n",
            "250",
            "--ignore-eos",
            "--num-return-sequences",
            "64",
            "--temperature",
            "1",
            "-o",
            str(out),
            "x",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(tmp_path),
        cwd=tmp_path,
    )
    try:
        for _ in range(1200):  # until the temporary file exists (a guard, not a measurement)
            if any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    assert b"Traceback" not in proc.stderr.read()
    assert out.read_text() == "precious\n"
    assert [p.name for p in tmp_path.iterdir() if "out.txt" in p.name] == ["out.txt"]
