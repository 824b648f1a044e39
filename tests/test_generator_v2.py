"""Self-check of scripts/make_backup_v2.py without any qrecover code.

Every format-2 backup written by the generator is recovered here by hand, the
way the v2 emergency-restore page does it, with its bugs fixed, as a POSIX
``sh`` script run by dash: ``tar -i -xf``; for each chunk in numeric order
``openssl dgst -ALG -hmac`` compared with the ``.hmac`` (hex after ``= ``),
then ``openssl enc -d -md MD5 -CIPHER`` (or ``gzip -d``, or, for R2-Beta3's
``openssl enc -z``, decryption then ``pigz -d -z``); and ``tar -M
--new-volume-script`` reading the volumes NAME.000, NAME.001, ... in order.
The result is compared byte for byte with the sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# its fixtures build something big: all its tests on one worker, so it is built once
pytestmark = pytest.mark.xdist_group("test_generator_v2")

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_backup as mb  # noqa: E402
import make_backup_v2 as mb2  # noqa: E402

PASSPHRASE = "correct horse battery staple ünïcödé"
TAPE_KIB = 40  # 40 KiB volumes: many chunks from small images
CHUNK_RE = re.compile(r"^(?P<base>.*)\.(?P<num>[0-9]{3,})$")

# The v2 page's new-volume script, with `$[ ]` (bash only) replaced by `$(( ))`.
NEW_VOLUME = """#!/bin/sh
name=`expr "$TAR_ARCHIVE" : '\\(.*\\)\\..*'`
suffix=`printf %03d $(( TAR_VOLUME - 1 ))`
echo "$name.$suffix" >&"$TAR_FD"
"""

# Steps 3-5 of the v2 page for every chunk of one stored file, in numeric
# order (no glob, no `find` matching the .hmac files): HMAC check, decrypt or
# decompress, written to dec/NAME.NNN so the volume names keep their suffix.
RECOVER_FILE = r"""
set -eu
base=$1
n=0
f="$base.$(printf %03d $n)"
[ -e "$f" ] || { echo "no $f" >&2; exit 1; }
while [ -e "$f" ]; do
  got=$(openssl dgst -"$ALG" -hmac "$BP" < "$f" | sed 's/^.*= //')
  want=$(sed 's/^.*= //' "$f.hmac")
  [ "$got" = "$want" ] || { echo "HMAC mismatch: $f" >&2; exit 2; }
  out="dec/$f"
  mkdir -p "$(dirname "$out")"
  case $MODE in
    enc) openssl enc -d -md MD5 -pass env:BP -"$CIPHER" -in "$f" -out "$out" 2>/dev/null ;;
    zlib) openssl enc -d -md MD5 -pass env:BP -"$CIPHER" -in "$f" 2>/dev/null \
            | pigz -d -z > "$out" ;;
    gzip) gzip -d < "$f" > "$out" ;;
    plain) cp "$f" "$out" ;;
  esac
  n=$((n + 1))
  f="$base.$(printf %03d $n)"
done
tar -M --new-volume-script="$NEWVOL" -xf "dec/$base.000" -C "$OUT"
"""


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[mb.VmSpec], Path]:
    root = tmp_path_factory.mktemp("sample2")
    vms, home = mb.make_sample_tree(root / "tree", image_mb=2)
    # As on a real R2 dom0, icon.png is a symlink into /usr/share/qubes/icons:
    # R2 stored symlinks as such, and tar's --xform rewrote some targets.
    for vm in vms:
        if vm.name in ("work", "fedora-23") and vm.source is not None:
            (vm.source / "icon.png").unlink()
            (vm.source / "icon.png").symlink_to(f"/usr/share/qubes/icons/{vm.label}.png")
    return vms, home


def sh(script: str, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dash", "-c", script, "recover", *args], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          check=False)


def outer_members(backup: Path) -> list[str]:
    proc = subprocess.run(["tar", "-i", "-tf", str(backup)], capture_output=True,
                          text=True, check=True)
    return proc.stdout.splitlines()


def stored_names(members: list[str]) -> list[str]:
    names: list[str] = []
    for member in members:
        match = CHUNK_RE.match(member)
        if match and match["base"] not in names:
            names.append(match["base"])
    return names


def recover(backup: Path, work: Path, *, alg: str, cipher: str, mode: str) -> Path:
    """The whole hand procedure; returns the folder holding the restored files."""
    extract, out = work / "x", work / "out"
    extract.mkdir()
    out.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup)], cwd=extract, check=True)
    newvol = work / "new-volume-script"
    newvol.write_text(NEW_VOLUME, encoding="ascii")
    newvol.chmod(0o755)
    env = {"BP": PASSPHRASE, "ALG": alg, "CIPHER": cipher, "MODE": mode,
           "NEWVOL": str(newvol), "OUT": str(out)}
    for name in stored_names(outer_members(backup)):
        proc = sh(RECOVER_FILE, name, cwd=extract, env=env)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    return out


def read_header(backup: Path, work: Path) -> dict[str, str]:
    """Verify backup-header's HMAC (SHA512 as the page says, else SHA1), then parse it."""
    hdr = work / "hdr"
    hdr.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup), "backup-header", "backup-header.hmac"],
                   cwd=hdr, check=True)
    want = (hdr / "backup-header.hmac").read_text().strip().split("= ", 1)[1]
    for alg in ("sha512", "sha1"):
        got = subprocess.run(["openssl", "dgst", "-" + alg, "-hmac", PASSPHRASE],
                             stdin=(hdr / "backup-header").open("rb"), capture_output=True,
                             text=True, check=True).stdout.strip().split("= ", 1)[1]
        if got == want:
            break
    else:
        raise AssertionError("backup-header HMAC matches neither SHA512 nor SHA1")
    lines = (hdr / "backup-header").read_text(encoding="ascii").splitlines()
    return dict(line.split("=", 1) for line in lines)


def assert_same_as_sources(manifest: mb2.BackupManifestV2, out: Path) -> None:
    expected = mb2.expected_members_v2(manifest)
    names = {entry["name"] for entry in expected} | {"qubes.xml"}
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            found.add(os.path.normpath(os.path.relpath(os.path.join(dirpath, name), out)))
    assert found >= {os.path.normpath(n) for n in names}
    # Only the stored names and their parent folders, nothing else.
    parents = {os.path.normpath(str(p)) for n in names for p in Path(n).parents} - {"."}
    assert found == {os.path.normpath(n) for n in names} | parents
    assert (out / "qubes.xml").read_text(encoding="utf-8") == manifest.qubes_xml
    for entry in expected:
        path = out / entry["name"]
        if entry["type"] == "symlink":
            assert os.readlink(path) == entry["target"], entry["name"]
        elif entry["type"] == "dir":
            assert path.is_dir() and not path.is_symlink(), entry["name"]
        else:
            data = path.read_bytes()
            assert len(data) == entry["size"], entry["name"]
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
    # Holes stay holes: the 2 MiB sparse image holds ~180 KiB of data.
    for stored in manifest.files:
        if stored.name.endswith("/private.img"):
            img = out / stored.name
            assert img.stat().st_blocks * 512 < img.stat().st_size // 2, stored.name


def assert_multivolume(manifest: mb2.BackupManifestV2, dec: Path) -> None:
    """Volumes are exactly tape-length bytes (but the last), and volume 2
    onwards starts with a GNU multi-volume continuation header (type 'M')."""
    size = TAPE_KIB * 1024
    multi = [f for f in manifest.files if f.chunks >= 3]
    assert multi, "no stored file spans 3 volumes: the test lost its multi-chunk case"
    for stored in multi:
        vols = [Path(os.path.join(dec, n)) for n in stored.chunk_names()]
        assert all(v.stat().st_size == size for v in vols[:-1]), stored.name
        for vol in vols[1:]:
            assert vol.read_bytes()[156:157] == b"M", vol


CASES = {
    # name: (variant, encrypted, compressed, hmac, mode)
    "r2-encrypted": ("r2", True, False, "SHA512", "enc"),
    "r2-encrypted-sha1": ("r2", True, False, "SHA1", "enc"),
    "r2-compressed": ("r2", False, True, "SHA512", "gzip"),
    "r2-plain": ("r2", False, False, "SHA512", "plain"),
    "beta3-encrypted": ("beta3", True, False, "md5", "enc"),
    "beta3-encrypted-compressed": ("beta3", True, True, "md5", "zlib"),
    "beta3-compressed": ("beta3", False, True, "md5", "gzip"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recover_by_hand(case: str, sample: tuple[list[mb.VmSpec], Path],
                         tmp_path: Path) -> None:
    variant, encrypted, compressed, hmac, mode = CASES[case]
    vms, home = sample
    backup = tmp_path / "qubes-backup"
    manifest = mb2.make_backup_v2(
        backup, PASSPHRASE, vms, dom0_home=home, variant=variant, encrypted=encrypted,
        compressed=compressed, hmac_algorithm=hmac if variant == "r2" else "SHA512",
        tape_length_kib=TAPE_KIB,
    )
    members = outer_members(backup)
    assert members == manifest.member_names()
    if variant == "r2":
        assert members[:4] == ["backup-header", "backup-header.hmac",
                               "qubes.xml.000", "qubes.xml.000.hmac"]
        header = read_header(backup, tmp_path)
        assert header == {"hmac-algorithm": hmac, "crypto-algorithm": "aes-256-cbc",
                          "encrypted": str(encrypted), "compressed": str(compressed)}
        assert "version" not in header
    else:
        assert members[0] == "qubes.xml.000"  # R2-Beta3: no header at all
    # Names hidden exactly when encrypted (qvm-backup's hide_vm_names=encrypt).
    prefix = "vm7/" if encrypted else "appvms/work/"
    assert f"{prefix}private.img.000" in members
    assert ("vm3/..000" if encrypted else "vm-templates/fedora-23/..000") in members
    assert "dom0-home/user.000" in members

    out = recover(backup, tmp_path, alg=hmac, cipher="aes-256-cbc", mode=mode)
    assert_same_as_sources(manifest, out)
    assert_multivolume(manifest, tmp_path / "x" / "dec")
    if mode == "plain":
        # Raw chunks are the tar volumes themselves.
        first = tmp_path / "x" / f"{prefix}private.img.000"
        assert first.read_bytes()[257:263] == b"ustar "
    links = {e["name"]: e["target"] for e in mb2.expected_members_v2(manifest)
             if e["type"] == "symlink"}
    tpl = "vm3" if encrypted else "vm-templates/fedora-23"
    # A template is stored as "DIR/." with --xform 's:^.:SUBDIR\0:' in R2, so
    # even its absolute symlink targets got the prefix; Beta3's 's:^[^/]:...'
    # left absolute targets alone but prefixed relative ones.
    if variant == "r2":
        assert links[f"{tpl}/./icon.png"] == f"{tpl}//usr/share/qubes/icons/black.png"
        assert links["dom0-home/user/notes-link"] == "Documents/Grüße notes.txt"
    else:
        assert links[f"{tpl}/./icon.png"] == "/usr/share/qubes/icons/black.png"
        assert links["dom0-home/user/notes-link"] == "dom0-home/Documents/Grüße notes.txt"
    assert links[f"{prefix}icon.png"] == "/usr/share/qubes/icons/blue.png"
    if mode == "zlib":
        assert manifest.zlib_via in ("openssl -z", "pigz -z")


def test_tampered_chunk_fails_the_hmac_step(sample: tuple[list[mb.VmSpec], Path],
                                            tmp_path: Path) -> None:
    vms, home = sample
    backup = tmp_path / "b"
    mb2.make_backup_v2(backup, PASSPHRASE, vms, dom0_home=home, tape_length_kib=TAPE_KIB)
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup)], cwd=extract, check=True)
    chunk = extract / "vm7" / "private.img.001"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    proc = sh(RECOVER_FILE, "vm7/private.img", cwd=extract,
              env={"BP": PASSPHRASE, "ALG": "SHA512", "CIPHER": "aes-256-cbc",
                   "MODE": "enc", "NEWVOL": "/nonexistent", "OUT": str(tmp_path)})
    assert proc.returncode == 2
    assert "HMAC mismatch: vm7/private.img.001" in proc.stderr


def test_r2_refuses_encrypted_and_compressed(sample: tuple[list[mb.VmSpec], Path],
                                             tmp_path: Path) -> None:
    vms, _ = sample
    with pytest.raises(ValueError, match="refused compressed and encrypted"):
        mb2.make_backup_v2(tmp_path / "b", PASSPHRASE, vms, encrypted=True, compressed=True)
    assert not (tmp_path / "b").exists()


def test_cli_writes_manifest_and_contents(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "make_backup_v2.py"), str(tmp_path / "b"),
         "--passphrase-file", str(pw), "--sample", str(tmp_path / "tree"), "--image-mb", "2",
         "--tape-length", "30", "--no-encrypt", "--compress",
         "--manifest", str(tmp_path / "m.json"), "--contents", str(tmp_path / "c.json")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert manifest["volume_size"] == 30 * 1024
    assert manifest["header"]["compressed"] == "True"
    assert manifest["member_names"] == outer_members(tmp_path / "b")
    contents = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert {"stored": "appvms/work/private.img", "name": "appvms/work/private.img"}.items() \
        <= next(e for e in contents if e["name"] == "appvms/work/private.img").items()
