"""Checks made before a model is built: does config.json agree with the weights, and can
the weights fit in memory at all?

Building a model from a config costs time and memory in proportion to its sizes, so a
config.json with absurd sizes (num_layers 10^6) would run for minutes before any tensor
was compared. The safetensors headers give every tensor's name and shape without reading
any data, so the config is checked against them first; and the size the weights will take
is compared with the memory of the device they are loaded to.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .config import GPTNeoConfig
from .errors import GPTNeoError, WeightsError
from .weights import read_safetensors_header

_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")


class OutOfMemoryError(GPTNeoError):
    """The model cannot fit in the memory of the device it is loaded to."""


def checkpoint_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's shape, from the file headers alone; None when a file has no header
    that can be read without loading it (a pre-1.6 .bin file)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            header, _ = read_safetensors_header(path)
            shapes.update((name, tuple(entry["shape"])) for name, entry in header.items())
        elif zipfile.is_zipfile(path):
            from .weights import _load_bin  # mapped, not read: only the pickle is parsed

            shapes.update((name, tuple(t.shape)) for name, t in _load_bin(path).items())
        else:
            return None
    return shapes


def check_config_against_weights(
    config: GPTNeoConfig, shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    """Refuse a config.json the weights contradict (layer count, vocabulary, widths)."""

    def shape_of(name: str) -> tuple[int, ...] | None:
        return shapes.get(f"transformer.{name}", shapes.get(name))

    # More layers in the weights than in the config are listed as unexpected tensors later;
    # fewer is what an absurd num_layers looks like, and would be built first.
    found = len({m.group(1) for name in shapes if (m := _LAYER.match(name))})
    if found and found < config.num_layers:
        raise WeightsError(
            f"config.json does not match the weights in {source}: num_layers is "
            f"{config.num_layers} but the weights hold {found} layers"
        )
    h = config.hidden_size
    expected = {
        "wte.weight": ((config.vocab_size, h), "vocab_size x hidden_size"),
        "wpe.weight": (
            (config.max_position_embeddings, h),
            "max_position_embeddings x hidden_size",
        ),
        "h.0.mlp.c_fc.weight": ((config.inner_size, h), "intermediate_size x hidden_size"),
    }
    for name, (want, what) in expected.items():
        got = shape_of(name)
        if got is not None and got != want:
            raise WeightsError(
                f"config.json does not match the weights in {source}: {what} is "
                f"{list(want)} in config.json but {list(got)} in the weights"
            )


def weight_bytes(config: GPTNeoConfig, dtype: torch.dtype, quantize: str | None = None) -> int:
    """Bytes the parameters take once loaded (activations and the KV cache come on top)."""
    per = 1 if quantize in ("int8", "int8-dynamic") else dtype.itemsize
    return config.num_parameters() * per


def device_memory(device: torch.device) -> int | None:
    """Total memory of `device` in bytes (physical RAM for the CPU); None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.get_device_properties(device).total_memory)
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows, or a platform without the names
        return None


def check_fits(
    config: GPTNeoConfig, dtype: torch.dtype, device: torch.device, quantize: str | None = None
) -> None:
    """Refuse, before anything is allocated, weights larger than the device's memory."""
    needed = weight_bytes(config, dtype, quantize)
    total = device_memory(device)
    if total is not None and needed > total:
        problem = (
            f"out of memory: this model's weights alone need {needed / 1e9:.1f} GB in "
            f"{str(dtype).removeprefix('torch.')} but {device} has {total / 1e9:.1f} GB; use "
            "a smaller model or a smaller {} (bfloat16), or check config.json's sizes"
        )
        raise OutOfMemoryError(problem.format("dtype"), cli=problem.format("--dtype"))


def preflight(
    config: GPTNeoConfig,
    files: list[Path],
    dtype: torch.dtype,
    device: torch.device,
    source: str,
    quantize: str | None = None,
) -> None:
    """Everything that must hold before a model of `config` is built from `files`."""
    shapes = checkpoint_shapes(files)
    if shapes is not None:
        check_config_against_weights(config, shapes, source)
    check_fits(config, dtype, device, quantize)
