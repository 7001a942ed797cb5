"""CPU threads: --threads, GPTNEO_THREADS and the settings file, checked before torch loads,
applied by the loader, shown by `info` and --stats; and the default rule that leaves cores
busy with other processes alone (tested on fake /proc/stat samples, never by timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers_cli import cli_env, run_cli

from gptneo_cli import threads
from gptneo_cli.cli.loading import ModelOptions
from gptneo_cli.settings import load_settings

# ---- the default rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cores, cpus, busy, expected",
    [
        (2, 2, 0.0, 2),  # quiet: torch's own default
        (2, 2, 0.2, 2),  # a little noise keeps every core
        (2, 2, 1.0, 1),  # one CPU-bound process on 2 cores: 1 thread, not 2
        (2, 2, 0.6, 1),  # a core less than ~70 % idle is not free
        (2, 2, 2.0, 1),  # everything busy: still at least 1
        (1, 1, 5.0, 1),
        (16, 16, 4.0, 12),
        (4, 8, 4.0, 2),  # 4 physical cores, 8 hyperthreads, half of them busy
        (8, 8, 0.0, 8),
    ],
)
def test_default_rule_uses_the_free_cores(cores, cpus, busy, expected):
    assert threads.choose_threads(cores, cpus, busy) == expected


def _stat(*cpus: tuple[int, int]) -> str:
    """A /proc/stat with per-CPU (busy, idle) ticks split over its usual columns."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    for i, (busy, idle) in enumerate(cpus):
        user, system, irq = busy // 2, busy - busy // 2 - 1, 1
        iowait = 2
        lines.append(f"cpu{i} {user} 0 {system} {idle - iowait} {iowait} {irq} 0 0 0 0")
    lines += ["intr 12345 0 0", "ctxt 999", "btime 1700000000"]
    return "\n".join(lines) + "\n"


def test_proc_stat_is_read_per_cpu():
    stat = threads.parse_proc_stat(_stat((100, 900), (500, 500)))
    assert stat == {0: (100, 1000), 1: (500, 1000)}


def test_busy_cpus_counts_other_processes_only():
    before = threads.parse_proc_stat(_stat((0, 0), (0, 0)))
    # cpu1 fully busy for the interval, cpu0 idle
    after = threads.parse_proc_stat(_stat((0, 100), (100, 0)))
    assert threads.busy_cpus(before, after, own_cpu_s=0.0, wall_s=1.0) == pytest.approx(1.0)
    # this process used half a CPU meanwhile (importing torch): the others used the rest
    assert threads.busy_cpus(before, after, own_cpu_s=0.5, wall_s=1.0) == pytest.approx(0.5)
    # CPUs outside the affinity mask do not count
    assert threads.busy_cpus(before, after, 0.0, 1.0, cpus={0}) == pytest.approx(0.0)
    # never below zero
    assert threads.busy_cpus(before, after, own_cpu_s=3.0, wall_s=1.0) == 0.0


def test_a_sample_next_to_a_busy_process_chooses_one_thread(monkeypatch):
    samples = iter([_stat((0, 0), (0, 0)), _stat((10, 90), (100, 0))])
    wall, cpu = iter([0.0, 0.1]), iter([5.0, 5.0])  # this process idle meanwhile
    sample = threads.CpuSample(
        read=lambda: next(samples), seconds=0.0, clocks=(lambda: next(wall), lambda: next(cpu))
    )
    monkeypatch.setattr(threads, "_affinity", lambda: {0, 1})
    monkeypatch.setattr(threads, "torch_cores", lambda: 2)
    monkeypatch.setattr(threads, "cpu_count", lambda: 2)
    choice = threads.decide(None, sample=sample.start())
    assert choice.count == 1
    assert "others busy on 1.1 of 2 CPUs" in choice.reason


def test_a_quiet_sample_keeps_every_core(monkeypatch):
    samples = iter([_stat((0, 0), (0, 0)), _stat((50, 50), (53, 47))])
    monkeypatch.setattr(threads, "_affinity", lambda: None)
    monkeypatch.setattr(threads, "torch_cores", lambda: 2)
    monkeypatch.setattr(threads, "cpu_count", lambda: 2)
    wall, cpu = iter([0.0, 0.1]), iter([5.0, 5.1])  # this process used one CPU (torch import)
    sample = threads.CpuSample(
        read=lambda: next(samples), seconds=0.0, clocks=(lambda: next(wall), lambda: next(cpu))
    )
    assert threads.decide(None, sample=sample).count == 2


def test_without_proc_stat_the_default_is_every_core(monkeypatch):
    def missing() -> str:
        raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr(threads, "torch_cores", lambda: 3)
    choice = threads.decide(None, sample=threads.CpuSample(read=missing, seconds=0.0))
    assert choice.count == 3 and "unknown" in choice.reason


def test_a_cgroup_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpus(tmp_path) is None
    assert threads._cgroup_cpus(tmp_path / "absent") is None


# ---- values and where they come from -------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), ("auto", None), (" AUTO ", None), ("3", 3), (1, 1), (2, 2)],
)
def test_good_values(value, expected):
    assert threads.check_threads(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "threads must be at least 1 (or auto), got 0"),
        (-2, "threads must be at least 1 (or auto), got -2"),
        ("x", "threads must be a whole number or auto, got 'x'"),
        ("1.5", "threads must be a whole number or auto, got '1.5'"),
        (1.5, "threads must be a whole number or auto, got 1.5"),
        (True, "threads must be a whole number or auto, got True"),
        (10**6, "threads must be at most"),
    ],
)
def test_bad_values(value, message):
    with pytest.raises(threads.ThreadsError) as caught:
        threads.check_threads(value)
    assert message in str(caught.value)


def _settings(tmp_path, file_text: str | None = None, **env: str):
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), **env}
    if file_text is not None:
        path = tmp_path / "config.toml"
        path.write_text(file_text)
        environ["GPTNEO_CONFIG"] = str(path)
    return load_settings(environ)


def _merged(settings, flag=None) -> ModelOptions:
    return ModelOptions.merge(
        settings, model="tiny", revision=None, device=None, dtype=None, attn=None, threads=flag
    )


def test_precedence_flag_env_file_default(tmp_path):
    assert _merged(_settings(tmp_path)).threads is None  # default: the rule
    file = _settings(tmp_path, "threads = 2\n")
    assert (_merged(file).threads, _merged(file).threads_source) == (2, f"file {file.path}")
    both = _settings(tmp_path, "threads = 2\n", GPTNEO_THREADS="3")
    assert (_merged(both).threads, _merged(both).threads_source) == (3, "env GPTNEO_THREADS")
    assert (_merged(both, "1").threads, _merged(both, "1").threads_source) == (1, "--threads")
    assert _merged(both, "auto").threads is None  # the flag can ask for the rule back
    assert _merged(_settings(tmp_path, 'threads = "auto"\n')).threads is None


def test_bad_settings_name_their_source(tmp_path):
    with pytest.raises(ValueError, match=r"threads in .*config.toml must be at least 1"):
        _settings(tmp_path, "threads = 0\n")
    with pytest.raises(ValueError, match="threads in .* must be a whole number or auto"):
        _settings(tmp_path, "threads = 2.5\n")
    with pytest.raises(
        ValueError, match="GPTNEO_THREADS must be a whole number or auto, got 'two'"
    ):
        _settings(tmp_path, GPTNEO_THREADS="two")
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        _merged(_settings(tmp_path), "0")


# ---- the CLI -------------------------------------------------------------------------------

TORCH_PROBE = (
    "import sys\nfrom gptneo_cli.cli.app import app\nfrom gptneo_cli.cli.errors import run_app\n"
    "code = run_app(app, sys.argv[1:])\n"
    "sys.stderr.write(f\"torch imported: {'torch' in sys.modules}\\n\")\nsys.exit(code)\n"
)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["generate", "hi", "--threads", "0"], {}, "--threads must be at least 1 (or auto), got 0"),
        (["chat", "--threads", "-1"], {}, "--threads must be at least 1 (or auto), got -1"),
        (["classify", "x", "--threads", "two"], {}, "--threads must be a whole number or auto"),
        (["serve", "--threads", "100000"], {}, "--threads must be at most"),
        (["batch", "in.txt", "-o", "o.jsonl", "--threads", "0"], {}, "--threads must be at"),
        (["generate", "hi"], {"GPTNEO_THREADS": "0"}, "GPTNEO_THREADS must be at least 1"),
        (["finetune", "tiny", "d.txt", "-o", "out", "--threads", "1.5"], {}, "whole number"),
    ],
)
def test_bad_threads_fail_before_torch_with_one_line(tmp_path, args, env, message):
    (tmp_path / "in.txt").write_text("hi\n")
    done = subprocess.run(
        [sys.executable, "-c", TORCH_PROBE, *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path, **env),
        input="hi\n",
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    error, probe = done.stderr.splitlines()
    assert error.startswith("Error: ") and message in error
    assert probe == "torch imported: False"


def test_every_model_command_has_the_one_threads_flag():
    import typer.main

    from gptneo_cli.cli.app import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in (
        "generate",
        "chat",
        "classify",
        "tag",
        "answer",
        "serve",
        "batch",
        "finetune",
        "train-classifier",
        "train-tagger",
        "train-qa",
    ):
        params = [p for p in commands[name].params if "--threads" in p.opts]
        assert len(params) == 1, name
        assert params[0].metavar == "N|auto", name


def test_the_count_is_applied_and_shown_by_stats(tmp_path):
    done = run_cli(
        "generate", "hi", "-m", "tiny", "-n", "3", "--greedy", "--stats", "--threads", "3",
        home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "threads: 3 (--threads)" in done.stderr.decode()
    done = run_cli(
        "generate", "hi", "-m", "tiny", "-n", "3", "--greedy", "--stats",
        home=tmp_path, env={"GPTNEO_THREADS": "1"},
    )  # fmt: skip
    assert "threads: 1 (env GPTNEO_THREADS)" in done.stderr.decode()
    done = run_cli("generate", "hi", "-m", "tiny", "-n", "3", "--stats", home=tmp_path)
    assert "threads: " in done.stderr.decode() and "(auto: " in done.stderr.decode()


def test_the_library_loader_sets_torch_threads(tmp_path):
    code = (
        "import torch, gptneo_cli\n"
        "gptneo_cli.load('tiny', threads=3)\n"
        "print(torch.get_num_threads())\n"
        "torch.set_num_threads(2)\n"
        "gptneo_cli.load('tiny', threads=None)\n"  # None leaves torch's setting alone
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "2"]


def test_info_shows_the_threads(tmp_path):
    done = run_cli("info", "--format", "json", home=tmp_path, env={"GPTNEO_THREADS": "3"})
    report = json.loads(done.stdout)
    assert report["threads"] == {"count": 3, "reason": "env GPTNEO_THREADS"}
    assert report["config"]["settings"]["threads"] == 3
    assert report["config"]["kernel_cache"].endswith("kernels.json")  # gptneo_cli.kernels
    text = run_cli("info", home=tmp_path, env={"GPTNEO_THREADS": "3"}).stdout.decode()
    assert "cpu: 3 threads (env GPTNEO_THREADS)" in text
    auto = json.loads(run_cli("info", "--format", "json", home=tmp_path).stdout)
    assert auto["threads"]["count"] >= 1 and auto["threads"]["reason"].startswith("auto: ")


def test_passive_openmp_waits_is_a_default_the_user_can_override(monkeypatch) -> None:
    """serve and batch run the model on a second thread: OpenMP's idle workers sleep there
    unless the user chose otherwise."""
    import os

    from gptneo_cli.threads import passive_openmp_waits

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    passive_openmp_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    passive_openmp_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
