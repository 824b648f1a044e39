"""Sizes, rates and durations as a person reads them (pure functions)."""

from __future__ import annotations


def human_bytes(size: float) -> str:
    """``512 B``, ``1.5 KiB``, ``659.0 MiB``, ``1.2 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float | None) -> str:
    if bytes_per_second is None:
        return "-- MiB/s"
    return f"{bytes_per_second / (1024 * 1024):.1f} MiB/s"


def human_duration(seconds: float | None) -> str:
    """``0:07``, ``12:34``, ``1:02:03``; ``--:--`` when unknown."""
    if seconds is None:
        return "--:--"
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
