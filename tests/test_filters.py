"""Every compression filter Qubes accepts, on backups written with it (issue 16 item 4).

The backups come from scripts/make_backup.py (format 3: ``tar
--use-compress-program=FILTER``, as R2-R3.2) and make_backup_v4.py (format 4:
R4's tarwriter piped through the bare FILTER program, GNU tar for the rest),
each running the real compressor.  A filter is skipped only where its
program is not installed (.ci/run installs every one of them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PASSPHRASE, MakeBackup, assert_restored, bin_dir, run_main
from helpers import untar

from qrecover.packages import PACKAGES
from qrecover.stages.decompress import FILTERS, check_filter, decompress_stage

ALL = ("gzip", "bzip2", "xz", "lzma", "pbzip2", "pigz", "zstd", "zstdmt")


def _need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed here (apt-get install {program})")


def test_the_table_holds_every_filter_qubes_accepts() -> None:
    assert set(FILTERS) == set(ALL)
    for name, spec in FILTERS.items():
        # the package a missing program is reported with is the table's
        assert PACKAGES[spec.argv[0]].startswith(spec.package), name


@pytest.mark.parametrize(
    ("value", "program", "argv"),
    [
        ("zstdmt", "zstdmt", ("zstd", "-d", "-q")),
        ("pbzip2", "pbzip2", ("bzip2", "-d")),
        ("lzma", "lzma", ("xz", "--format=lzma", "-d")),
        ("GZIP -3", "gzip -3", ("gzip", "-d")),
        ("bzip2 --best", "bzip2 --best", ("bzip2", "-d")),
        ("zstd -19", "zstd -19", ("zstd", "-d", "-q")),
    ],
)
def test_filter_and_level_mean_the_tables_argv(
    value: str, program: str, argv: tuple[str, ...]
) -> None:
    assert check_filter(value) == program

    class _Header:
        filter = program.split(" ")[0]

    stage = decompress_stage(_Header())
    assert stage is not None and stage.argv == argv


@pytest.mark.parametrize(
    "value",
    ["gzip -3 -f", "gzip --rsyncable", "sh -c", "zstd -T0", "gzip -10", "xz -e", "cat", "gzip  -3"],
)
def test_anything_but_one_level_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="compression"):
        check_filter(value)


@pytest.mark.parametrize("compression", [*ALL, "gzip -3", "bzip2 --best"])
def test_format3_restores_a_backup_written_with(
    make: MakeBackup, tmp_path: Path, compression: str
) -> None:
    _need(compression.split(" ")[0])
    backup = make(compression=compression)
    assert backup.manifest.header["compression-filter"] == compression
    out = tmp_path / "out"
    result = run_main("restore", backup.path, "--passphrase-file", backup.passfile, "--output", out)
    assert result.code == 0, result.text
    assert_restored(out, backup)


@pytest.mark.parametrize("compression", ALL)
def test_format4_restores_a_backup_written_with(
    make4: MakeBackup, tmp_path: Path, compression: str
) -> None:
    _need(compression)
    backup = make4(compression=compression)
    assert backup.manifest.header["compression-filter"] == compression
    out = tmp_path / "out"
    result = run_main("restore", backup.path, "--passphrase-file", backup.passfile, "--output", out)
    assert result.code == 0, result.text
    assert_restored(out, backup)


def _resign_header(folder: Path, text: str) -> None:
    """Rewrite a format-3 header and HMAC it as Qubes did (openssl dgst -hmac)."""
    (folder / "backup-header").write_text(text, encoding="ascii")
    with (folder / "backup-header").open("rb") as src, (folder / "backup-header.hmac").open(
        "wb"
    ) as dst:
        subprocess.run(
            ["openssl", "dgst", "-sha512", "-hmac", PASSPHRASE], stdin=src, stdout=dst, check=True
        )


@pytest.mark.parametrize("value", ["gzip -3 -f", "sh -c x", "gzip --rsyncable"])
def test_a_filter_with_other_arguments_is_refused_exit_4(
    make: MakeBackup, tmp_path: Path, value: str
) -> None:
    backup = make(compression="gzip -3")
    folder = untar(backup.path, tmp_path / "untarred")
    text = (folder / "backup-header").read_text(encoding="ascii")
    assert "compression-filter=gzip -3\n" in text
    bad = text.replace("compression-filter=gzip -3", f"compression-filter={value}")
    _resign_header(folder, bad)
    out = tmp_path / "out"
    result = run_main("restore", folder, "--passphrase-file", backup.passfile, "--output", out)
    assert result.code == 4, result.text
    assert "compression-filter" in result.err and value in result.err, result.err
    assert "Traceback" not in result.text
    assert not out.exists() or not any(out.iterdir())


def test_info_shows_the_level_the_header_names(make: MakeBackup) -> None:
    backup = make(compression="gzip -3")
    result = run_main("info", backup.path, "--passphrase-file", backup.passfile, "--json")
    assert result.code == 0, result.text
    assert '"compression-filter": "gzip -3"' in result.out


def test_zstd_missing_is_exit_5_naming_its_package(make4: MakeBackup, tmp_path: Path) -> None:
    backup = make4(compression="zstdmt")
    bindir = bin_dir(tmp_path, ["tar", "gzip", "cat", "openssl", "scrypt"])
    result = run_main(
        "verify", backup.path, "--passphrase-file", backup.passfile, env={"PATH": str(bindir)}
    )
    assert result.code == 5, result.text
    assert "zstd" in result.err and "install" in result.err, result.err


@pytest.mark.parametrize(("fmt", "compression"), [(3, "gzip -3"), (3, "pbzip2"), (4, "zstdmt")])
def test_scripts_read_these_headers_too(
    make: MakeBackup, make4: MakeBackup, tmp_path: Path, fmt: int, compression: str
) -> None:
    _need(compression.split(" ")[0])
    backup = (make if fmt == 3 else make4)(compression=compression)
    out = tmp_path / "out"
    result = run_main("script", backup.path, "--passphrase-file", backup.passfile, "--output", out)
    assert result.code == 0, result.text
    script = tmp_path / "recover.sh"
    script.write_text(result.out, encoding="utf-8")
    env = {**os.environ, "backup_pass": PASSPHRASE}
    run = subprocess.run(["dash", str(script)], env=env, capture_output=True, check=False)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert_restored(out, backup)
