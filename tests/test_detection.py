"""Detection, from the registry alone: every format ``qrecover.formats.FORMATS``
lists is recognised, each way it declares, in a backup the scripts/ generators
write the way Qubes did (never qrecover's own code), and as no other format."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from qrecover import formats
from qrecover.archive.container import open_source
from qrecover.errors import BackupError
from qrecover.formats.base import Recognition

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import make_backup as gen  # (never qrecover code)
import make_backup_v1 as gen1
from conftest import PASSPHRASE, MakeBackup


def _members(path: Path) -> dict[str, bytes]:
    """The backup-header pair and the first file's name, read by Python's tarfile
    (Qubes wrote one archive after another: past each one's end marker)."""
    with tarfile.open(path, "r:", ignore_zeros=True) as tar:
        first = next(m for m in tar if not m.isdir())
        found = {"": first.name.encode()}
        for name in ("backup-header", "backup-header.hmac"):
            try:
                member = tar.extractfile(name)
            except KeyError:
                continue
            if member is not None:
                found[name] = member.read()
    return found


@pytest.fixture(scope="module")
def written(make: MakeBackup, make2: MakeBackup, make4: MakeBackup,
            tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Path]]:
    """Per version, each shape of backup its generator writes: a file with a
    header, a file without one (R2-Beta3), a folder (R1), a folder packed."""
    r1 = tmp_path_factory.mktemp("r1")
    folder = Path(gen1.make_backup_v1(r1, [gen.VmSpec("work", 7, source=r1)]).path)
    packed = r1.parent / "r1.tar"
    subprocess.run(["tar", "-c", "-f", str(packed), "-C", str(folder.parent), folder.name],
                   check=True)
    return {
        1: {"folder": folder, "packed": packed},
        2: {"header": make2().path, "first_member": make2(variant="beta3").path},
        3: {"header": make().path},
        4: {"header": make4().path},
    }


def _header(path: Path) -> int:
    found = _members(path)
    return formats.authenticate(found["backup-header"], found["backup-header.hmac"],
                                PASSPHRASE).version


def _first_member(path: Path) -> int | None:
    fmt = formats.detect(first=_members(path)[""].decode())
    return fmt.version if fmt is not None else None


def _folder(path: Path) -> int | None:
    fmt = formats.detect(source=open_source(str(path)))
    return fmt.version if fmt is not None else None


def _packed(path: Path) -> int | None:
    """The version whose folder this tar holds, told twice: from BACKUP's path
    (before any passphrase) and from its first member (a stream)."""
    with pytest.raises(BackupError, match="packed into an archive") as by_path:
        formats.detect(paths=[str(path)])
    with pytest.raises(BackupError, match="packed into an archive"):
        formats.detect(first=_members(path)[""].decode(), refuse_packed=True)
    return int(str(by_path.value).split("format-", 1)[1][0])


_WAYS: dict[str, Callable[[Path], int | None]] = {
    "header": _header, "first_member": _first_member, "folder": _folder, "packed": _packed,
}


def _declared(kind: Recognition) -> list[str]:
    return [way for way in _WAYS if getattr(kind, way) is not None]


@pytest.mark.parametrize("kind", formats.FORMATS, ids=lambda k: f"format{k.version}")
def test_each_format_is_detected_each_way_it_declares(
    kind: Recognition, written: dict[int, dict[str, Path]]
) -> None:
    ways = _declared(kind)
    assert ways, f"format {kind.version} declares no way to be recognised"
    shapes = written[kind.version]  # a new format: add its generator's backups above
    assert set(ways) == set(shapes)
    for way in ways:
        assert _WAYS[way](shapes[way]) == kind.version, way


def test_no_backup_is_taken_for_another_format(written: dict[int, dict[str, Path]]) -> None:
    """A backup with a header is no folder and starts with no other format's first
    member; a folder is no stream."""
    for version, shapes in written.items():
        for way, path in shapes.items():
            if way == "header":
                assert _first_member(path) is None and _folder(path) is None, version
                formats.detect(paths=[str(path)])  # not refused as a packed folder
            elif way == "folder":
                assert _folder(path) == version
            elif way == "first_member":
                assert _folder(path) is None
    assert {kind.version for kind in formats.FORMATS} == set(written)
