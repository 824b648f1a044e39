"""What CPython 3.8 and 3.9 lack and qrecover uses: one place, so the rest of the
code reads as it would on 3.10 and later.

qrecover runs on CPython 3.8 to 3.13 (rescue systems ship 3.8: Ubuntu 20.04,
Qubes R4.1's dom0).  Each helper here does what the newer standard library
call does, and calls it where it exists.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, overload

T = TypeVar("T")
if sys.version_info >= (3, 9):
    from typing import Annotated as Annotated
else:  # typer reads its options from Annotated, which came with Python 3.9
    from typing_extensions import Annotated as Annotated

U = TypeVar("U")
V = TypeVar("V")

_os_splice: Callable[[int, int, int], int] | None = getattr(os, "splice", None)


def splice(src: int, dst: int, count: int) -> int:
    """``os.splice`` (Linux, Python 3.10): move up to ``count`` bytes from ``src`` to
    ``dst``; the number moved, 0 at the end of ``src``.  Without it, one read and
    as many writes as the read bytes need."""
    if _os_splice is not None:
        return _os_splice(src, dst, count)
    data = os.read(src, count)
    view = memoryview(data)
    while view:
        view = view[os.write(dst, view):]
    return len(data)


def removeprefix(text: str, prefix: str) -> str:
    """``str.removeprefix`` (3.9)."""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def removesuffix(text: str, suffix: str) -> str:
    """``str.removesuffix`` (3.9)."""
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text


def pairwise(items: Iterable[T]) -> Iterator[tuple[T, T]]:
    """``itertools.pairwise`` (3.10): (a, b), (b, c), ..."""
    it = iter(items)
    prev = next(it, _END)
    for item in it:
        yield prev, item
        prev = item


_END: Any = object()


@overload
def zip_strict(a: Sequence[T], b: Sequence[U], /) -> Iterator[tuple[T, U]]: ...
@overload
def zip_strict(
    a: Sequence[T], b: Sequence[U], c: Sequence[V], /
) -> Iterator[tuple[T, U, V]]: ...
def zip_strict(*seqs: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    """``zip(..., strict=True)`` (3.10) for sequences: ValueError unless all have one
    length."""
    if len({len(s) for s in seqs}) > 1:
        raise ValueError("zip_strict: sequences of different lengths: "
                         + ", ".join(str(len(s)) for s in seqs))
    return zip(*seqs)
