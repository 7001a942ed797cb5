"""`gptneo chat`: piped stdin (one line per turn, exits at EOF) and the interactive REPL driven
through a pseudo-terminal with pexpect (slash commands, history, Ctrl-C, Ctrl-D)."""

from __future__ import annotations

import json
import sys

import pytest
from helpers_cli import ANSI_ESCAPE, causal_checkpoint, cli_env, gptneo_command, run_cli

from gptneo_cli.conversation import Conversation, Turn

pexpect = pytest.importorskip("pexpect")

# A prefix made of several tokens, so a random model never writes it by chance and replies
# run to their token limit (the prefix is also the stop string).
USER = "Questioner:"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(causal_checkpoint(tmp_path_factory, max_positions=2048))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return str(causal_checkpoint(tmp_path_factory, max_positions=64))


def chat_args(model: str, *args: str) -> list[str]:
    """`chat` on `model`, on the CPU, seeded, with the USER prefix, then `args`."""
    return [
        "chat",
        "--model",
        model,
        "--device",
        "cpu",
        "--seed",
        "1",
        "--user-prefix",
        USER,
        *args,
    ]


def chat_piped(model: str, home, lines: list[str], *args: str):
    return run_cli(
        *chat_args(model, *args),
        home=home,
        input="\n".join(lines) + "\n",
        timeout=180,
    )


# --------------------------------------------------------------------------- the template


def test_template_renders_turns_and_keeps_system_when_sliding():
    conv = Conversation(system="Be kind.", turns=[Turn("hi", "hello"), Turn("how?", "fine")])
    assert conv.render("bye") == (
        "Be kind.\n\nUser: hi\nAssistant: hello\nUser: how?\nAssistant: fine\nUser: bye\nAssistant:"
    )
    # budget in characters here: only the newest turn fits next to the system text
    prompt, dropped = conv.fit("bye", len, len(conv.render("bye")) - 1)
    assert dropped == 1 and conv.first_in_context == 1
    assert prompt.startswith("Be kind.\n\nUser: how?") and "hi" not in prompt
    with pytest.raises(ValueError, match="system text and this message"):
        conv.fit("bye", len, 10)
    assert conv.first_in_context == 1  # a refused message does not push turns out
    assert conv.stops() == ["User:"]


# --------------------------------------------------------------------------- piped stdin


def test_piped_chat_one_turn_per_line_and_exits_at_eof(model, tmp_path):
    done = chat_piped(
        model,
        tmp_path,
        [
            "/set ignore_eos true",
            "hello",
            "",
            "how are you",
            "/save conv.json",
        ],
        "--max-new-tokens",
        "6",
        "--system",
        "You are terse.",
    )
    assert done.returncode == 0, done.stderr.decode()
    assert ANSI_ESCAPE not in done.stdout
    saved = json.loads((tmp_path / "conv.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in saved["turns"]] == ["hello", "how are you"]
    assert saved["system"] == "You are terse." and saved["user_prefix"] == USER
    assert saved["settings"]["ignore_eos"] is True and saved["settings"]["seed"] == 1
    out = done.stdout.decode()
    first, second = (t["assistant"] for t in saved["turns"])
    assert first and second and out.index(first) < out.rindex(second)
    assert b"Traceback" not in done.stderr


def test_piped_slash_commands_edit_the_conversation(model, tmp_path):
    done = chat_piped(
        model,
        tmp_path,
        [
            "one",
            "two",
            "/save a.json",
            "/undo",
            "/save b.json",
            "/regen",
            "/save c.json",
            "/system Speak like a pirate.",
            "/clear",
            "/save d.json",
            "/load a.json",
            "/save e.json",
            "/set temperature -1",
            "/bogus",
            "/exit",
            "never sent",
        ],
        "--max-new-tokens",
        "4",
    )
    assert done.returncode == 0, done.stderr.decode()
    read = lambda name: json.loads((tmp_path / name).read_text(encoding="utf-8"))  # noqa: E731
    a, b, c, d, e = (read(f"{x}.json") for x in "abcde")
    assert [t["user"] for t in a["turns"]] == ["one", "two"]
    assert [t["user"] for t in b["turns"]] == ["one"]
    assert [t["user"] for t in c["turns"]] == ["one"]  # /regen replaced the last reply
    assert d["turns"] == [] and d["system"] == "Speak like a pirate."
    assert e["turns"] == a["turns"]
    err = done.stderr.decode()
    assert "temperature must be >= 0" in err and "unknown command /bogus" in err
    assert "never sent" not in json.dumps(e)


def test_piped_load_restores_conversation_and_settings(model, tmp_path):
    (tmp_path / "bad.json").write_text('{"turns": [], "settings": {"top_p": 7}}', "utf-8")
    done = chat_piped(
        model,
        tmp_path,
        [
            "/set temperature 0.5",
            "/set top_k 7",
            "one",
            "/save a.json",
            "/set temperature 0.8",
            "/clear",
            "/load bad.json",
            "/save b.json",
            "/load a.json",
            "/save c.json",
        ],
        "--max-new-tokens",
        "2",
    )
    assert done.returncode == 0, done.stderr.decode()
    read = lambda name: json.loads((tmp_path / name).read_text(encoding="utf-8"))  # noqa: E731
    a, b, c = read("a.json"), read("b.json"), read("c.json")
    assert "bad.json: bad settings: top_p" in done.stderr.decode()
    assert b["turns"] == [] and b["settings"]["temperature"] == 0.8  # a bad file changes nothing
    assert c["turns"] == a["turns"] and c["settings"] == a["settings"]
    assert (c["settings"]["temperature"], c["settings"]["top_k"]) == (0.5, 7)


def test_context_slides_and_says_so(small_model, tmp_path):
    lines = [f"message number {i} is here" for i in range(6)] + ["/save s.json"]
    done = chat_piped(
        small_model,
        tmp_path,
        ["/set ignore_eos true", *lines],
        "--max-new-tokens",
        "8",
        "--system",
        "SYS",
    )
    assert done.returncode == 0, done.stderr.decode()
    assert "dropped out" in done.stderr.decode()
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert len(saved["turns"]) == 6  # dropped from the context, not from the transcript


def test_piped_message_too_long_is_skipped_and_the_rest_still_run(small_model, tmp_path):
    """A line that cannot fit the context is one error line; later lines still get replies,
    and the exit code (2) tells that one turn was refused."""
    long = " ".join(["word"] * 200)  # far more than the 64 positions
    done = chat_piped(
        small_model,
        tmp_path,
        [
            "/set ignore_eos true",
            "first",
            long,
            "last",
            "/save s.json",
            "/show",
        ],
        "--max-new-tokens",
        "4",
    )
    assert done.returncode == 2
    err = done.stderr.decode()
    assert [line for line in err.splitlines() if line.startswith("Error:")] == [
        next(line for line in err.splitlines() if "system text and this message" in line)
    ]
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in saved["turns"]] == ["first", "last"]
    assert "turns: 2 (2 in the context)" in err  # "last" still had "first" in its context
    assert b"Traceback" not in done.stderr


def test_piped_chat_rejects_bad_values_before_loading(tmp_path):
    done = run_cli("chat", "--temperature", "-2", home=tmp_path, input="hi\n")
    assert done.returncode == 2
    assert done.stderr.decode().startswith("Error: --temperature must be at least 0")


# --------------------------------------------------------------------------- pseudo-terminal


def spawn(model: str, home, *args: str):
    env = cli_env(home, NO_COLOR="1", TERM="xterm")
    cmd = gptneo_command()
    child = pexpect.spawn(
        cmd[0],
        [*cmd[1:], *chat_args(model, *args)],
        env=env,
        cwd=str(home),
        timeout=120,
        encoding="utf-8",
        dimensions=(40, 200),
    )
    child.logfile_read = sys.stderr if "-s" in sys.argv else None
    child.expect_exact(">>> ")
    return child


def finish(child) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_pty_slash_commands_and_multiline(model, tmp_path):
    child = spawn(model, tmp_path, "--max-new-tokens", "5")
    child.sendline("/help")
    child.expect_exact("/regen")
    child.expect_exact(">>> ")
    child.sendline("/set temperature 0.5")
    child.expect_exact("(temperature = 0.5)")
    child.sendline("/set bogus 1")
    child.expect_exact("unknown setting 'bogus'")
    child.sendline("/system You are terse.")
    child.expect_exact("(system text set)")
    child.sendline("/nope")
    child.expect_exact("unknown command /nope")
    child.expect_exact(">>> ")
    child.sendline("hello there")
    child.expect_exact(">>> ")
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("line one")
    child.expect_exact("... ")
    child.sendline('line two"""')
    child.expect_exact(">>> ")
    child.sendline("/show")
    child.expect(r"turns\s+2 \(2 in the context\)")
    child.expect(r"temperature\s+0\.5")
    child.expect_exact(">>> ")
    child.sendline("/save s.json")
    child.expect_exact("(saved 2 turns")
    child.sendline("/set max_new_tokens 5000")
    child.expect_exact("(max_new_tokens = 5000)")
    child.sendline("one more")
    child.expect_exact("leaves no room for the conversation in the model's 2048 positions")
    child.sendline("/exit")
    assert finish(child) == 0
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in saved["turns"]] == ["hello there", "line one\nline two"]
    assert saved["system"] == "You are terse."
    assert saved["settings"]["temperature"] == 0.5


def test_pty_history_persists_across_sessions(model, tmp_path):
    child = spawn(model, tmp_path, "--max-new-tokens", "3")
    child.sendline("remember this line")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    assert finish(child) == 0
    history = tmp_path / "data" / "gptneo" / "chat_history"
    assert history.read_text(encoding="utf-8").splitlines()[-2:] == ["remember this line", "/exit"]

    child = spawn(model, tmp_path, "--max-new-tokens", "3")
    child.send("\x1b[A\x1b[A")  # Up twice: past "/exit" to the message
    child.expect_exact("remember this line")
    child.send("\r")
    child.expect_exact(">>> ")
    child.sendline("/save s.json")
    child.expect_exact(">>> ")
    child.sendcontrol("d")  # Ctrl-D leaves
    assert finish(child) == 0
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in saved["turns"]] == ["remember this line"]


def test_pty_ctrl_c_stops_the_reply_and_keeps_the_session(model, tmp_path):
    child = spawn(model, tmp_path, "--max-new-tokens", "1800")
    child.sendline("/set ignore_eos true")
    child.expect_exact(">>> ")
    child.sendline("tell me a long story")
    child.expect_exact("tell me a long story")
    child.expect(r"\S")  # the reply is streaming
    child.sendcontrol("c")
    child.expect_exact("(reply stopped)")
    child.expect_exact(">>> ")
    child.sendcontrol("c")  # Ctrl-C at the prompt: just a fresh prompt
    child.expect_exact(">>> ")
    child.sendline("/save s.json")
    child.expect_exact("(saved 1 turn to")
    child.expect_exact(">>> ")  # Ctrl-D before the prompt is up can be lost (seen under load)
    child.sendcontrol("d")
    assert finish(child) == 0
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    (turn,) = saved["turns"]
    assert turn["user"] == "tell me a long story" and turn["assistant"]


def _bracketed_paste() -> bool:
    """GNU readline 8.1+ turns bracketed paste on by default: a pasted block is one line."""
    try:
        import readline
    except ImportError:
        return False
    if "libedit" in (readline.__doc__ or ""):
        return False
    return getattr(readline, "_READLINE_VERSION", 0) >= 0x0801


@pytest.mark.skipif(not _bracketed_paste(), reason="needs GNU readline 8.1+ (bracketed paste)")
def test_pty_pasted_lines_are_one_message(model, tmp_path):
    child = spawn(model, tmp_path, "--max-new-tokens", "3", "--no-history")
    child.send("\x1b[200~first pasted line\nsecond pasted line\x1b[201~\r")
    child.expect_exact(">>> ")
    child.sendline("/save s.json")
    child.expect_exact("(saved 1 turn to")
    child.expect_exact(">>> ")  # Ctrl-D before the prompt is up can be lost (seen under load)
    child.sendcontrol("d")
    assert finish(child) == 0
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in saved["turns"]] == ["first pasted line\nsecond pasted line"]


# --------------------------------------------------------------------------- settings and output


def _settings_rows(stderr: str) -> dict[str, str]:
    """The rows /show lists under "Settings (/set KEY VALUE)"."""
    lines = stderr.split("Settings (/set KEY VALUE)\n", 1)[1].splitlines()
    rows = {}
    for line in lines:
        if not line.startswith("  ") or ": " not in line:
            break
        key, value = line.strip().split(": ", 1)
        rows[key] = value
    return rows


def test_every_setting_show_lists_can_be_set(small_model, tmp_path):
    from gptneo_cli.cli.chat import CHAT_OPTIONS

    done = chat_piped(small_model, tmp_path, ["/show"], "--max-new-tokens", "2")
    rows = _settings_rows(done.stderr.decode())
    assert {"stop", "system", "user_prefix", "temperature", "seed"} <= set(rows)
    samples = {
        "system": "Be brief.",
        "user_prefix": "Q:",
        "assistant_prefix": "A:",
        "stop": "foo",
        "do_sample": "false",
        "ignore_eos": "true",
        "seed": "3",
        "max_new_tokens": "3",
    }
    for key, opt in CHAT_OPTIONS.items():
        samples.setdefault(key, str(opt.default))
    lines = [f"/set {key} {samples[key]}" for key in rows] + ["hello", "/save s.json", "/show"]
    done = chat_piped(small_model, tmp_path, lines, "--max-new-tokens", "2")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "unknown setting" not in err and "Warning" not in err
    for key in rows:
        assert f"({key} = {samples[key]})" in err
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert saved["settings"]["stop"] == ["foo"] and saved["user_prefix"] == "Q:"
    assert _settings_rows(err.rsplit("Chat\n", 1)[1])["stop"] == "'foo'"


def test_piped_replies_are_separated_by_a_blank_line_and_jsonl_has_one_object_per_turn(
    model, tmp_path
):
    lines = ["first", "/set temperature 0.7", "second", "third"]
    args = ("--max-new-tokens", "6", "--stop", "\n")  # no reply holds a newline
    records = [
        json.loads(line)
        for line in chat_piped(
            model, tmp_path, lines, *args, "--format", "jsonl"
        ).stdout.splitlines()
    ]
    assert [r["user"] for r in records] == ["first", "second", "third"]
    assert all(
        set(r) == {"user", "reply", "tokens", "prompt_tokens", "finish_reason"} for r in records
    )
    assert all(
        r["finish_reason"] in ("length", "stop", "eos") and r["tokens"] >= 1 for r in records
    )
    text = chat_piped(model, tmp_path, lines, *args).stdout.decode()
    expected = "\n\n".join(r["reply"] for r in records) + "\n"
    assert "\n".join(line.rstrip() for line in text.split("\n")) == expected


def test_context_note_mentions_the_system_text_only_when_there_is_one(small_model, tmp_path):
    lines = ["/set ignore_eos true"] + [f"message number {i} is here" for i in range(6)]
    without = chat_piped(small_model, tmp_path, lines, "--max-new-tokens", "8").stderr.decode()
    assert "dropped out" in without and "system text" not in without
    with_system = chat_piped(
        small_model, tmp_path, lines, "--max-new-tokens", "8", "--system", "SYS"
    ).stderr.decode()
    assert "kept with the system text)" in with_system


def test_pty_history_keeps_a_multiline_message_as_one_entry(model, tmp_path):
    child = spawn(model, tmp_path, "--max-new-tokens", "3")
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("line one")
    child.expect_exact("... ")
    child.sendline('line two"""')
    child.expect_exact(">>> ")
    child.sendcontrol("d")
    assert finish(child) == 0
    history = tmp_path / "data" / "gptneo" / "chat_history"
    entries = history.read_text(encoding="utf-8").splitlines()
    assert entries[-1] == json.dumps('"""\nline one\nline two"""')

    child = spawn(model, tmp_path, "--max-new-tokens", "3")
    child.send("\x1b[A")  # Up: the whole block comes back as one entry
    child.expect_exact("line two")
    child.send("\r")
    child.expect_exact(">>> ")
    child.sendline("/save s.json")
    child.expect_exact("(saved 1 turn to")
    child.expect_exact(">>> ")  # Ctrl-D before the prompt is up can be lost (seen under load)
    child.sendcontrol("d")
    assert finish(child) == 0
    saved = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in saved["turns"]] == ["line one\nline two"]
