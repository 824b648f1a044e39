"""The backup header's text: strict ``key=value`` lines, read only once authenticated.

What a header means depends on its format: each format's model (in
qrecover.formats) validates the keys it knows.  This module holds what every
format shares: the line syntax Qubes' reader accepted, the booleans, the
allow-listed compression filters, and how a validation error is told.
"""

from __future__ import annotations

import re
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from qrecover.compat import removeprefix
from qrecover.errors import BackupError
from qrecover.stages.decompress import FILTER_TEXT, check_filter, filter_program

MAX_HEADER = 4096
M = TypeVar("M", bound=BaseModel)
_TOKEN = re.compile(r"^[A-Za-z0-9-]+$")
FILTER_KEY = "compression-filter"

class Header(Protocol):
    """What every format's verified header answers."""

    @property
    def version(self) -> int: ...

    @property
    def compressed(self) -> bool: ...

    @property
    def filter(self) -> str | None: ...

    def fields(self) -> dict[str, object]: ...


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text == "true":
        return True
    if text == "false":
        return False
    raise ValueError("must be True or False")


def check_filter_value(value: str | None) -> str | None:
    """A header's ``compression-filter``: an allow-listed program, maybe a level."""
    return None if value is None else check_filter(value)


def compression(compressed: bool, compression_filter: str | None) -> str | None:
    """The filter a header means: none if not compressed; gzip if compressed
    without naming one (Qubes wrote that before the key existed)."""
    if not compressed:
        return None
    return filter_program(compression_filter) if compression_filter else "gzip"


def split_header(data: bytes) -> dict[str, str]:
    """Strict `key=value` parsing, as Qubes' reader did; raises BackupError."""
    if len(data) > MAX_HEADER:
        raise BackupError(f"backup-header: {len(data)} bytes, larger than any real header")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BackupError("backup-header: not ASCII text") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.count("=") != 1:
            raise BackupError(f"backup-header line {number}: expected exactly one '='")
        key, value = line.split("=")
        # R3.2 let a filter carry arguments ("gzip -3"); check_filter judges them.
        value_ok = _TOKEN.match(value) or (key == FILTER_KEY and FILTER_TEXT.match(value))
        if not _TOKEN.match(key) or not value_ok:
            raise BackupError(
                f"backup-header line {number}: key and value may hold only A-Z a-z 0-9 -"
            )
        if key in values:
            raise BackupError(f"backup-header line {number}: duplicate key '{key}'")
        values[key] = value
    return values


def validate(model: type[M], values: dict[str, str]) -> M:
    """``values`` as ``model``; a validation error is one BackupError naming each key."""
    try:
        return model.model_validate({k.replace("-", "_"): v for k, v in values.items()})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]).replace("_", "-")
            msg = removeprefix(str(err["msg"]), "Value error, ")
            problems.append(f"{key}: {msg}")
        raise BackupError("backup-header: " + "; ".join(problems)) from None
