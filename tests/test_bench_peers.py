"""bench.py's wiring of the peers (ONNX Runtime, OpenVINO): selection, the peer process
protocol, the fp32 token check and the rows. A stub script stands in for run_peer.py, so
nothing here needs the peer packages, a checkpoint or the network."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench  # noqa: E402
from peers import client  # noqa: E402

STUB = textwrap.dedent(
    """
    import json, sys
    command, engine = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
    if command == "available":
        print(json.dumps({"onnxruntime": True, "openvino": False}))
    elif engine == "onnxruntime-int8":
        print("RuntimeError: the export failed", file=sys.stderr)
        sys.exit(1)
    elif command == "serve":
        ready = {"ready": True, "tokens": [5, 6, 7], "versions": {"onnxruntime": "9.9"},
                 "settings": {"intra_op_num_threads": sys.argv[sys.argv.index("--threads") + 1]}}
        print(json.dumps(ready), flush=True)
        for n, line in enumerate(sys.stdin):
            print(json.dumps({"samples": {"decode_tok_s": 10.0 + n, "ttft_32_ms": 4.0}}),
                  flush=True)
    elif command == "load":
        print("chatter")
        print(json.dumps({"load_s": 1.5, "gen_peak_mib": 100.0, "peak_exact": True}))
    """
)


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """run_peer.py replaced by the stub; returns the 'peers python' (this interpreter)."""
    script = tmp_path / "stub_peer.py"
    script.write_text(STUB)
    monkeypatch.setattr(client, "RUN_PEER", script)
    monkeypatch.setattr(client, "ERRORS", [])
    monkeypatch.setattr(client, "FAILED", set())
    return sys.executable


def workload() -> SimpleNamespace:
    return SimpleNamespace(threads=3, new_tokens=8, batch_tokens=4, batch=2, long_prompt=16)


def test_no_venv_means_no_peers_and_says_so() -> None:
    said: list[str] = []
    assert client.select("auto", None, "cpu", said.append) == []
    assert "running without ONNX Runtime and OpenVINO" in said[0]
    assert client.select("none", sys.executable, "cpu", said.append) == []
    assert client.select("auto", sys.executable, "cuda", said.append) == []


def test_an_explicit_request_without_the_venv_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no peers python"):
        client.select("openvino", str(tmp_path / "nope"), "cpu", print)


def test_auto_takes_the_installed_runtimes_and_names_are_checked(stub: str) -> None:
    said: list[str] = []
    assert client.select("auto", stub, "cpu", said.append) == [
        "onnxruntime-fp32",
        "onnxruntime-int8",
    ]
    assert client.select("onnxruntime-fp32,onnxruntime", stub, "cpu", print) == [
        "onnxruntime-fp32",
        "onnxruntime-int8",
    ]
    with pytest.raises(ValueError, match="not installed"):
        client.select("openvino", stub, "cpu", print)
    with pytest.raises(ValueError, match="unknown peer 'tensorrt'"):
        client.select("tensorrt", stub, "cpu", print)


def test_a_peer_process_answers_ready_then_one_repeat_per_request(
    stub: str, tmp_path: Path
) -> None:
    folder = tmp_path / "gpt-neo-125m-random"
    peer = client.start(stub, "onnxruntime-fp32", folder, workload(), print)
    assert peer is not None
    try:
        assert peer.tokens == [5, 6, 7]
        assert peer.info["settings"] == {"intra_op_num_threads": "3"}
        assert peer.repeat() == {"decode_tok_s": 10.0, "ttft_32_ms": 4.0}
        assert peer.repeat()["decode_tok_s"] == 11.0
    finally:
        peer.close()
    assert peer.proc.returncode == 0
    result = client.load(stub, "onnxruntime-fp32", folder, workload(), print)
    assert result == {"load_s": 1.5, "gen_peak_mib": 100.0, "peak_exact": True}


def test_a_failing_peer_is_left_out_with_its_reason(stub: str, tmp_path: Path) -> None:
    folder = tmp_path / "gpt-neo-125m-random"
    said: list[str] = []
    assert client.start(stub, "onnxruntime-int8", folder, workload(), said.append) is None
    assert client.FAILED == {"onnxruntime-int8"}
    assert "the export failed" in client.ERRORS[0]
    assert "its row is left out" in said[0]
    assert client.load(stub, "onnxruntime-int8", folder, workload(), print) is None


def test_token_check_names_the_first_differing_token() -> None:
    speed = {
        "transformers (float32)": bench.Samples(tokens=[1, 2, 3, 4]),
        "gptneo (float32)": bench.Samples(tokens=[1, 2, 3, 4]),
        "openvino (float32)": bench.Samples(tokens=[1, 2, 9, 4]),
        "gptneo (bfloat16)": bench.Samples(),
    }
    check = bench.token_check(speed)
    assert check["reference"] == "transformers (float32)"
    assert check["identical"] == ["transformers (float32)", "gptneo (float32)"]
    assert check["mismatch"] == {"openvino (float32)": 2}
    lines = bench.token_lines({"fp32_tokens": {"125m": check}})
    assert "MISMATCH: openvino (float32) differs from token 2" in lines[-1]


def test_peer_rows_join_their_dtype_group_with_their_baseline() -> None:
    args = bench.parse_args(["--peers", "none", "--variants", ""])
    assert args.peers == "none"
    args.peer_engines = list(client.ROWS)
    groups = dict(bench.plan(args))
    fp32 = [(e.name, e.peer, e.quantize) for e in groups["float32"] if e.kind == bench.PEER]
    assert fp32 == [
        ("onnxruntime", "onnxruntime-fp32", None),
        ("onnxruntime-int8-dynamic", "onnxruntime-int8", "int8-dynamic"),
        ("openvino", "openvino-fp32", None),
        ("openvino-int8-weights", "openvino-int8", "int8"),
    ]
    bf16 = [e.peer for e in groups["bfloat16"] if e.kind == bench.PEER]
    assert bf16 == ["openvino-bf16"]


def test_summarize_compares_peers_and_leaves_out_a_failed_one() -> None:
    args = bench.parse_args(["--peers", "none", "--variants", "", "--dtypes", "float32"])
    args.peer_engines = ["openvino-fp32", "openvino-int8"]
    groups = bench.plan(args)
    speed = {e.label: bench.Samples() for _, es in groups for e in es}
    speed["transformers (float32, eager)"].values = {"decode_tok_s": [20.0]}
    speed["openvino (float32)"].values = {
        "decode_tok_s": [30.0],
        "batch8_tok_s": [60.0],
        "batch8_decode_tok_s": [90.0],
    }
    rows = bench.summarize("125m", "cpu", groups, speed, {}, args)
    by_engine = {r["engine"]: r for r in rows}
    assert "openvino-int8-weights" not in by_engine  # no samples: it failed to start
    assert by_engine["openvino"]["decode_tok_s_x"] == pytest.approx(1.5)
    assert by_engine["openvino"]["peer"] == "openvino-fp32"
    assert by_engine["openvino"]["batch8_over_own_b1"] == pytest.approx(2.0)


def test_bench_rejects_an_unknown_peer_with_one_line(
    stub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--peers", "tensorrt", "--peers-python", stub]) == 2
    assert "unknown peer 'tensorrt'" in capsys.readouterr().err
