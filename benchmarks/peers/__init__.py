"""The peers of benchmarks/bench.py: ONNX Runtime and OpenVINO (see README.md here)."""
