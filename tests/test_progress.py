"""Progress display and summary: pure formatting, then the CLI on a pseudo-terminal."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

from conftest import ROOT, Backup, MakeBackup, assert_restored, bin_dir, qrecover_exe, run_cli

from qrecover.errors import BackupError
from qrecover.events import Mode
from qrecover.progress import Display, summary_table
from qrecover.report import FileResult
from qrecover.units import human_bytes, human_duration, human_rate

MiB = 1024 * 1024
ERASE = "\x1b[2K"  # rich's "erase the line"


# -- pure functions ---------------------------------------------------------------


def test_human_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(659 * MiB) == "659.0 MiB"
    assert human_bytes(3 * 1024 * MiB) == "3.0 GiB"
    assert human_duration(None) == "--:--"
    assert human_duration(7.4) == "0:07"
    assert human_duration(754) == "12:34"
    assert human_duration(3723) == "1:02:03"
    assert human_rate(None) == "-- MiB/s" and human_rate(1.5 * MiB) == "1.5 MiB/s"


def test_summary_table_rows_and_statuses() -> None:
    ok = FileResult("vm7/private.img", "work", chunks=7, stored_bytes=659 * MiB)
    ok.restored_bytes = 2048 * MiB
    bad = FileResult(
        "vm8/private.img", "mail", chunks=2, stored_bytes=MiB, failure=BackupError("HMAC mismatch")
    )
    bad.places.append(Path("/o/mail/private.img.partial"))
    lost = FileResult("vm9/root.img", "other", failure=BackupError("openssl exited 1"))
    text = summary_table(Mode.RESTORE, [ok, bad, lost], 12.34)
    lines = text.splitlines()
    assert lines[0].split() == ["VM", "STORED", "FILE", "CHUNKS", "STORED", "RESTORED", "STATUS"]
    row = ["work", "vm7/private.img", "7", "659.0", "MiB", "2.0", "GiB", "restored"]
    assert lines[1].split() == row
    assert lines[2].endswith("FAILED (partial kept)") and lines[2].startswith("mail ")
    assert lines[3].endswith("FAILED") and lines[3].startswith("other")
    assert lines[4].startswith("total: 3 stored file(s), 2 failed, 660.0 MiB read in 0:12")
    assert "(12.3 s," in lines[4] and lines[4].endswith("2.0 GiB restored")
    verify = summary_table(Mode.VERIFY, [ok], 1.0).splitlines()
    assert verify[1].split()[-2:] == ["-", "verified"]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_summary_table_is_plain_text_in_fixed_columns() -> None:
    """Laid out by rich, byte for byte as before: columns two spaces apart, the
    numbers right-aligned under left-aligned headers, no colour, no trailing space."""
    ok = FileResult("vm7/private.img", "work", chunks=7, stored_bytes=659 * MiB)
    ok.restored_bytes = 2048 * MiB
    odd = FileResult("vm12/[bold]x", "", chunks=1234, stored_bytes=5)
    assert summary_table(Mode.RESTORE, [ok, odd], 7.6) == (
        "VM    STORED FILE      CHUNKS  STORED     RESTORED  STATUS\n"
        "work  vm7/private.img       7  659.0 MiB   2.0 GiB  restored\n"
        "-     vm12/[bold]x       1234        5 B       0 B  restored\n"
        "total: 2 stored file(s), 0 failed, 659.0 MiB read in 0:08 (7.6 s, 86.7 MiB/s), "
        "2.0 GiB restored"
    )
    assert summary_table(Mode.VERIFY, [], 0.0) == (
        "VM  STORED FILE  CHUNKS  STORED  RESTORED  STATUS\n"
        "total: 0 stored file(s), 0 failed, 0 B read in 0:00 (0.0 s, -- MiB/s)"
    )


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_display_throttles_redraws_and_clears() -> None:
    out = io.StringIO()
    clock = _Clock()
    display = Display(out, 1000 * MiB, clock=clock, width=120)
    display.data_read("qubes.xml", 4096)  # before any stored file: counted, not drawn
    assert out.getvalue() == ""
    display.file_started("vm7/private.img", "work")
    for _ in range(50):  # many blocks within the same 0.1 s: one redraw
        display.data_read("vm7/private.img", MiB)
        clock.now += 0.001
    assert out.getvalue().count("work vm7/private.img") == 1
    clock.now += 0.1
    display.in_flight(2)
    display.data_read("vm7/private.img", MiB)
    drawn = out.getvalue()
    assert drawn.count("work vm7/private.img") == 2
    last = drawn.split(ERASE)[-1]
    assert "work vm7/private.img" in last and " 51.0 MiB (2 in flight) | " in last
    assert "51.0/1,000.0 MiB" in last and "ETA" in last and "\n" not in last
    display.file_done(FileResult("vm7/private.img", "work"))
    assert out.getvalue().endswith(ERASE)  # erased: what follows starts on a clean line
    erased = out.getvalue()
    display.clear()  # nothing shown any more: nothing written
    assert out.getvalue() == erased


def test_display_stays_one_line_on_a_narrow_terminal() -> None:
    out = io.StringIO()
    clock = _Clock()
    display = Display(out, 5 * 1024 * MiB, clock=clock, width=80)
    display.file_started("vm7/private.img", "a-vm-name-long-enough-to-fill-half-the-line")
    display.data_read("vm7/private.img", 21 * MiB)
    line = out.getvalue().split("\x1b[?25l")[-1]  # drawn after rich hides the cursor
    assert "\n" not in line
    assert "a-vm-name-long-enough-to-fill" in line and "… 21.0 MiB | " in line  # it gives way
    assert "/5.0 GiB" in line and "ETA" in line


def test_display_estimates_total_from_qubes_xml_when_reading_a_pipe() -> None:
    class Vm:
        size = 300 * MiB

    display = Display(io.StringIO(), None, width=120)
    display.planned([Vm(), Vm()])  # type: ignore[list-item]
    assert display.total == 600 * MiB and display.estimated


# -- the CLI ---------------------------------------------------------------------


def _run_with_tty_stderr(*args: str | Path) -> tuple[int, str, str]:
    """Run qrecover with stderr on a pseudo-terminal and stdout on a pipe."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*qrecover_exe(), *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        # a terminal of 120 columns (an unsized pty counts as 80, where a long
        # name is cut short: tested in test_display_stays_one_line_on_a_narrow_terminal)
        env={**{k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"},
             "COLUMNS": "120"},
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    assert proc.stdout is not None
    out = proc.stdout.read().decode("utf-8", "replace")
    code = proc.wait(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    return code, out, b"".join(chunks).decode("utf-8", "replace")


def test_progress_on_a_terminal_not_with_quiet(default_backup: Backup, tmp_path: Path) -> None:
    pf = default_backup.passfile
    code, out, err = _run_with_tty_stderr(
        "restore", default_backup.path, "-o", tmp_path / "a", "--passphrase-file", pf
    )
    assert code == 0, out + err
    assert ERASE in err and "private.img" in err and "ETA" in err and " | " in err
    assert "\x1b[" not in out  # the live line never goes to stdout
    assert "all HMACs matched" in out and "STATUS" in out

    code, out, err = _run_with_tty_stderr(
        "--quiet", "restore", default_backup.path, "-o", tmp_path / "b", "--passphrase-file", pf
    )
    assert code == 0, out + err
    assert ERASE not in err and "ETA" not in err
    assert "STATUS" not in out and "total:" not in out  # no summary either
    assert "RESTORED" in out and "all HMACs matched" in out


def test_no_progress_without_a_terminal_but_a_summary(
    default_backup: Backup, tmp_path: Path
) -> None:
    result = run_cli(
        "restore", default_backup.path, "-o", tmp_path / "o", "--passphrase-file",
        default_backup.passfile,
    )  # fmt: skip
    assert result.code == 0, result.text
    assert "\x1b[" not in result.err and "ETA" not in result.err
    rows = _summary_rows(result.out)
    stored = [f for f in default_backup.manifest.files if f.name != "qubes.xml"]
    assert len(rows) == len(stored)
    for f in stored:
        assert rows[f.name][0] == f.vm and rows[f.name][-1] == "restored", f.name
    assert "total: " in result.out and "failed" in result.out
    assert result.out.rstrip().splitlines()[-1].endswith("every stage succeeded")

    verify = run_cli("verify", default_backup.path, "--passphrase-file", default_backup.passfile)
    assert verify.code == 0, verify.text
    rows = _summary_rows(verify.out)
    assert len(rows) == len(stored) and all(r[-1] == "verified" for r in rows.values())


def _summary_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["VM", "STORED", "FILE"])
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("total:"):
            break
        cells = line.split()
        rows[cells[1]] = [cells[0], *cells[2:]]
    return rows


def test_summary_marks_the_damaged_file(make: MakeBackup, tmp_path: Path) -> None:
    backup = make(chunk_size=16 * 1024)
    folder = tmp_path / "untarred"
    folder.mkdir()
    subprocess.run(["tar", "-i", "-xf", str(backup.path), "-C", str(folder)], check=True)
    victim = folder / "vm7" / "private.img.001"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = run_cli("restore", folder, "-o", out, "--passphrase-file", backup.passfile)
    assert result.code == 4, result.text
    rows = _summary_rows(result.out)
    assert rows["vm7/private.img"][-3:] == ["FAILED", "(partial", "kept)"]
    others = [r for name, r in rows.items() if name != "vm7/private.img"]
    assert others and all(r[-1] == "restored" for r in others)
    assert "1 failed" in result.out


def test_fastest_gunzip_installed_is_used(default_backup: Backup, tmp_path: Path) -> None:
    """igzip, else pigz, else gzip (.ci/run installs all three)."""
    base = ["tar", "cat", "openssl", "gzip"]
    choices = (
        (base, "gzip -d"),
        ([*base, "pigz"], "pigz -d"),
        ([*base, "igzip"], "igzip -d"),
        ([*base, "pigz", "igzip"], "igzip -d"),
    )
    for programs, used in choices:
        run_dir = tmp_path / "-".join(programs[len(base) :] or ["none"])
        run_dir.mkdir()
        result = run_cli(
            "-v", "restore", default_backup.path, "-o", run_dir / "out",
            "--passphrase-file", default_backup.passfile,
            env={"PATH": str(bin_dir(run_dir, programs))},
        )  # fmt: skip
        assert result.code == 0, result.text
        assert f"| {used} |" in result.err, result.err
        assert "all HMACs matched" in result.out
        assert_restored(run_dir / "out", default_backup)


def test_bench_smoke(tmp_path: Path) -> None:
    """scripts/bench runs end to end on a tiny backup and prints its table (not a timing)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "--size", "0.01", "--reps", "1",
         "--chunk-mib", "2", "--tty", "--cache", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for method in ("manual", "floor", "restore", "verify", "restore-tty", "restore-tty-quiet"):
        assert any(line.split()[:1] == [method] for line in proc.stdout.splitlines()), method
    assert "restore/floor = " in proc.stdout and "core(s)" in proc.stdout
