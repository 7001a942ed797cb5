"""`gptneo batch --ray`: the same job on a local Ray instance started inside the test.

Few and bounded: Ray takes tens of seconds to start on a small machine. One test runs the
command as a second driver joining the test's Ray (`--ray-address auto`, two actors of one
thread), resumes a half-done output, and compares every greedy and seeded result with the
local run of the same requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_cli import run_cli

ray = pytest.importorskip("ray")


def _requests(n: int) -> list[str]:
    lines = []
    for i in range(n):
        body = {"prompt": f"Once upon a time {i}", "max_tokens": 6, "temperature": 0}
        if i % 4 == 3:
            body.update(temperature=0.9, seed=100 + i)
        lines.append(
            json.dumps(
                {"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions", "body": body}
            )
        )
    lines.append(
        json.dumps(
            {
                "custom_id": "chat",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "temperature": 0,
                },
            }
        )
    )
    return lines


def _texts(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in out, f"{record['custom_id']} twice"
        choice = record["response"]["body"]["choices"][0]
        out[record["custom_id"]] = choice.get("text", (choice.get("message") or {}).get("content"))
    return out


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_job_resumes_and_equals_the_local_run(local_ray, tmp_path: Path) -> None:
    lines = _requests(16)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    common = ("-m", "tiny", "--dtype", "float32", "--max-running", "4")
    local = run_cli("batch", str(src), "-o", str(local_out), *common, home=tmp_path)
    assert local.returncode == 0, local.stderr
    expected = _texts(local_out)
    # half the job was done by an earlier run: those lines are kept and not redone
    done = local_out.read_text().splitlines()[:7]
    ray_out.write_text("\n".join(done) + "\n")
    result = run_cli(
        "batch",
        str(src),
        "-o",
        str(ray_out),
        *common,
        "--ray",
        "--ray-address",
        "auto",
        "--actors",
        "2",
        "--cpus-per-actor",
        "1",
        home=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    stderr = result.stderr.decode().strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("batch: 10 done (0 failed), 7 already")
    assert ray_out.read_text().splitlines()[:7] == done
    assert _texts(ray_out) == expected
