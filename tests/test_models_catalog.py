"""Seeing models: `models list` on an empty cache shows what can be used anyway (the bundled
demo model, the aliases with the sizes of their published configs), and shell completion
offers bundled models, aliases and cached repo ids for a model, without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers_cli import cli_env, run_cli
from test_cli_basics import HEAVY, imported_modules

import gptneo_cli
from gptneo_cli.catalog import alias_offers, bundled_models, model_completions
from gptneo_cli.config import GPTNeoConfig

TINY = Path(gptneo_cli.__file__).resolve().parent / "data" / "tiny"


def test_sizes_come_from_the_published_configs() -> None:
    offers = {o.name: o for o in alias_offers()}
    # The parameter counts EleutherAI publishes for the three checkpoints.
    assert offers["125m"].parameters == 125_198_592
    assert offers["1.3b"].parameters == 1_315_575_808
    assert offers["2.7b"].parameters == 2_651_307_520
    assert offers["1.3b"].size == 4 * 1_315_575_808  # float32 weights on the Hub
    (tiny,) = bundled_models()
    config = GPTNeoConfig.from_json_file(TINY / "config.json")
    assert tiny.name == "tiny" and tiny.parameters == config.num_parameters()
    assert tiny.size == sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())


def test_models_list_on_an_empty_cache_shows_what_is_available(tmp_path: Path) -> None:
    done = run_cli("models", "list", home=tmp_path)
    assert done.returncode == 0 and done.stdout == b""  # stdout lists the cache: empty
    err = done.stderr.decode()
    lines = [line.split() for line in err.splitlines()]
    assert "No GPT-Neo models" in err and "\x1b" not in err
    assert lines[1] == ["NAME", "MODEL", "SIZE", "PARAMS", "USE"]
    rows = {line[0]: " ".join(line) for line in lines[2:]}
    assert set(rows) == {"tiny", "125m", "1.3b", "2.7b"}
    assert "bundled, no download" in rows["tiny"] and "--model tiny" in rows["tiny"]
    assert (
        "125m EleutherAI/gpt-neo-125M 500.8 MB download 125.2M gptneo models pull 125m"
        == rows["125m"]
    )
    assert "10.6 GB download 2.7B gptneo models pull 2.7b" in rows["2.7b"]

    report = json.loads(run_cli("models", "list", "--format", "json", home=tmp_path).stdout)
    assert report["models"] == []
    assert [b["name"] for b in report["bundled"]] == ["tiny"]
    assert {a["name"]: a["parameters"] for a in report["aliases"]} == {
        "125m": 125_198_592,
        "1.3b": 1_315_575_808,
        "2.7b": 2_651_307_520,
    }


def test_completion_offers_bundled_aliases_and_cached_ids(tmp_path: Path) -> None:
    cache = tmp_path / "hf" / "hub"
    for repo in (
        "models--EleutherAI--gpt-neo-125M",
        "models--someone--neo-poems",
        "datasets--someone--poems",
    ):
        (cache / repo).mkdir(parents=True)
    env = cli_env(
        tmp_path,
        _GPTNEO_COMPLETE="complete_bash",
        COMP_WORDS="gptneo generate --model ",
        COMP_CWORD="3",
    )
    names, done = imported_modules([], env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [
        "tiny",
        "125m",
        "1.3b",
        "2.7b",
        "EleutherAI/gpt-neo-125M",
        "someone/neo-poems",
    ]
    assert not {n for n in names if n.split(".")[0] in HEAVY}
    for words, cword, expected in (
        ("gptneo finetune s", "2", ["someone/neo-poems"]),
        ("gptneo models info 2", "3", ["2.7b"]),
        ("gptneo train-qa t", "2", ["tiny"]),
        ("gptneo chat -m 1", "3", ["125m", "1.3b"]),
    ):
        env.update(COMP_WORDS=words, COMP_CWORD=cword)
        _, done = imported_modules([], env)
        assert done.stdout.split() == expected, (words, done.stdout, done.stderr[-500:])


def test_completion_help_texts() -> None:
    found = dict(model_completions("T"))  # case-insensitive
    assert found == {"tiny": "bundled demo model"}
    assert dict(model_completions("2"))["2.7b"] == "EleutherAI/gpt-neo-2.7B"
