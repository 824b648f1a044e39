"""qrecover.formats.v4.chunk_pool with the real scrypt: order, concurrency, failure, cancel.

Chunks are written by ``scrypt enc`` at a cheap cost (``--logN`` small),
except where a test needs a chunk to be slower than the ones after it.
Concurrency is observed from /proc: the scrypt processes that are children
of this test process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrecover import signals
from qrecover.errors import EXIT_OUTPUT
from qrecover.formats.v4.chunk_pool import ChunkJob, ChunkPool, Decrypted, Failed
from qrecover.formats.v4.scrypt_cost import InsufficientMemory, JobPlan, MiB, read_params
from qrecover.formats.v4.scrypt_tool import ScryptTool
from qrecover.runner import Stage

PASS = "the passphrase ünï"
BACKUP_ID = "20261202T120000-1"
TOOL = ScryptTool("env")


def prefix(group: str, index: int) -> str:
    return f"{BACKUP_ID}!{group}.{index:03d}!"


def make_chunk(tmp: Path, group: str, index: int, log_n: int, data: bytes) -> Path:
    """Encrypt ``data`` as R4 did a chunk: its own passphrase prefix and salt."""
    plain = tmp / f"in-{group.replace('/', '_')}-{index}"
    plain.write_bytes(data)
    enc = tmp / f"{plain.name}.enc"
    subprocess.run(
        ["scrypt", "enc", "--logN", str(log_n), "-r", "8", "-p", "1",
         "--passphrase", "env:backup_pass", str(plain), str(enc)],
        env={**os.environ, "backup_pass": prefix(group, index) + PASS}, check=True,
    )
    return enc


def job(group: str, index: int, src: Path, owned: bool = False) -> ChunkJob:
    name = f"{group}.{index:03d}.enc"
    return ChunkJob(group, index, name, prefix(group, index), src, owned, read_params(src, name))


def plan(jobs: int) -> JobPlan:
    return JobPlan(jobs=jobs, budget=8 << 30, per_job=64 * MiB, limited_by="request")


def scrypt_children() -> set[int]:
    """Live scrypt processes whose parent is this test process."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if comm == "scrypt" and int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry.name))
    return found


class Sampler:
    """Samples, in a thread, the scrypt children and the files in a folder."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.most_scrypts = 0
        self.most_files = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = scrypt_children()
            self.pids |= pids
            self.most_scrypts = max(self.most_scrypts, len(pids))
            if self.folder is not None and self.folder.exists():
                self.most_files = max(self.most_files, len(list(self.folder.iterdir())))
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def feed_all(pool: ChunkPool, jobs: list[ChunkJob]) -> Iterator[Decrypted | Failed]:
    """The engine's loop: admit, submit, take what is ready, then drain."""
    for j in jobs:
        yield from pool.admit()
        pool.submit(j)
        yield from pool.ready()
    yield from pool.drain()


def test_released_in_order_though_later_chunks_finish_first(tmp_path: Path) -> None:
    datas = [os.urandom(200_000 + i) for i in range(5)]
    # chunk 0 costs 2^16 (about 64 times the others): it finishes last
    srcs = [make_chunk(tmp_path, "vm1/private.img", i, 16 if i == 0 else 10, d)
            for i, d in enumerate(datas)]
    started: list[tuple[int, Stage]] = []
    with ChunkPool(TOOL, PASS, tmp_path, plan(2),
                   on_start=lambda j, s: started.append((j.index, s))) as pool:
        outcomes = list(feed_all(pool, [job("vm1/private.img", i, s) for i, s in enumerate(srcs)]))
        assert all(isinstance(o, Decrypted) for o in outcomes)
        got = [o for o in outcomes if isinstance(o, Decrypted)]
        assert [o.job.index for o in got] == [0, 1, 2, 3, 4]
        assert [o.plain.read_bytes() for o in got] == datas
        # later chunks were done before chunk 0, and still waited for it
        assert min(o.finished for o in got[1:]) < got[0].finished
        assert pool.peak_running == 2
    # each scrypt dec ran with its own cap and the passphrase not in its argv
    for index, stage in started:
        array = 128 * 8 * 2 ** (16 if index == 0 else 10)
        assert stage.argv[:4] == ("scrypt", "dec", "-M", str(array))
        assert PASS not in " ".join(stage.argv) and stage.secret_env == ("backup_pass",)
    assert not pool.dir.exists()


def test_at_most_n_scrypt_at_once_and_scratch_bounded(tmp_path: Path) -> None:
    srcs = [make_chunk(tmp_path, "vm2/root.img", i, 14, os.urandom(300_000)) for i in range(7)]
    with ChunkPool(TOOL, PASS, tmp_path, plan(2)) as pool:
        # copies in the pool's scratch, as from a stream: the pool removes them
        jobs = []
        with Sampler(pool.dir) as seen:
            for i, src in enumerate(srcs):
                outcomes = pool.admit()
                copy = pool.input_path()
                copy.write_bytes(src.read_bytes())
                jobs.append(job("vm2/root.img", i, copy, owned=True))
                assert pool.submit(jobs[-1])
                for o in [*outcomes, *pool.ready()]:
                    assert isinstance(o, Decrypted)
                    o.plain.unlink()  # fed: the caller removes it
            for o in pool.drain():
                assert isinstance(o, Decrypted)
                o.plain.unlink()
        assert seen.most_scrypts == 2 == pool.peak_running
        # window 3 (jobs + 1): running ones hold input and output
        assert 3 <= seen.most_files <= 2 * 2 + 2
        assert list(pool.dir.iterdir()) == []
    assert not pool.dir.exists()


def test_passphrase_on_stdin_for_scrypt_1_2_style(tmp_path: Path) -> None:
    datas = [b"first chunk", b"second chunk"]
    srcs = [make_chunk(tmp_path, "vm9/private.img", i, 10, d) for i, d in enumerate(datas)]
    started: list[Stage] = []
    with ChunkPool(ScryptTool("stdin"), PASS, tmp_path, plan(2),
                   on_start=lambda j, s: started.append(s)) as pool:
        got = list(feed_all(pool, [job("vm9/private.img", i, s) for i, s in enumerate(srcs)]))
        assert [o.plain.read_bytes() for o in got if isinstance(o, Decrypted)] == datas
    assert all("-P" in s.argv and s.secret_env == () for s in started)


def test_a_chunk_over_the_whole_budget_is_refused(tmp_path: Path) -> None:
    src = make_chunk(tmp_path, "vm8/private.img", 0, 14, b"big")
    one = job("vm8/private.img", 0, src)
    small = JobPlan(jobs=2, budget=one.params.rss - 1, per_job=one.params.rss, limited_by="memory")
    with ChunkPool(TOOL, PASS, tmp_path, small) as pool, pytest.raises(InsufficientMemory) as info:
        pool.admit()
        pool.submit(one)
    assert info.value.exit_code == EXIT_OUTPUT and "vm8/private.img.000.enc" in str(info.value)
    assert scrypt_children() == set()


def test_memory_budget_limits_jobs_below_the_count(tmp_path: Path) -> None:
    srcs = [make_chunk(tmp_path, "vm3/private.img", i, 14, b"y" * 70_000) for i in range(4)]
    need = read_params(srcs[0], "c").rss
    tight = JobPlan(jobs=4, budget=need * 2 + need // 2, per_job=need, limited_by="cores")
    with ChunkPool(TOOL, PASS, tmp_path, tight) as pool:
        got = list(feed_all(pool, [job("vm3/private.img", i, s) for i, s in enumerate(srcs)]))
        assert [o.job.index for o in got] == [0, 1, 2, 3]
        assert pool.peak_running == 2  # two fit in the budget, four were allowed


def test_tampered_chunk_stops_its_file_there_and_nothing_of_it_is_released(tmp_path: Path) -> None:
    datas = [os.urandom(150_000) for _ in range(6)]
    srcs = [make_chunk(tmp_path, "vm4/private.img", i, 12, d) for i, d in enumerate(datas)]
    other = [make_chunk(tmp_path, "vm5/private.img", i, 10, b"ok%d" % i) for i in range(2)]
    # one byte of chunk 2's ciphertext flipped: only its final HMAC tells
    raw = bytearray(srcs[2].read_bytes())
    raw[5000] ^= 0x01
    srcs[2].write_bytes(raw)
    jobs = [job("vm4/private.img", i, s) for i, s in enumerate(srcs)]
    jobs += [job("vm5/private.img", i, s) for i, s in enumerate(other)]
    with ChunkPool(TOOL, PASS, tmp_path, plan(2), window=8) as pool:
        with Sampler(pool.dir) as seen:
            outcomes = list(feed_all(pool, jobs))
        kinds = [(type(o).__name__, o.job.group, o.job.index) for o in outcomes]
        assert kinds == [
            ("Decrypted", "vm4/private.img", 0),
            ("Decrypted", "vm4/private.img", 1),
            ("Failed", "vm4/private.img", 2),
            ("Decrypted", "vm5/private.img", 0),  # the other stored file goes on
            ("Decrypted", "vm5/private.img", 1),
        ]
        failed = outcomes[2]
        assert isinstance(failed, Failed) and failed.result is not None
        assert failed.result.returncode != 0 and "scrypt exited" in failed.error
        assert pool.stopped("vm4/private.img") and not pool.stopped("vm5/private.img")
        # nothing of chunk 2 or later is left in scratch; 0 and 1 are the caller's
        left = sorted(p.name for p in pool.dir.iterdir())
        kept = sorted(o.plain.name for o in outcomes if isinstance(o, Decrypted))
        assert left == kept
        first = [o for o in outcomes[:2] if isinstance(o, Decrypted)]
        assert [o.plain.read_bytes() for o in first] == datas[:2]
        # a later chunk of the stopped file is refused, and its copy removed
        late = pool.input_path()
        late.write_bytes(srcs[5].read_bytes())
        assert pool.submit(job("vm4/private.img", 5, late, owned=True)) is False
        assert not late.exists()
        assert seen.most_scrypts <= 2
    assert not pool.dir.exists() and scrypt_children() == set()


def test_interrupt_kills_every_scrypt_and_removes_all_scratch(tmp_path: Path) -> None:
    """The handler only records the signal; the pool's wait for an outcome is a
    natural point where it is raised, and the clean-up kills what runs."""
    srcs = [make_chunk(tmp_path, "vm6/private.img", i, 17, b"z" * 100_000) for i in range(3)]

    # how long one of these takes when left alone (under this machine's load)
    began = time.monotonic()
    subprocess.run(["scrypt", "dec", "--passphrase", "env:backup_pass", str(srcs[0]),
                    str(tmp_path / "alone")], env={**os.environ, "backup_pass":
                    prefix("vm6/private.img", 0) + PASS}, check=True)
    alone = time.monotonic() - began

    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with signals.handled():
            pool = ChunkPool(TOOL, PASS, tmp_path, plan(2))
            with Sampler() as seen, pytest.raises(KeyboardInterrupt), pool:
                for i, src in enumerate(srcs):
                    pool.admit()
                    copy = pool.input_path()
                    copy.write_bytes(src.read_bytes())
                    pool.submit(job("vm6/private.img", i, copy, owned=True))
                deadline = time.monotonic() + 20
                while len(scrypt_children()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                busy = scrypt_children()
                assert len(busy) == 2  # both slots busy, one queued
                # seen here, whether or not a loaded machine let the sampler thread look
                seen.pids |= busy
                signal.raise_signal(signal.SIGINT)  # recorded, not raised here
                stopped_at = time.monotonic()
                list(pool.drain())  # a 2^17 chunk takes far longer than the clean-up
            cleaned = time.monotonic() - stopped_at
    finally:
        signal.signal(signal.SIGINT, saved)
    # killed, not waited for: the clean-up takes a fraction of one chunk's time
    assert cleaned < alone / 2, (cleaned, alone)
    assert len(seen.pids) >= 2
    assert scrypt_children() == set()
    for pid in seen.pids:  # killed and reaped
        assert not Path(f"/proc/{pid}").exists()
    assert not pool.dir.exists()
    assert list(tmp_path.glob("chunks-*")) == []
