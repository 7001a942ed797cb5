"""Sizes and counts as people read them (the Hub's decimal units)."""

from __future__ import annotations


def format_bytes(n: int | None) -> str:
    """1536 -> "1.5 KB" (decimal units, like the Hub's web pages)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """125198592 -> "125.2M"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
