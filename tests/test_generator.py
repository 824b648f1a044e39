"""Self-check of scripts/make_backup.py without any qrecover code.

Every backup written by the generator is restored here with the manual
procedure of the emergency-restore page, run as real shell commands:
``tar -i -xf``, ``openssl dgst -DIGEST -hmac`` (comparing only the hex after
``= ``), ``cat`` of the chunks in ``sort -V`` order piped into
``openssl enc -d -CIPHER -md md5``, the decompressor, and ``tar -xf``.
The restored files are then compared with the sources, holes included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_backup as mb  # noqa: E402
from conftest import PASSPHRASE as SHARED_PASSPHRASE  # noqa: E402
from conftest import Backup, MakeBackup  # noqa: E402
from helpers import assert_same_tree  # noqa: E402

PASSPHRASE = "correct horse battery staple"
DECOMPRESS = {"gzip": "gzip -d", "bzip2": "bzip2 -d", "xz": "xz -d"}
CHUNK_RE = re.compile(r"^(?P<base>.*)\.(?P<num>[0-9]{3,})$")


def run_sh(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script, "restore", *args],
        cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def hmac_hex(text: str) -> str:
    """The hex after ``= `` of an openssl dgst line, either style."""
    return text.strip().split("= ", 1)[1]


class Restored:
    def __init__(self, members: list[str], header: dict[str, str], header_text: str,
                 extract: Path, out: Path) -> None:
        self.members = members
        self.header = header
        self.header_text = header_text
        self.extract = extract  # the outer archive's members
        self.out = out  # the inner archives, extracted


def manual_restore(backup: Path, work: Path, passphrase: str = PASSPHRASE) -> Restored:
    extract = work / "extract"
    out = work / "out"
    extract.mkdir()
    out.mkdir()
    env = {"PASS": passphrase}
    # 1. untar the outer archive (a concatenation of small tar archives)
    run_sh('tar -i -xf "$1"', str(backup), cwd=extract)
    members = run_sh('tar -i -tf "$1"', str(backup), cwd=extract).splitlines()
    assert members[:4] == ["backup-header", "backup-header.hmac",
                           "qubes.xml.000", "qubes.xml.000.hmac"]
    # 2. verify the header's HMAC before trusting it: try the digests
    stored = hmac_hex((extract / "backup-header.hmac").read_text())
    algorithm = None
    for alg in ("SHA512", "SHA256", "SHA1"):
        got = run_sh('openssl dgst -"$1" -hmac "$PASS" < backup-header', alg,
                     cwd=extract, env=env)
        if hmac_hex(got) == stored:
            algorithm = alg
            break
    assert algorithm is not None, "header HMAC matches no digest"
    # 3. read the header
    header_text = (extract / "backup-header").read_text(encoding="ascii")
    header = dict(line.split("=", 1) for line in header_text.splitlines())
    assert header["version"] == "3"
    assert header["hmac-algorithm"] == algorithm
    # group chunks by stored file, in archive order
    groups: dict[str, list[str]] = {}
    for name in members[2:]:
        if name.endswith(".hmac"):
            continue
        match = CHUNK_RE.match(name)
        assert match, name
        groups.setdefault(match["base"], []).append(name)
    for names in groups.values():
        numbers = [int(CHUNK_RE.match(n)["num"]) for n in names]  # type: ignore[index]
        assert numbers == list(range(len(names))), "chunks out of order in archive"
        assert all(n + ".hmac" in members for n in names)
    cipher = header["crypto-algorithm"]
    decomp = DECOMPRESS[header["compression-filter"]] if header["compressed"] == "True" \
        else "cat"
    decrypt = (f'openssl enc -d -{cipher} -md md5 -pass pass:"$PASS"'
               if header["encrypted"] == "True" else "cat")
    for base, names in groups.items():
        directory, stem = os.path.split(base)
        # 4. verify every chunk's HMAC (hex after "= " only), 4 openssl at a time
        proc = subprocess.run(
            ["bash", "-c",
             "set -euo pipefail\n"
             "xargs -0 -n 64 -P 4 bash -c '\n"
             '  for f in "$@"; do\n'
             f'    a=$(openssl dgst -{algorithm} -hmac "$PASS" < "$f"); a=${{a#*= }}\n'
             '    read -r b < "$f.hmac"; b=${b#*= }\n'
             '    [ -n "$a" ] && [ "$a" = "$b" ] || { echo "bad hmac $f" >&2; exit 255; }\n'
             "  done' verify"],
            input=b"".join(n.encode() + b"\0" for n in names), cwd=extract,
            env={**os.environ, **env}, capture_output=True, check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        # 5-7. cat the chunks in `sort -V` order | decrypt | decompress | untar
        listed = run_sh(
            'find "$1" -maxdepth 1 -type f -name "$2.[0-9][0-9][0-9]*" ! -name "*.hmac"'
            " | sort -V",
            directory or ".", stem, cwd=extract,
        ).splitlines()
        assert [os.path.normpath(p) for p in listed] == names, "sort -V order differs"
        proc = subprocess.run(
            ["bash", "-c",
             "set -euo pipefail\n"
             f'tr "\\n" "\\0" | xargs -0 cat | {decrypt} | {decomp} | tar -xf - -C "$1"',
             "restore", str(out)],
            input="\n".join(listed).encode() + b"\n", cwd=extract,
            env={**os.environ, **env}, capture_output=True, check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return Restored(members, header, header_text, extract, out)


def walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield (Path(dirpath) / name).relative_to(root)


def check_against_manifest(res: Restored, manifest: mb.BackupManifest) -> None:
    assert res.members == manifest.member_names()
    assert res.header == manifest.header
    for stored in manifest.files:
        if stored.vm is None:
            continue
        assert_same_tree(res.out / stored.name, Path(stored.source))
    for member in mb.expected_members(manifest):
        path = res.out / member["name"]
        if member["type"] == "file":
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == member["sha256"], member["name"]


def xml_vms(res: Restored) -> dict[str, ET.Element]:
    root = ET.parse(res.out / "qubes.xml").getroot()
    assert root.tag == "QubesVmCollection"
    return {el.attrib["name"]: el for el in root}


def build(tmp_path: Path, make: MakeBackup,
          **kwargs: object) -> tuple[mb.BackupManifest, Restored]:
    """The session's backup of the sample tree with these writer options (each is
    built once per run and shared with the qrecover tests), restored by hand."""
    backup = make(**kwargs)
    assert not [p for p in backup.path.parent.iterdir() if p.name.startswith("qrecover-mkbackup")]
    res = manual_restore(backup.path, tmp_path, SHARED_PASSPHRASE)
    check_against_manifest(res, backup.manifest)
    return backup.manifest, res


def test_default_backup(tmp_path: Path, make: MakeBackup) -> None:
    manifest, res = build(tmp_path, make)
    as_json = json.loads(manifest.to_json())
    assert as_json["files"][13]["chunk_names"] == ["vm3/..000"]
    assert res.header_text == (
        "version=3\nhmac-algorithm=SHA512\ncrypto-algorithm=aes-256-cbc\n"
        "encrypted=True\ncompressed=True\ncompression-filter=gzip\n"
    )
    hmac_text = (res.extract / "vm7/private.img.000.hmac").read_text()
    assert re.fullmatch(r"\(stdin\)= [0-9a-f]{128}\n", hmac_text)
    assert (res.extract / "qubes.xml.000").read_bytes()[:8] == b"Salted__"
    stored = [f.name for f in manifest.files]
    assert stored == [
        "qubes.xml",
        "vm10/private.img", "vm10/icon.png", "vm10/apps", "vm10/root.img",
        "vm2/private.img",
        "vm9/private.img", "vm9/icon.png", "vm9/firewall.xml",
        "vm7/private.img", "vm7/icon.png", "vm7/firewall.xml",
        "vm7/whitelisted-appmenus.list",
        "vm3/.",
        "dom0-home/user",
    ]
    assert "vm3/..000" in res.members
    assert (res.out / "vm3/./root.img").is_file()
    assert mb.MARKER in (res.out / "vm7/private.img").read_bytes()
    assert (res.out / "dom0-home/user/Documents/Grüße notes.txt").is_file()
    assert os.readlink(res.out / "dom0-home/user/notes-link") == "Documents/Grüße notes.txt"
    vms = xml_vms(res)
    assert vms["dom0"].tag == "QubesAdminVm"
    assert vms["dom0"].attrib["backup_path"] == "dom0-home/user"
    assert vms["work"].attrib["backup_path"] == "vm7"
    assert vms["work"].attrib["template_qid"] == "3"
    assert vms["fedora-23"].tag == "QubesTemplateVm"
    assert vms["sys-firewall"].attrib["backup_content"] == "False"
    assert "backup_path" not in vms["sys-firewall"].attrib
    work_src = Path(manifest.files[9].source).parent
    assert int(vms["work"].attrib["backup_size"]) == mb.disk_usage(work_src)


@pytest.mark.parametrize("compression", ["bzip2", "xz", None])
def test_compression(tmp_path: Path, make: MakeBackup,
                     compression: str | None) -> None:
    _, res = build(tmp_path, make, compression=compression)
    assert res.header["compressed"] == str(compression is not None)
    if compression is None:
        assert "compression-filter" not in res.header


def test_unencrypted(tmp_path: Path, make: MakeBackup) -> None:
    _, res = build(tmp_path, make, encrypted=False)
    assert res.header_text == (
        "version=3\nhmac-algorithm=SHA512\ncrypto-algorithm=aes-256-cbc\n"
        "encrypted=False\ncompressed=True\ncompression-filter=gzip\n"
    )
    assert (res.extract / "vm7/private.img.000").read_bytes()[:2] == b"\x1f\x8b"


def test_unencrypted_uncompressed(tmp_path: Path,
                                  make: MakeBackup) -> None:
    _, res = build(tmp_path, make, encrypted=False, compression=None)
    assert (res.extract / "qubes.xml.000").read_bytes()[:9] == b"qubes.xml"


def test_sha256_openssl3_style(tmp_path: Path, make: MakeBackup) -> None:
    _, res = build(tmp_path, make, hmac_algorithm="SHA256", hmac_style="openssl3")
    text = (res.extract / "backup-header.hmac").read_text()
    assert re.fullmatch(r"SHA2-256\(stdin\)= [0-9a-f]{64}\n", text)


def test_plain_paths(tmp_path: Path, make: MakeBackup) -> None:
    _, res = build(tmp_path, make, hide_names=False, hmac_algorithm="SHA1")
    for name in ("appvms/work/private.img.000", "vm-templates/fedora-23/..000",
                 "servicevms/sys-net/private.img.000", "appvms/standalone/apps.000",
                 "dom0-home/user.000"):
        assert name in res.members
    assert (res.out / "appvms/untrusted/firewall.xml").is_file()
    assert not (res.out / "appvms/untrusted/apps").exists()
    vms = xml_vms(res)
    assert vms["work"].attrib["backup_path"] == "appvms/work"
    assert vms["fedora-23"].attrib["backup_path"] == "vm-templates/fedora-23"


def test_multi_chunk(tmp_path: Path, make: MakeBackup) -> None:
    manifest, res = build(tmp_path, make, chunk_size=16 * 1024)
    assert "vm3/..001" in res.members  # qubes-issues #3167
    for stored in manifest.files:
        sizes = [(res.extract / c).stat().st_size for c in stored.chunk_names()]
        assert all(s == 16 * 1024 for s in sizes[:-1])
        assert sum(sizes) == stored.stream_size


def test_dom0_user_renamed(tmp_path: Path, sample_tree: tuple[list[mb.VmSpec], Path]) -> None:
    vms, home = sample_tree
    backup = tmp_path / "b"
    manifest = mb.make_backup(backup, PASSPHRASE, vms[:1] + vms[1:2], dom0_home=home,
                              dom0_user="alice", workdir=tmp_path)
    res = manual_restore(backup, tmp_path)
    assert res.members[-2:] == ["dom0-home/alice.000", "dom0-home/alice.000.hmac"]
    assert_same_tree(res.out / "dom0-home/alice", home)
    assert manifest.files[-1].source == str(home)
    assert xml_vms(res)["dom0"].attrib["backup_path"] == "dom0-home/alice"


@pytest.fixture
def tiny_vm(tmp_path: Path) -> list[mb.VmSpec]:
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "private.img").write_bytes(hashlib.shake_256(b"tiny").digest(7900))
    return [mb.VmSpec("tiny", 5, source=src)]


def test_chunk_1000(tmp_path: Path, backup_past_1000: Backup) -> None:
    manifest = backup_past_1000.manifest
    res = manual_restore(backup_past_1000.path, tmp_path, SHARED_PASSPHRASE)
    check_against_manifest(res, manifest)
    img = manifest.files[1]
    assert img.chunks > 1001
    assert "vm12/private.img.1000" in res.members
    # a `???` glob silently drops chunks past 999
    assert len(list((res.extract / "vm12").glob("private.img.???"))) == 1000
    # an encrypted stream is a multiple of 16 bytes, so R3.2 ended it with
    # an empty chunk (and its .hmac)
    assert img.stream_size % 16 == 0
    last = res.extract / img.chunk_names()[-1]
    assert last.stat().st_size == 0
    assert (res.extract / (img.chunk_names()[-1] + ".hmac")).stat().st_size > 0


def test_no_empty_final_chunk(tmp_path: Path, tiny_vm: list[mb.VmSpec]) -> None:
    backup = tmp_path / "b"
    manifest = mb.make_backup(backup, PASSPHRASE, tiny_vm, chunk_size=4096,
                              workdir=tmp_path, empty_final_chunk=False)
    res = manual_restore(backup, tmp_path)
    check_against_manifest(res, manifest)
    for stored in manifest.files:
        assert stored.chunks == -(-stored.stream_size // 4096)
        assert (res.extract / stored.chunk_names()[-1]).stat().st_size > 0


def test_cli_big_sparse(tmp_path: Path) -> None:
    """4 GiB sparse image through the CLI: bounded memory and scratch."""
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE + "\n")
    backup = tmp_path / "b"
    writer = [
        sys.executable, str(SCRIPTS / "make_backup.py"), str(backup),
        "--passphrase-file", str(pw), "--sample", str(tmp_path / "s"),
        "--big-sparse-gib", "4", "--image-mb", "2", "--chunk-size", str(1 << 20),
        "--manifest", str(tmp_path / "m.json"), "--workdir", str(tmp_path),
    ]
    # The writer's peak RSS and its programs', from a fresh parent: this process's own
    # RUSAGE_CHILDREN would also count whatever earlier tests on this worker started.
    measure = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", measure, *writer], check=True, capture_output=True, text=True
    )
    peak_kib = int(proc.stdout)
    assert 0 < peak_kib < 200 * 1024
    res = manual_restore(backup, tmp_path)
    img = res.out / "vm7/private.img"
    assert img.stat().st_size == 4 << 30
    assert img.stat().st_blocks * 512 < 8 << 20
    src = tmp_path / "s/vms/work/private.img"
    with img.open("rb") as got, src.open("rb") as want:
        for offset in (0, 1 << 20, (4 << 30) - 4096):
            got.seek(offset)
            want.seek(offset)
            assert got.read(65536) == want.read(65536)


def test_manual_procedure_catches_errors(tmp_path: Path, tiny_vm: list[mb.VmSpec]) -> None:
    """The checks above can fail: wrong passphrase, and one flipped data byte."""
    backup = tmp_path / "b"
    mb.make_backup(backup, PASSPHRASE, tiny_vm, encrypted=False, compression=None,
                   workdir=tmp_path)
    (tmp_path / "w1").mkdir()
    with pytest.raises(AssertionError, match="matches no digest"):
        manual_restore(backup, tmp_path / "w1", passphrase="wrong")
    data = bytearray(backup.read_bytes())
    needle = (tiny_vm[0].source / "private.img").read_bytes()[100:132]  # type: ignore[operator]
    pos = data.index(needle)
    data[pos] ^= 1
    backup.write_bytes(bytes(data))
    (tmp_path / "w2").mkdir()
    with pytest.raises(AssertionError, match=r"bad hmac vm5/private\.img\.000"):
        manual_restore(backup, tmp_path / "w2")


def test_committed_fixture(tmp_path: Path) -> None:
    """fixtures/sample-backup restores by hand to what its contents.json lists."""
    fixtures = SCRIPTS.parent / "fixtures"
    backup = fixtures / "sample-backup"
    if not backup.exists():
        pytest.skip("fixtures not generated (sh scripts/make_fixtures.sh)")
    passphrase = (fixtures / "sample-backup.passphrase").read_text().splitlines()[0]
    res = manual_restore(backup, tmp_path, passphrase)
    assert res.header["hmac-algorithm"] == "SHA512"
    assert (res.extract / "backup-header.hmac").read_text().startswith("(stdin)= ")
    contents = json.loads((fixtures / "sample-backup.contents.json").read_text())
    for member in contents:
        path = res.out / member["name"]
        if member["type"] == "file":
            assert hashlib.sha256(path.read_bytes()).hexdigest() == member["sha256"]
            assert path.stat().st_size == member["size"]
        elif member["type"] == "symlink":
            assert os.readlink(path) == member["target"]
        else:
            assert path.is_dir()
    work = res.out / "vm7/private.img"
    assert work.read_bytes().find(mb.MARKER) == 2359296
    assert work.stat().st_blocks * 512 < work.stat().st_size / 4
