"""qrecover: get data back out of Qubes OS backups without Qubes."""

from __future__ import annotations

__version__ = "0.1.0"
