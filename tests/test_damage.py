"""Damaged backups (issue 22, item 1): everything undamaged comes back, the damage is named.

Backups are written by the generators (make_backup*.py) and damaged by
scripts/damage_backup.py the way media do (zeroed sectors, garbage, flipped
bits, truncation); unreadable sectors are real read errors from a FUSE file
system (scripts/eio_fs.py).  The oracle for every case: a stored file none
of whose members was touched is restored byte for byte as from the
undamaged backup; one that was touched fails (its .partial kept, nothing
under its final name); the damage is reported once, with its byte range,
the chunks it cost and their stored files, in text and --json; exit 4.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Backup, MakeBackup, run_cli, run_main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import damage_backup as db

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
CHUNK = 64 * 1024  # small chunks: stored files of several chunks in a small backup


def tree_hashes(place: Path) -> dict[str, str]:
    """Every regular file under ``place`` (or ``place`` itself): its sha256."""
    paths = [place] if place.is_file() else sorted(p for p in place.rglob("*") if p.is_file())
    return {str(p.relative_to(place.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in paths if not p.is_symlink()}


@dataclass
class Restored:
    code: int
    doc: dict[str, Any]
    err: str
    out: Path

    def files(self) -> dict[str, dict[str, Any]]:
        return {f["stored"]: f for f in self.doc["files"]}

    def hashes(self, stored: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for place in self.files()[stored]["places"]:
            found.update(tree_hashes(Path(place)))
        return found


def restore(path: Path | str, passfile: Path, out: Path, stdin: Path | None = None) -> Restored:
    args = ("restore", path, "--output", out, "--passphrase-file", passfile, "--json")
    # standard input: a process of its own, fed through a pipe (no seeking)
    result = run_cli(*args, stdin=stdin.read_bytes()) if stdin is not None else run_main(*args)
    return Restored(result.code, json.loads(result.out), result.err, out)


def chunk_of(member: str) -> str:
    return member.removesuffix(".hmac")


def stored_of(member: str) -> str:
    return member.removesuffix(".hmac").removesuffix(".enc").rsplit(".", 1)[0]


def check(pristine: Restored, damaged: Restored, hits: list[db.Hit]) -> None:
    """The oracle (see the module docstring); each hit a range of its own."""
    assert damaged.code == 4, damaged.err
    hit_stored = {stored_of(m) for h in hits for m in h.members}
    files = damaged.files()
    for stored in pristine.files():
        if stored in hit_stored:
            assert files[stored]["status"] == "failed", stored
            assert all(p.endswith(".partial") for p in files[stored]["places"]), files[stored]
            continue
        assert stored in files and files[stored]["status"] == "ok", (stored, damaged.err)
        assert damaged.hashes(stored) == pristine.hashes(stored), stored
    ranges = damaged.doc["damage"]
    assert len(ranges) == len(hits), ranges
    for hit, found in zip(sorted(hits, key=lambda h: h.start), ranges, strict=True):
        assert found["start"] <= hit.start, (hit, found)
        assert found["end"] is None or found["end"] >= hit.end, (hit, found)
        chunks = {chunk_of(m) for m in hit.members}
        assert chunks <= set(found["chunks"]), (hit, found)
        assert set(found["stored_files"]) == {stored_of(m) for m in hit.members}, (hit, found)
        shown = f"damaged: {found['file']}: "
        assert sum(shown in line for line in damaged.err.splitlines()) >= 1, damaged.err


def longest(members: list[db.OuterMember]) -> str:
    """The stored file with the most chunks."""
    counts: dict[str, int] = {}
    for m in members:
        if not m.name.endswith(".hmac") and not m.name.startswith(("backup-header", "qubes.xml")):
            counts[stored_of(m.name)] = counts.get(stored_of(m.name), 0) + 1
    return max(counts, key=lambda s: (counts[s], s))


@pytest.fixture(scope="module")
def v3(make: MakeBackup) -> Backup:
    return make(compression=None, chunk_size=CHUNK)


@pytest.fixture(scope="module")
def v3_pristine(v3: Backup, tmp_path_factory: pytest.TempPathFactory) -> Restored:
    done = restore(v3.path, v3.passfile, tmp_path_factory.mktemp("v3") / "out")
    assert done.code == 0, done.err
    return done


def test_format3_zeroed_header_sectors_and_damage_inside_chunks(
    v3: Backup, v3_pristine: Restored, tmp_path: Path
) -> None:
    """4 KiB of zeros over one chunk's header, 512 B inside another stored file's
    chunk, garbage over a third's .hmac: the three stored files fail, each damage
    is one range with its cost, everything else is restored byte for byte."""
    damager = db.Damager(v3.path, seed=1)
    big = longest(damager.members)
    others = [stored_of(m.name) for m in damager.members if m.name.endswith(".000.hmac")
              and stored_of(m.name) not in (big, "qubes.xml")]
    hits = [
        damager.zero_header(f"{big}.001", 4096),
        damager.zero_inside(f"{others[0]}.000", 100),
    ]
    hmac = damager.member(f"{others[-1]}.000.hmac")
    hits.append(damager.garbage(hmac.offset, hmac.end - hmac.offset))
    path = tmp_path / "damaged"
    damager.write(path)
    damaged = restore(path, v3.passfile, tmp_path / "out")
    check(v3_pristine, damaged, hits)
    first = damaged.doc["damage"][0] if hits[0].start < hits[1].start else None
    if first is not None:
        assert f"{big}.001" in first["chunks"]


def test_format3_flipped_bit_and_truncation(
    v3: Backup, v3_pristine: Restored, tmp_path: Path
) -> None:
    """A flipped bit costs exactly its chunk's stored file; a copy cut short
    inside the last stored file costs it alone, the rest is restored."""
    damager = db.Damager(v3.path)
    names = [m for m in damager.members if not m.name.endswith(".hmac")]
    target = next(m for m in names if stored_of(m.name) == longest(damager.members))
    hits = [damager.flip(target.data + target.size // 2, 5)]
    last = names[-1]
    hits.append(damager.truncate(last.data + last.size // 2))
    path = tmp_path / "damaged"
    damager.write(path)
    damaged = restore(path, v3.passfile, tmp_path / "out")
    check(v3_pristine, damaged, hits)
    assert damaged.doc["damage"][-1]["end"] is None  # to the end: truncated


def test_format3_from_standard_input_resyncs_by_reading_on(
    v3: Backup, v3_pristine: Restored, tmp_path: Path
) -> None:
    """A pipe cannot seek: the reader steps over the damage as it reads."""
    damager = db.Damager(v3.path, seed=3)
    big = longest(damager.members)
    hits = [damager.garbage(damager.member(f"{big}.002").offset, 1536)]
    path = tmp_path / "damaged"
    damager.write(path)
    damaged = restore("-", v3.passfile, tmp_path / "out", stdin=path)
    check(v3_pristine, damaged, hits)


def test_format3_pieces_with_a_zeroed_sector(
    v3: Backup, v3_pristine: Restored, tmp_path: Path
) -> None:
    """A split backup: damage inside a piece (not at a boundary) is stepped over
    and reported with the piece's own offsets."""
    damager = db.Damager(v3.path)
    big = longest(damager.members)
    hits = [damager.zero_header(f"{big}.001", 512)]
    data = bytes(damager.data)
    size = len(data) // 3 // 512 * 512 + 512
    pieces = []
    for i in range(0, len(data), size):
        piece = tmp_path / f"part-{i // size:02d}"
        piece.write_bytes(data[i : i + size])
        pieces.append(piece)
    result = run_main("restore", *pieces, "--output", tmp_path / "out", "--passphrase-file",
                      v3.passfile, "--json")
    damaged = Restored(result.code, json.loads(result.out), result.err, tmp_path / "out")
    check(v3_pristine, damaged, hits)
    assert "of " + str(pieces[hits[0].start // size]) in result.err


@pytest.fixture(scope="module")
def v4(make4: MakeBackup) -> Backup:
    return make4(compression=None, chunk_size=CHUNK)


def test_format4_zeroed_sectors(v4: Backup, tmp_path: Path) -> None:
    """Format 4 (scrypt per chunk): a zeroed header sector and a zeroed sector
    inside another stored file's chunk cost those two stored files only."""
    pristine = restore(v4.path, v4.passfile, tmp_path / "pristine")
    assert pristine.code == 0, pristine.err
    damager = db.Damager(v4.path)
    big = longest(damager.members)
    other = next(stored_of(m.name) for m in damager.members
                 if m.name.endswith(".000.enc") and stored_of(m.name) not in (big, "qubes.xml"))
    hits = [damager.zero_header(f"{big}.001.enc", 4096),
            damager.zero_inside(f"{other}.000.enc", 700)]
    path = tmp_path / "damaged"
    damager.write(path)
    check(pristine, restore(path, v4.passfile, tmp_path / "out"), hits)


def test_format2_garbage_over_a_volume_header(tmp_path: Path) -> None:
    """Format 2 (GNU multi-volume inner tar, one volume per chunk)."""
    import make_backup as mb
    import make_backup_v2 as mb2

    vms, home = mb.make_sample_tree(tmp_path / "tree", image_mb=2)
    passfile = tmp_path / "pass"
    passfile.write_text("pass\n")
    path = tmp_path / "backup"
    mb2.make_backup_v2(path, "pass", vms, dom0_home=home, tape_length_kib=20)
    pristine = restore(path, passfile, tmp_path / "pristine")
    assert pristine.code == 0, pristine.err
    damager = db.Damager(path, seed=2)
    big = longest(damager.members)
    hits = [damager.garbage(damager.member(f"{big}.001").data - 600, 700)]
    damaged_path = tmp_path / "damaged"
    damager.write(damaged_path)
    check(pristine, restore(damaged_path, passfile, tmp_path / "out"), hits)


# -- read errors, for real: a FUSE file system that fails reads with EIO ---------


@pytest.fixture
def eio_mount(tmp_path: Path) -> Any:
    """Mount SOURCE with eio_fs.py, failing reads in the given ranges; unmounted after."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine: read errors cannot be made for real")
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 (Debian package fuse3) is not installed")
    mounted: list[tuple[Path, subprocess.Popen[str]]] = []

    def mount(source: Path, bad: list[str]) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        argv = [sys.executable, str(SCRIPTS / "eio_fs.py"), str(source), str(point)]
        for spec in bad:
            argv += ["--bad", spec]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready" once mounted (its init), or EOF if it failed
        if line.strip() != "ready":
            proc.wait()
            assert proc.stderr is not None
            pytest.fail(f"eio_fs.py did not mount: {proc.stderr.read()[-500:]}")
        mounted.append((point, proc))
        return point

    yield mount
    for point, proc in mounted:
        subprocess.run(["fusermount3", "-u", str(point)], check=False)
        proc.wait(timeout=60)


def test_unreadable_sectors_of_a_backup_file(
    v3: Backup, v3_pristine: Restored, tmp_path: Path, eio_mount: Any
) -> None:
    """Two unreadable 4 KiB ranges (EIO): one over a chunk's header, one inside
    another stored file's chunk.  The reader steps over each sector it cannot
    read, reports exactly which bytes could not be read, and goes on."""
    members = db.outer_members(v3.path)
    big = longest(members)
    other = next(stored_of(m.name) for m in members
                 if m.name.endswith(".000.hmac") and stored_of(m.name) not in (big, "qubes.xml"))
    head = next(m for m in members if m.name == f"{big}.001")
    inside = next(m for m in members if m.name == f"{other}.000")
    spans = [db.sector_range(head.data - 512, 4096), db.sector_range(inside.data + 100, 4096)]
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(v3.path, source / "backup")
    point = eio_mount(source, [f"backup:{a}-{b}" for a, b in spans])
    hits = [db.Hit("unreadable", a, b, db.touched(members, a, b)) for a, b in spans]
    damaged = restore(point / "backup", v3.passfile, tmp_path / "out")
    check(v3_pristine, damaged, hits)
    assert [r["unreadable"] for r in damaged.doc["damage"]] == [[list(s)] for s in sorted(spans)]
    assert "Input/output error" in damaged.err


def test_unreadable_and_missing_chunk_files_of_a_folder(
    v3: Backup, v3_pristine: Restored, tmp_path: Path, eio_mount: Any
) -> None:
    """An untarred backup folder: one chunk file cannot be read (EIO), another
    chunk's .hmac is missing: those two stored files fail, the others come back."""
    folder = tmp_path / "folder"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(v3.path), "-C", str(folder)], check=True)
    members = db.outer_members(v3.path)
    big = longest(members)
    other = next(stored_of(m.name) for m in members
                 if m.name.endswith(".000.hmac") and stored_of(m.name) not in (big, "qubes.xml"))
    (folder / f"{other}.000.hmac").unlink()
    point = eio_mount(folder, [f"{big}.001:0-512"])
    damaged = restore(point, v3.passfile, tmp_path / "out")
    assert damaged.code == 4, damaged.err
    files = damaged.files()
    assert files[big]["status"] == "failed" and files[other]["status"] == "failed"
    for stored in v3_pristine.files():
        if stored not in (big, other):
            assert damaged.hashes(stored) == v3_pristine.hashes(stored), stored
    found = {r["file"]: r for r in damaged.doc["damage"]}
    assert found.keys() == {str(point / f"{big}.001"), str(point / f"{other}.000")}, found
    assert found[str(point / f"{big}.001")]["chunks"] == [f"{big}.001"]
    assert found[str(point / f"{other}.000")]["stored_files"] == [other]
    assert "Input/output error" in files[big]["error"]
    assert f"{other}.000.hmac is missing" in files[other]["error"]


@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_backup_compressed_as_a_whole_damaged(
    kind: str, v3: Backup, v3_pristine: Restored, tmp_path: Path
) -> None:
    """The decompressor fails at the damage: everything it wrote before is read
    (each chunk authenticated), what it cost is said, nothing wrong is placed."""
    packed = tmp_path / f"backup.{kind}"
    with v3.path.open("rb") as src, packed.open("wb") as dst:
        subprocess.run([kind, "-c"], stdin=src, stdout=dst, check=True)
    data = bytearray(packed.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    packed.write_bytes(bytes(data))
    damaged = restore(packed, v3.passfile, tmp_path / "out")
    assert damaged.code == 4, damaged.err
    ok = [f["stored"] for f in damaged.doc["files"] if f["status"] == "ok"]
    assert len(ok) >= 3, damaged.err  # what came before the damage
    for stored in ok:
        assert damaged.hashes(stored) == v3_pristine.hashes(stored), stored
    last = damaged.doc["damage"][-1]
    assert last["end"] is None and "exited 1" in " ".join(last["what"]), damaged.doc["damage"]
    assert f"damaged: {packed}: from byte " in damaged.err
