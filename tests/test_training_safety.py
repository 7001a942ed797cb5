# ruff: noqa: F811 - the fixtures imported from test_training are parameters here
"""Training commands never lose or clobber a model folder, and say the right things.

What is proved here: a save that fails midway (a fault between files, a full disk, the
process SIGKILLed) leaves the old folder byte-identical and loadable, with no temporary
files inside it (and the next save clears a killed one's staging folder); finetune and
train-classifier refuse a non-empty non-model --output without --force and replace a model
only after a "yes" (on a terminal) or --yes; a resumed run's ETA comes from the speed after
resuming; counts agree with their nouns.
"""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_cli import cli_env, gptneo_command, run_cli
from test_training import base_model, labelled, small_config, text_data  # noqa: F401

from gptneo_cli.modeling import GPTNeoForCausalLM
from gptneo_cli.training import (
    CHECKPOINT_DIR,
    TRAINER_STATE,
    Reporter,
    export_model,
    finetune,
    saving,
)


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name -> sha256), to prove nothing changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def finetune_args(base: Path, data: Path, out: Path) -> list[str]:
    """A one-step finetune of `base` on `data` into `out` (the overwrite tests' command)."""
    return [
        "finetune",
        str(base),
        str(data),
        "--output",
        str(out),
        "--block-size",
        "16",
        "--max-steps",
        "1",
        "--val-fraction",
        "0",
    ]


def leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.parent.iterdir()
        if p.name.startswith(f".{folder.name}.") or ".partial" in p.name or p.name.endswith(".tmp")
    )


@pytest.fixture()
def old_model(base_model: Path, tmp_path: Path) -> Path:
    """A saved model folder with a checkpoint and a user's note beside the model files."""
    out = tmp_path / "model"
    model = GPTNeoForCausalLM.from_pretrained(base_model)
    export_model(model, out, None, base_model)
    (out / "NOTES.md").write_text("mine\n", encoding="utf-8")
    return out


def changed_model(base_model: Path) -> GPTNeoForCausalLM:
    model = GPTNeoForCausalLM.from_pretrained(base_model)
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(1.0)
    return model


# ---------------------------------------------------------------------------- atomic saves


def test_fault_between_files_leaves_the_old_folder(
    old_model: Path,
    base_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = digest(old_model)

    def broken_copy(src: object, dst: object) -> None:  # config and weights are written by now
        raise OSError(errno.EIO, "Input/output error", str(dst))

    monkeypatch.setattr(saving, "copy_tokenizer_files", broken_copy)
    with pytest.raises(OSError, match="Input/output"):
        export_model(changed_model(base_model), old_model, None, base_model)
    assert digest(old_model) == before
    assert leftovers(old_model) == []
    GPTNeoForCausalLM.from_pretrained(old_model)


def test_full_disk_leaves_the_old_folder(
    old_model: Path,
    base_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import safetensors

    before = digest(old_model)
    real = safetensors.serialize_file

    def out_of_space(specs: object, path: str, **kwargs: object) -> None:
        real(specs, path, **kwargs)  # a partial file really exists when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(safetensors, "serialize_file", out_of_space)
    with pytest.raises(OSError) as failed:
        export_model(changed_model(base_model), old_model, None, base_model)
    assert failed.value.errno == errno.ENOSPC
    assert digest(old_model) == before
    assert leftovers(old_model) == []


def test_sigkill_midway_leaves_the_old_folder(
    old_model: Path,
    base_model: Path,
    tmp_path: Path,
) -> None:
    before = digest(old_model)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from gptneo_cli.modeling import GPTNeoForCausalLM
        from gptneo_cli.training import export_model, saving

        def killed(src, dst):  # after config.json and the weights, before the tokenizer
            os.kill(os.getpid(), signal.SIGKILL)

        saving.copy_tokenizer_files = killed
        model = GPTNeoForCausalLM.from_pretrained({str(base_model)!r})
        with torch.no_grad():
            model.transformer.ln_f.bias.add_(1.0)
        export_model(model, saving.Path({str(old_model)!r}), None,
                     saving.Path({str(base_model)!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()
    assert digest(old_model) == before  # nothing inside the folder changed
    stale = leftovers(old_model)
    assert len(stale) == 1 and ".saving-" in stale[0]  # the dead save's staging, beside it
    GPTNeoForCausalLM.from_pretrained(old_model)
    # The next save to the folder clears it, and replaces the model files only.
    export_model(changed_model(base_model), old_model, None, base_model)
    assert leftovers(old_model) == []
    after = digest(old_model)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert after["NOTES.md"] == before["NOTES.md"]
    assert after["tokenizer.json"] == before["tokenizer.json"]


def test_save_keeps_other_files_and_drops_stale_weights(
    old_model: Path,
    base_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (old_model / "pytorch_model.bin").write_bytes(b"old weights")
    (old_model / CHECKPOINT_DIR).mkdir()
    (old_model / CHECKPOINT_DIR / TRAINER_STATE).write_text("{}", encoding="utf-8")
    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)  # the two-rename fallback
    export_model(changed_model(base_model), old_model, None, base_model)
    names = {p.name for p in old_model.iterdir()}
    assert "pytorch_model.bin" not in names  # would otherwise shadow or confuse the new model
    assert {"NOTES.md", CHECKPOINT_DIR, "config.json", "model.safetensors"} <= names
    assert leftovers(old_model) == []
    loaded = GPTNeoForCausalLM.from_pretrained(old_model)
    assert float(loaded.transformer.ln_f.bias.detach().mean()) == pytest.approx(1.0, abs=1e-6)


def test_a_kill_between_the_fallback_renames_loses_nothing(
    old_model: Path,
    base_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = digest(old_model)
    # What a save killed between the fallback's two renames leaves: no folder, the old one
    # under an -old- name of a process that is gone.
    old_model.rename(old_model.with_name(f".{old_model.name}.saving-999999999-old-abcd"))
    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    monkeypatch.setattr(saving, "_alive", lambda pid: False)
    export_model(changed_model(base_model), old_model, None, base_model)
    after = digest(old_model)
    assert after["NOTES.md"] == before["NOTES.md"]  # the old folder came back, then was saved
    assert after["model.safetensors"] != before["model.safetensors"]
    assert leftovers(old_model) == []


def test_a_symlinked_output_stays_a_link(
    old_model: Path,
    base_model: Path,
    tmp_path: Path,
) -> None:
    link = tmp_path / "link"
    link.symlink_to(old_model, target_is_directory=True)
    export_model(changed_model(base_model), link, None, base_model)
    assert link.is_symlink() and (old_model / "NOTES.md").is_file()
    assert leftovers(old_model) == [] and leftovers(link) == []


# ---------------------------------------------------------------------------- overwriting


def test_cli_refuses_a_folder_of_other_files(
    base_model: Path,
    text_data: Path,
    tmp_path: Path,
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# docs\n", encoding="utf-8")
    args = finetune_args(base_model, text_data, docs)
    proc = run_cli(*args, home=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "--force" in err and "not empty" in err
    assert sorted(p.name for p in docs.iterdir()) == ["index.md"]

    proc = run_cli(*args, "--force", home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert {"index.md", "config.json", "model.safetensors"} <= {p.name for p in docs.iterdir()}


def test_cli_replaces_a_model_only_with_yes(
    base_model: Path,
    text_data: Path,
    labelled: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    args = finetune_args(base_model, text_data, out)
    assert run_cli(*args, home=tmp_path).returncode == 0
    before = digest(out)
    proc = run_cli(*args, home=tmp_path)  # piped, no --yes: refused before any work
    assert proc.returncode == 2
    assert "already holds a model" in proc.stderr.decode() and "--yes" in proc.stderr.decode()
    assert digest(out) == before
    proc = run_cli(
        "train-classifier",
        str(base_model),
        str(labelled),
        "--output",
        str(out),
        "--epochs",
        "1",
        home=tmp_path,
    )
    assert proc.returncode == 2 and "--yes" in proc.stderr.decode()
    assert digest(out) == before
    proc = run_cli(*args, "--seed", "7", "--yes", home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert digest(out)["model.safetensors"] != before["model.safetensors"]


def test_cli_asks_on_a_terminal(base_model: Path, text_data: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    out = tmp_path / "out"
    args = finetune_args(base_model, text_data, out)
    assert run_cli(*args, home=tmp_path).returncode == 0
    before = digest(out)
    cmd = gptneo_command()

    def spawn() -> object:
        return pexpect.spawn(
            cmd[0],
            [*cmd[1:], *args],
            env=cli_env(tmp_path, NO_COLOR="1"),
            cwd=str(tmp_path),
            timeout=120,
            encoding="utf-8",
        )

    child = spawn()
    child.expect(r"already holds a model\. Replace it\? \[y/N\]")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "Nothing written" in child.before
    assert digest(out) == before

    child = spawn()
    child.expect(r"Replace it\? \[y/N\]")
    child.sendline("y")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Fine-tuning finished" in child.before


# ---------------------------------------------------------------------------- progress


class Steps(Reporter):
    def __init__(self) -> None:
        self.steps: list = []

    def step(self, stats: object) -> None:
        self.steps.append(stats)


def test_resumed_eta_uses_the_rate_after_resuming(
    base_model: Path,
    text_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gptneo_cli.training import TrainingInterrupted, report

    out = tmp_path / "out"
    config = small_config(max_steps=8, eval_every=100, log_every=1, val_fraction=0)
    with pytest.raises(TrainingInterrupted):
        finetune(base_model, [text_data], out, config, should_stop=lambda: True)
    state_file = out / CHECKPOINT_DIR / TRAINER_STATE
    saved = json.loads(state_file.read_text())
    assert saved["state"]["step"] == 1
    saved["state"]["train_time_s"] = 6000.0  # the first step took 100 minutes, elsewhere
    state_file.write_text(json.dumps(saved))

    ticks = iter(range(0, 10_000, 2))  # every step now takes exactly 2 s by this clock
    monkeypatch.setattr(report.RateClock, "now", staticmethod(lambda: float(next(ticks))))
    reporter = Steps()
    finetune(
        base_model, [text_data], out, config, resume_from=out / CHECKPOINT_DIR, reporter=reporter
    )
    first = reporter.steps[0]
    assert first.step == 2
    assert first.eta_s == pytest.approx(2.0 * 6)  # 6 steps left at 2 s, not at 6000 s
    assert first.elapsed_s == pytest.approx(6002.0)  # elapsed still counts the whole run


def test_counts_agree_with_their_nouns() -> None:
    from gptneo_cli.cli.progress import _describe, plural

    assert plural(1, "document") == "1 document" and plural(0, "document") == "0 documents"
    text = _describe(
        1,
        {
            "train_tokens": 1,
            "train_blocks": 1,
            "train_documents": 1,
            "val_tokens": 0,
            "val_documents": 0,
            "device": "cpu",
            "autocast": "float32",
        },
    )
    assert text == (
        "1 training token in 1 block (1 document), 0 held-out tokens "
        "(0 documents); 1 step on cpu, float32"
    )
    text = _describe(
        3,
        {
            "train_examples": 1,
            "val_examples": 0,
            "labels": ["a", "b"],
            "train": "head",
            "device": "cpu",
        },
    )
    assert (
        text == "1 training example and 0 validation examples, labels a, b; 3 steps (head) on cpu"
    )


def test_cli_one_document_is_singular(base_model: Path, tmp_path: Path) -> None:
    doc = tmp_path / "one.txt"
    doc.write_text("def add(a, b):\n    return a + b\n" * 30, encoding="utf-8")
    proc = run_cli(
        "finetune",
        str(base_model),
        str(doc),
        "--output",
        str(tmp_path / "o"),
        "--block-size",
        "16",
        "--max-steps",
        "1",
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    first = proc.stderr.decode().splitlines()[0]
    assert "(1 document)" in first and "(0 documents)" in first, first
    assert " 1 step on " in first
