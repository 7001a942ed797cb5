#!/usr/bin/env bash
# Issue 15's GPU run, for the device tool: the tree (with the GPT-2 vocabulary carried in
# ./assets, never committed) is in the current folder; the report goes to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 scripts/gpu_check.py --out "${OUT:-gpu-out}" --assets assets "$@" 2>&1 | tee "${OUT:-gpu-out}/log.txt"
