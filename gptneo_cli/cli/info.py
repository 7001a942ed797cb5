"""`gptneo info`: versions, devices, attention backends, and the settings in force."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Annotated, Any

import typer

from .. import __version__
from ..settings import (
    Settings,
    config_path,
    default_history_file,
    keys,
    load_settings,
    user_cache_dir,
)
from .help import examples
from .options import DebugOpt
from .output import Diagnostics, check_format, write_json, write_table

PACKAGES = ("torch", "safetensors", "tokenizers", "huggingface-hub", "typer", "rich", "flash-attn")


def register(app: typer.Typer) -> None:
    app.command(
        "info",
        epilog=examples(
            (
                "Versions, devices and the settings in force",
                "gptneo info",
            ),
            (
                "The same as JSON",
                "gptneo info --format json",
            ),
        ),
    )(info)


def info(
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="text or json.", show_default=True)
    ] = "text",
    debug: DebugOpt = False,
) -> None:
    """Show versions, devices, usable attention backends and the settings in force."""
    fmt = check_format(fmt)
    report = collect()
    if fmt != "text":
        write_json(report, lines=fmt == "jsonl")
        return
    write_table("gptneo", [("version", report["version"]), ("python", report["python"])])
    write_table("Packages", [(k, v or "not installed") for k, v in report["packages"].items()])
    write_table("Devices", [(d["name"], d["detail"]) for d in report["devices"]])
    for device in report["devices"]:
        if not device["available"]:
            continue
        rows = [
            (name, "yes" if why is None else f"no: {why}")
            for name, why in device["attention"].items()
        ]
        rows.append(("auto picks", device["attention_auto"]))
        write_table(f"Attention on {device['name']} ({device['dtype']})", rows)
    cfg = report["config"]
    if cfg["problem"]:
        Diagnostics().warn(f"the settings cannot be used: {cfg['problem']}")
    write_table(
        "Configuration",
        [
            *([("problem", f"{cfg['problem']} (defaults shown)")] if cfg["problem"] else []),
            ("default model", f"{cfg['model']} ({cfg['sources']['model']})"),
            ("config file", f"{cfg['file']} ({'found' if cfg['file_found'] else 'not found'})"),
            ("chat history", cfg["history_file"]),
            ("kernel choices", cfg["kernel_cache"]),
            *[(name, value) for name, value in cfg["env"].items()],
        ],
    )
    changed = [
        (key, f"{value!r} ({cfg['sources'][key]})")
        for key, value in cfg["settings"].items()
        if cfg["sources"][key] != "default"
    ]
    write_table("Settings from env and config file", changed or [("(none)", "all defaults")])


def _settings() -> tuple[Settings, str | None]:
    """The settings in force, or the defaults and why the settings could not be read: `info`
    is where one looks when they are broken, so it must still run."""
    try:
        return load_settings(), None
    except ValueError as exc:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GPTNEO_")}
        settings = load_settings(clean)
        settings.path = config_path()
        settings.file_found = settings.path.is_file()
        settings.env = {k: v for k, v in os.environ.items() if k.startswith("GPTNEO_")}
        return settings, str(exc)


def collect() -> dict[str, Any]:
    """Everything `info` prints, as plain data (so --format json is the same report)."""
    settings, problem = _settings()
    from .. import threads

    threads.start_sample()  # measured while torch imports (in _devices)
    devices = _devices(settings.get("dtype"))
    choice = threads.decide(settings.get("threads"), settings.sources.get("threads", "default"))
    devices[0]["detail"] = (
        f"{choice.count} thread{'s' if choice.count != 1 else ''} ({choice.reason}), "
        + devices[0]["detail"]
    )
    return {
        "version": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "devices": devices,
        "threads": {"count": choice.count, "reason": choice.reason},
        "config": {
            "model": settings.model(),
            "file": str(settings.path),
            "file_found": settings.file_found,
            "history_file": settings.get("history_file") or str(default_history_file()),
            "kernel_cache": str(user_cache_dir() / "kernels.json"),
            "env": dict(sorted(settings.env.items())),
            "settings": {key: settings.values[key] for key in keys()},
            "sources": settings.sources,
            "problem": problem,
        },
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _devices(dtype_name: str) -> list[dict[str, Any]]:
    """Each device torch can use here, with the attention backends that can run on it in the
    dtype the settings ask for."""
    import torch

    from .. import native
    from ..attention import choose_backend, flash_unavailable_reason
    from ..device import cpu_has_fast_bf16, resolve_dtype

    devices = [
        (
            torch.device("cpu"),
            f"native bf16: {'yes' if cpu_has_fast_bf16() else 'no'}, "
            f"our kernels: {native.status()}",
        )
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            detail = (
                f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"compute capability {props.major}.{props.minor}"
            )
            devices.append((torch.device("cuda", index), detail))
    else:
        why = "no CUDA build of torch" if torch.version.cuda is None else "no GPU visible"
        devices.append((None, f"not available ({why})"))
    backend = getattr(torch.backends, "mps", None)
    if backend is not None and backend.is_available():
        devices.append((torch.device("mps"), "Apple Metal"))

    out = []
    for device, detail in devices:
        if device is None:
            out.append({"name": "cuda", "detail": detail, "available": False, "attention": {}})
            continue
        dtype = resolve_dtype(dtype_name, device)
        out.append(
            {
                "name": str(device),
                "detail": detail,
                "available": True,
                "dtype": str(dtype).removeprefix("torch."),
                "attention": {
                    "eager": None,
                    "sdpa": None,
                    "flash": flash_unavailable_reason(device, dtype),
                },
                "attention_auto": choose_backend("auto", device, dtype),
            }
        )
    return out
