"""`gptneo serve --chat-template`: a built-in name or a file sets how /v1/chat/completions
lays out messages, through the same renderer as `gptneo chat` (conversation.Conversation)."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import httpx
import pytest
from helpers_cli import cli_env, gptneo_command, run_cli
from helpers_server import Running, greedy_ids, served_tiny

from gptneo_cli.conversation import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    Conversation,
    Turn,
    load_chat_template,
)

MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def tiny():
    return served_tiny()


def test_named_and_file_templates(tmp_path) -> None:
    assert load_chat_template("default") == ChatTemplate("User:", "Assistant:", "")
    assert load_chat_template(" QA ") == BUILTIN_TEMPLATES["qa"]
    as_json = tmp_path / "t.json"
    as_json.write_text(json.dumps({"user_prefix": "### Q", "assistant_prefix": "### A"}))
    assert load_chat_template(str(as_json)) == ChatTemplate("### Q", "### A", "")
    as_toml = tmp_path / "t.toml"
    as_toml.write_text('user_prefix = "Me:"\nassistant_prefix = "Bot:"\nsystem = "Be kind."\n')
    assert load_chat_template(str(as_toml)) == ChatTemplate("Me:", "Bot:", "Be kind.")
    saved = tmp_path / "saved.json"  # what chat's /save writes is a template too
    conv = Conversation("Sys", "U>", "A>", [Turn("a", "b")])
    saved.write_text(json.dumps(conv.to_dict()))
    assert load_chat_template(str(saved)) == ChatTemplate("U>", "A>", "Sys")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"user_prefix": "Q:", "assistnt_prefix": "A:"}', "unknown chat template keys"),
        ('{"user_prefix": "  ", "assistant_prefix": "A:"}', "must not be empty"),
        ('{"user_prefix": 3}', "user_prefix must be a string"),
        ("[1, 2]", "must hold an object"),
        ("{not json", "not a valid chat template file"),
    ],
)
def test_bad_template_files_say_what_is_wrong(tmp_path, content, message) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_chat_template(str(path))


def test_a_template_changes_the_rendered_prompt(tiny) -> None:
    template = ChatTemplate("Q:", "A:", "Be brief.")
    srv = Running(*tiny, key=None, options={"chat_template": template})
    try:
        out = srv.http.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 10, "temperature": 0, "ignore_eos": True},
        ).json()
        prompt = "Be brief.\n\nQ: Hi\nA: Hello\nQ: Bye\nA:"
        ids = srv.tokenizer.encode(prompt)
        assert out["usage"]["prompt_tokens"] == len(ids)
        want = srv.tokenizer.decode(greedy_ids(srv.model, ids, 10)).split("Q:")[0]
        assert out["choices"][0]["message"]["content"] == want.strip()
        # a system message of the request replaces the template's
        own = [{"role": "system", "content": "Sys"}, *MESSAGES]
        usage = srv.http.post(
            "/v1/chat/completions", json={"messages": own, "max_tokens": 1}
        ).json()["usage"]
        assert usage["prompt_tokens"] == len(srv.tokenizer.encode("Sys\n\n" + prompt[11:]))
    finally:
        srv.stop()


def test_serve_refuses_an_unknown_template_before_loading(tmp_path) -> None:
    done = run_cli("serve", "--model", "tiny", "--chat-template", "nope", home=tmp_path)
    assert done.returncode != 0
    err = done.stderr.decode()
    assert err.startswith("Error: --chat-template: chat template 'nope' is neither a built-in")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_command_uses_the_template_file(tmp_path) -> None:
    path = tmp_path / "template.json"
    path.write_text(json.dumps({"user_prefix": "Q:", "assistant_prefix": "A:"}))
    args = ["serve", "--model", "tiny", "--port", "0", "--chat-template", str(path)]
    proc = subprocess.Popen(
        [*gptneo_command(), *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=cli_env(tmp_path),
        cwd=tmp_path,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, line
        base = match.group(0)
        chat = {"messages": [{"role": "user", "content": "Bye"}], "max_tokens": 1}
        usage = httpx.post(base + "/v1/chat/completions", json=chat, timeout=60).json()["usage"]
        tokens = httpx.post(base + "/tokenize", json={"prompt": "Q: Bye\nA:"}, timeout=60).json()
        assert usage["prompt_tokens"] == tokens["count"]
        default = httpx.post(base + "/tokenize", json={"prompt": "User: Bye\nAssistant:"}).json()
        assert default["count"] != tokens["count"]  # the test can tell the two apart
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_batch_chat_lines_use_the_template(tiny, tmp_path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    body = {"messages": [{"role": "user", "content": "Bye"}], "max_tokens": 1}
    line = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": body}
    src.write_text(json.dumps(line) + "\n", encoding="utf-8")
    args = ("batch", str(src), "-o", str(out), "-m", "tiny", "--chat-template", "qa")
    done = run_cli(*args, home=tmp_path)
    assert done.returncode == 0, done.stderr
    usage = json.loads(out.read_text())["response"]["body"]["usage"]
    assert usage["prompt_tokens"] == len(tiny[1].encode("Q: Bye\nA:"))
    assert usage["prompt_tokens"] != len(tiny[1].encode("User: Bye\nAssistant:"))
