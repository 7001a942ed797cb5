"""The options schema: every generation option is declared once (gptneo_cli/options.py) and
reaches the CLI flags, the settings file and environment, and GenerationConfig's checks.

Bad values fail before torch is imported, and the CLI names its flags where the library
names its fields.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import typer.main
from helpers_cli import cli_env, run_cli

from gptneo_cli.cli.app import app
from gptneo_cli.options import GENERATION, GenerationConfig, Option, OptionError
from gptneo_cli.settings import keys, load_settings


def _flags(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {name for param in click_command.params for name in param.opts}


def test_every_option_is_a_field_a_flag_and_a_setting():
    fields = [f.name for f in dataclasses.fields(GenerationConfig)]
    assert fields == [opt.name for opt in GENERATION]
    generate, chat, settings = _flags("generate"), _flags("chat"), keys()
    for opt in GENERATION:
        assert opt.cli_flag in generate, opt.name
        assert (opt.cli_flag in chat) == opt.chat, opt.name
        assert (opt.name in settings) == opt.setting, opt.name
        assert GenerationConfig().to_dict()[opt.name] == opt.default


def test_library_and_cli_wording_of_one_error():
    with pytest.raises(OptionError) as caught:
        GenerationConfig(top_p=0)
    assert str(caught.value) == "top_p must be in (0, 1], got 0.0"
    assert caught.value.cli == "--top-p must be more than 0 and at most 1, got 0.0"
    with pytest.raises(OptionError) as caught:
        GenerationConfig(do_sample=False, num_return_sequences=3)
    assert "do_sample" in str(caught.value) and "--greedy" not in str(caught.value)
    assert "drop --greedy" in caught.value.cli and "do_sample" not in caught.value.cli


def test_text_values_parse_by_kind():
    assert GenerationConfig(stop="x").stop == ["x"]
    by_name = {opt.name: opt for opt in GENERATION}
    assert by_name["stop"].parse("foo") == ["foo"] and by_name["stop"].parse("none") == []
    assert by_name["ignore_eos"].parse("on") is True
    assert by_name["seed"].parse("none") is None and by_name["seed"].parse("7") == 7
    with pytest.raises(OptionError, match="top_k must be an integer"):
        by_name["top_k"].parse("many")


# ---- a new option, added in the schema only ---------------------------------------------

PLUGIN = textwrap.dedent(
    """
    import sys
    from gptneo_cli import options
    options.add_option(options.Option("banana_boost", int, 0, "Bananas per token.", low=0,
                                      high=9))
    assert options.GenerationConfig(banana_boost=4).to_dict()["banana_boost"] == 4
    from gptneo_cli.cli.app import app
    from gptneo_cli.cli.errors import run_app
    code = run_app(app, sys.argv[1:])
    sys.stderr.write(f"torch imported: {'torch' in sys.modules}\\n")
    sys.exit(code)
    """
)


def _plugin(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PLUGIN, *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path, **env),
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        timeout=120,
    )


def test_a_new_option_gets_a_flag_a_setting_and_its_checks(tmp_path):
    done = _plugin(tmp_path, "generate", "--help", COLUMNS="250")
    assert done.returncode == 0 and "--banana-boost" in done.stdout
    assert "INTEGER, at least 0 and at most 9" in done.stdout
    assert "--banana-boost" in _plugin(tmp_path, "chat", "--help").stdout

    done = _plugin(tmp_path, "generate", "hi", "--banana-boost", "12")
    assert done.returncode == 2
    assert "Error: --banana-boost must be at least 0 and at most 9, got 12" in done.stderr
    assert "torch imported: False" in done.stderr

    config = tmp_path / "config.toml"
    config.write_text("banana_boost = 3\n")
    done = _plugin(tmp_path, "generate", "--show-config", GPTNEO_CONFIG=str(config))
    assert done.returncode == 0, done.stderr
    assert f"banana_boost: 3 (file {config})" in done.stderr
    done = _plugin(
        tmp_path, "generate", "--show-config", "--banana-boost", "5", GPTNEO_CONFIG=str(config)
    )
    assert "banana_boost: 5 (flag)" in done.stderr

    config.write_text("banana_boost = 30\n")
    done = _plugin(tmp_path, "generate", "hi", GPTNEO_CONFIG=str(config))
    assert done.returncode == 2
    assert f"banana_boost in {config} must be in [0, 9], got 30" in done.stderr
    done = _plugin(tmp_path, "generate", "hi", GPTNEO_BANANA_BOOST="lots")
    assert "GPTNEO_BANANA_BOOST must be an integer, got 'lots'" in done.stderr


# ---- checks before torch, in CLI words -----------------------------------------------------

TORCH_PROBE = (
    "import sys\nfrom gptneo_cli.cli.app import app\nfrom gptneo_cli.cli.errors import run_app\n"
    "code = run_app(app, sys.argv[1:])\n"
    "sys.stderr.write(f\"torch imported: {'torch' in sys.modules}\\n\")\nsys.exit(code)\n"
)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--top-p", "0"], "--top-p must be more than 0 and at most 1, got 0.0"),
        (["generate", "hi", "--num-return-sequences", "3", "--greedy"], "drop --greedy"),
        (["generate", "hi", "--truncate", "right"], "--truncate must be 'left' or 'error'"),
        (["generate", "hi", "--logprobs", "21"], "--logprobs must be at least 0 and at most 20"),
        (["chat", "--temperature", "-1"], "--temperature must be at least 0, got -1.0"),
        (["chat", "--stop", ""], "--stop must be non-empty text"),
        (["generate", "hi", "--device", "tpu"], "unknown device 'tpu'"),
        (["chat", "--dtype", "int3"], "unknown dtype 'int3'"),
    ],
)
def test_bad_values_fail_before_torch_and_name_the_flag(tmp_path, args, message):
    done = subprocess.run(
        [sys.executable, "-c", TORCH_PROBE, *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        input="hi\n",
        timeout=120,
    )
    assert done.returncode == 2
    error, probe = done.stderr.splitlines()
    assert error.startswith("Error: ") and message in error
    assert "_" not in error.split(":", 1)[1].split(",")[0]  # a flag, not a field name
    assert probe == "torch imported: False"


def test_a_prompt_too_long_says_the_truncate_flag(tmp_path):
    done = run_cli(
        "generate",
        "one two three four five six seven eight nine ten",
        "-m",
        "tiny",
        "-n",
        "250",
        home=tmp_path,
    )
    assert done.returncode == 2
    err = done.stderr.decode()
    assert "pass --truncate left" in err and "--max-new-tokens" in err
    assert "truncate='left'" not in err and "max_new_tokens" not in err


# ---- settings ---------------------------------------------------------------------------------


def test_settings_hold_any_settable_option(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('stop = ["###"]\nignore_eos = true\ntruncate = "left"\n')
    settings = load_settings({"GPTNEO_CONFIG": str(config), "GPTNEO_MIN_NEW_TOKENS": "3"})
    assert settings.values["stop"] == ["###"] and settings.values["ignore_eos"] is True
    assert settings.values["min_new_tokens"] == 3
    config.write_text("logprobs = 3\n")  # per call only: not a setting
    with pytest.raises(ValueError, match="unknown key 'logprobs'"):
        load_settings({"GPTNEO_CONFIG": str(config)})


def test_a_missing_gptneo_config_file_is_an_error(tmp_path):
    missing = tmp_path / "typo.toml"
    with pytest.raises(ValueError, match="GPTNEO_CONFIG names .*typo.toml, which does not exist"):
        load_settings({"GPTNEO_CONFIG": str(missing)})
    # the default location may be absent
    assert not load_settings({"XDG_CONFIG_HOME": str(tmp_path)}).file_found
    done = run_cli("generate", "hi", home=tmp_path, env={"GPTNEO_CONFIG": str(missing)})
    assert done.returncode == 2
    assert "GPTNEO_CONFIG names" in done.stderr.decode()


@pytest.mark.parametrize("content", ["top_p = 0\n", "colour = 1\n", "model = \n"])
def test_info_still_runs_and_shows_a_bad_settings_file(tmp_path, content):
    config = tmp_path / "config.toml"
    config.write_text(content)
    done = run_cli("info", home=tmp_path, env={"GPTNEO_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "problem:" in out and str(config) in out
    assert "Warning: the settings cannot be used" in done.stderr.decode()
    done = run_cli(
        "info",
        "--format",
        "json",
        home=tmp_path,
        env={"GPTNEO_CONFIG": str(tmp_path / "nope.toml")},
    )
    assert done.returncode == 0
    assert "does not exist" in done.stdout.decode()


def test_an_option_without_a_flag_has_none():
    assert Option("x_y", int, 0, "X.").cli_flag == "--x-y"
    assert Option("x_y", int, 0, "X.", flag=None).cli_flag is None


def test_parse_reports_a_range_error_as_one():
    top_p = next(opt for opt in GENERATION if opt.name == "top_p")
    with pytest.raises(OptionError, match=r"top_p must be in \(0, 1\], got 2.0"):
        top_p.parse("2")


def test_json_schema_states_what_check_enforces():
    by_name = {opt.name: opt for opt in GENERATION}
    top_p = by_name["top_p"].json_schema()
    assert top_p["type"] == "number" and top_p["exclusiveMinimum"] == 0 and top_p["maximum"] == 1
    assert by_name["seed"].json_schema()["type"] == ["integer", "null"]
    assert by_name["truncate"].json_schema()["enum"] == ["left", "error"]
    assert by_name["stop"].json_schema()["items"] == {"type": "string", "minLength": 1}
    for opt in GENERATION:
        schema = opt.json_schema()
        assert opt.check(schema["default"]) == opt.default  # the default is valid
        if "minimum" in schema:
            opt.check(opt.kind(schema["minimum"]))
            with pytest.raises(OptionError):
                opt.check(opt.kind(schema["minimum"]) - 1)
        if "exclusiveMinimum" in schema:
            with pytest.raises(OptionError):
                opt.check(opt.kind(schema["exclusiveMinimum"]))
