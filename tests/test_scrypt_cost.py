"""qrecover.formats.v4.scrypt_cost: a chunk's stated cost, the memory model, the job count.

Headers come from the real ``scrypt enc`` with chosen parameters; the memory
model is checked against the peak RSS the kernel reports for a real
``scrypt dec``; the ``-M`` qrecover passes is checked against scrypt itself.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import make_backup as gen  # the independent writers (scripts/, on the path by conftest)
import make_backup_v4 as gen4
import pytest

from qrecover.errors import EXIT_BACKUP, EXIT_OUTPUT, BackupError, OutputError
from qrecover.formats.v4.scrypt_cost import (
    HEADROOM,
    InsufficientMemory,
    Memory,
    MiB,
    ScryptParams,
    limit_args,
    maxmem,
    parse_meminfo,
    parse_params,
    plan_here,
    plan_jobs,
    read_memory,
    read_params,
    scrypt_ceiling,
)

SECRET = "prefix!pass phrase"


def enc(tmp: Path, name: str, log_n: int, r: int, p: int, data: bytes = b"x" * 1000) -> Path:
    src = tmp / f"{name}.plain"
    src.write_bytes(data)
    dst = tmp / f"{name}.enc"
    subprocess.run(
        ["scrypt", "enc", "--logN", str(log_n), "-r", str(r), "-p", str(p),
         "--passphrase", "env:backup_pass", str(src), str(dst)],
        env={**os.environ, "backup_pass": SECRET}, check=True,
    )
    return dst


def dec(src: Path, dst: Path, *extra: str) -> tuple[int, str]:
    """Run scrypt dec into ``dst``; return its exit code and stderr."""
    proc = subprocess.run(
        ["scrypt", "dec", *extra, "--passphrase", "env:backup_pass", str(src), str(dst)],
        env={**os.environ, "backup_pass": SECRET}, stderr=subprocess.PIPE, text=True,
    )
    return proc.returncode, proc.stderr


def peak_rss(src: Path, *extra: str) -> int:
    """Peak RSS of a real ``scrypt dec``: its VmHWM, read once it has written
    plaintext (the key derivation, where the peak is, is over) and while it
    waits on the full pipe.  Its own mm only: the rusage of a child started
    from Python would count the Python pages it was forked with."""
    proc = subprocess.Popen(
        ["scrypt", "dec", *extra, "--passphrase", "env:backup_pass", str(src)],
        env={**os.environ, "backup_pass": SECRET}, stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.read(1)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    proc.stdout.read()
    assert proc.wait() == 0
    (line,) = [ln for ln in status.splitlines() if ln.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


def with_params(header: bytes, log_n: int, r: int, p: int) -> bytes:
    """The header with other parameters and a checksum that matches them."""
    body = header[:7] + bytes([log_n]) + r.to_bytes(4, "big") + p.to_bytes(4, "big") + header[16:48]
    return body + hashlib.sha256(body).digest()[:16] + header[64:96]


@pytest.mark.parametrize(("log_n", "r", "p"), [(10, 8, 1), (14, 1, 3), (12, 32, 2)])
def test_parses_what_scrypt_enc_wrote(tmp_path: Path, log_n: int, r: int, p: int) -> None:
    params = read_params(enc(tmp_path, "c", log_n, r, p), "vm1/private.img.000.enc")
    assert params == ScryptParams(log_n, r, p)
    assert params.kdf_memory == 128 * r * 2**log_n


def test_model_bounds_the_measured_peak_and_m_is_the_least_scrypt_accepts(tmp_path: Path) -> None:
    for log_n, r, p in [(16, 8, 1), (14, 4, 8), (12, 32, 3)]:
        src = enc(tmp_path, f"m{log_n}", log_n, r, p, os.urandom(MiB))
        params = read_params(src, "c")
        peak = peak_rss(src, *limit_args(params))
        # the model is an upper bound, and not a loose one (within 2 MiB)
        assert params.kdf_memory < peak <= params.rss < peak + 2 * MiB
        code, err = dec(src, tmp_path / "out", *limit_args(params))
        assert code == 0, err
        code, err = dec(src, tmp_path / "out2", "-M", str(maxmem(params) - 1))
        assert code != 0 and "too much memory" in err


def _header(tmp: Path) -> bytes:
    return enc(tmp, "h", 10, 8, 1).read_bytes()[:96]


def test_damaged_and_absurd_headers_are_refused_naming_the_chunk(tmp_path: Path) -> None:
    good = _header(tmp_path)
    name = "vm3/root.img.007.enc"
    cases = {
        "no 'scrypt' magic": b"scrypx" + good[6:],
        "only format 0": good[:6] + b"\x01" + good[7:],
        "checksum": good[:7] + b"\x11" + good[8:],  # logN changed, checksum not
        "too short": good[:95],
        "invalid": with_params(good, 0, 8, 1),
        "more than any": with_params(good, 40, 8, 1),
    }
    for expected, data in cases.items():
        with pytest.raises(BackupError) as info:
            parse_params(data, name)
        assert info.value.exit_code == EXIT_BACKUP
        assert name in str(info.value) and expected in str(info.value)
    for log_n, r, p in [(64, 1, 1), (10, 0, 1), (10, 1, 0), (10, 1 << 15, 1 << 15)]:
        with pytest.raises(BackupError, match="invalid"):
            parse_params(with_params(good, log_n, r, p), name)
    with pytest.raises(BackupError, match="more than any"):
        parse_params(with_params(good, 20, 8, 1 << 20), name)  # hours of CPU
    # R4's usual cost passes, and scrypt agrees the re-checksummed header is well formed
    assert parse_params(with_params(good, 20, 8, 1), name) == ScryptParams(20, 8, 1)


def test_meminfo(tmp_path: Path) -> None:
    text = "MemTotal:       24683584 kB\nMemFree:  1000 kB\nMemAvailable:   24063116 kB\n"
    assert parse_meminfo(text) == Memory(24683584 * 1024, 24063116 * 1024)
    old_kernel = "MemTotal: 4000 kB\nMemFree: 1000 kB\nCached: 500 kB\n"
    assert parse_meminfo(old_kernel) == Memory(4000 * 1024, 1500 * 1024)
    real = read_memory()
    assert 0 < real.available <= real.total
    with pytest.raises(OutputError):
        read_memory(tmp_path / "missing")
    assert 0 < scrypt_ceiling(real.total) <= real.total // 2


R4 = ScryptParams(20, 8, 1)  # 1 GiB array


def mem(available_gib: float) -> Memory:
    return Memory(64 << 30, int(available_gib * (1 << 30)))


def test_jobs_are_the_least_of_request_cores_and_memory() -> None:
    ceiling = 32 << 30
    plan = plan_jobs(R4, "c", requested=None, cpus=2, memory=mem(16), ceiling=ceiling)
    assert (plan.jobs, plan.limited_by) == (2, "cores")
    plan = plan_jobs(R4, "c", requested=8, cpus=4, memory=mem(16), ceiling=ceiling)
    assert (plan.jobs, plan.limited_by) == (4, "cores")
    plan = plan_jobs(R4, "c", requested=1, cpus=4, memory=mem(16), ceiling=ceiling)
    assert (plan.jobs, plan.limited_by) == (1, "request")
    # 3.5 GiB less 512 MiB headroom is 3 GiB: two 1 GiB + 4 MiB scrypts fit, not three
    plan = plan_jobs(R4, "c", requested=None, cpus=8, memory=mem(3.5), ceiling=ceiling)
    assert (plan.jobs, plan.limited_by) == (2, "memory")
    assert plan.jobs * plan.per_job <= plan.budget == int(3.5 * (1 << 30)) - HEADROOM
    assert plan.per_job == R4.rss


def test_a_chunk_that_alone_does_not_fit_is_exit_6() -> None:
    with pytest.raises(InsufficientMemory) as info:
        plan_jobs(R4, "vm7/private.img.004.enc", requested=None, cpus=2,
                  memory=mem(1.25), ceiling=32 << 30)
    assert info.value.exit_code == EXIT_OUTPUT
    assert "vm7/private.img.004.enc" in str(info.value) and "logN=20" in str(info.value)
    assert info.value.hint is not None and "more RAM" in info.value.hint
    # enough MemAvailable, but scrypt allows itself only half of the RAM
    with pytest.raises(InsufficientMemory, match="half of the RAM"):
        plan_jobs(ScryptParams(22, 8, 1), "c", requested=None, cpus=2,
                  memory=Memory(6 << 30, 6 << 30), ceiling=3 << 30)


def test_generator_time1_writes_a_real_cost_that_parses(tmp_path: Path) -> None:
    """make_backup_v4 --kdf time1 (``scrypt enc -t 1``): every chunk's header
    states a real cost (far above the fast mode's logN 10), and parses here."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "private.img").write_bytes(os.urandom(50_000))
    costs: dict[str, set[ScryptParams]] = {}
    for kdf in ("fast", "time1"):
        out = tmp_path / f"backup-{kdf}"
        gen4.make_backup_v4(out, "pw", [gen.VmSpec("work", 7, source=src)], kdf=kdf,
                            workdir=tmp_path)
        with tarfile.open(out, ignore_zeros=True) as tar:  # members appended like tar -i reads
            for member in tar:
                if member.name.endswith(".enc") or member.name == "backup-header.hmac":
                    f = tar.extractfile(member)
                    assert f is not None
                    costs.setdefault(kdf, set()).add(parse_params(f.read(96), member.name))
    assert costs["fast"] == {ScryptParams(10, 8, 1)}
    assert costs["time1"] and all(p.log_n >= 14 and p.r == 8 for p in costs["time1"])


def _cgroup(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_a_memory_cgroup_tighter_than_meminfo_wins(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16777216 kB\nMemAvailable: 8388608 kB\n")  # 16 GiB, 8 free
    sys_v2, own = tmp_path / "v2", tmp_path / "self-cgroup"
    own.write_text("0::/machine/box/app\n")
    # the limit is on an ancestor: 3 GiB, 2 GiB used of which 512 MiB inactive file pages
    _cgroup(sys_v2 / "machine" / "box", {"memory.max": str(3 << 30), "memory.current":
            str(2 << 30), "memory.stat": f"anon 1\ninactive_file {512 << 20}\n"})
    _cgroup(sys_v2 / "machine" / "box" / "app", {"memory.max": "max", "memory.current": "5"})
    got = read_memory(meminfo, sys_v2, own)
    assert got == Memory(16 << 30, (1 << 30) + (512 << 20))
    # cgroup v1 in a namespace (its path not visible): the mount's root is ours
    sys_v1 = tmp_path / "v1"
    own.write_text("4:memory:/not/visible/here\n0::/\n")
    _cgroup(sys_v1 / "memory", {"memory.limit_in_bytes": str(6 << 30),
            "memory.usage_in_bytes": str(1 << 30), "memory.stat": "total_inactive_file 0\n"})
    assert read_memory(meminfo, sys_v1, own).available == 5 << 30
    # no limit (v1 writes 2^63 rounded down to pages): MemAvailable stands
    (sys_v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert read_memory(meminfo, sys_v1, own) == Memory(16 << 30, 8 << 30)
    assert read_memory(meminfo, sys_v1, tmp_path / "no-such-file") == Memory(16 << 30, 8 << 30)


def test_plan_here_asks_this_machine() -> None:
    plan = plan_here(ScryptParams(10, 8, 1), "c", requested=None)
    assert plan.jobs == len(os.sched_getaffinity(0))  # 1 MiB chunks: the cores decide
    now = read_memory()  # MemAvailable moves between two reads: compare loosely
    assert 0 < plan.budget <= now.total - HEADROOM
    assert abs(plan.budget - (now.available - HEADROOM)) < 1 << 30
    assert plan_here(ScryptParams(10, 8, 1), "c", requested=1).jobs == 1
