"""Shared test fixtures: backups written by scripts/make_backup.py, the installed CLI.

The suite runs on pytest-xdist workers (pyproject.toml).  The big backups are built
once per test run, not once per worker: ``built_once`` builds them in a folder beside
the workers' own, under a lock, and the other worker reads what was built."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar  # typing's Callable: a runtime alias (3.8)

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_backup as gen  # noqa: E402  (the independent writer, never qrecover code)
import make_backup_v2 as gen2  # noqa: E402  (the same, for Qubes R2's format 2)
import make_backup_v4 as gen4  # noqa: E402  (the same, for Qubes R4's format 4)
from helpers import PASSPHRASE, sha  # noqa: E402  (re-exported: many tests import them from here)


def qrecover_exe() -> list[str]:
    """The installed console script (``pip install .``), as a user would run it."""
    beside = Path(sys.executable).parent / "qrecover"  # the venv running these tests
    exe = str(beside) if beside.exists() else shutil.which("qrecover")
    if exe is None:
        raise RuntimeError("qrecover is not installed: run pip install -e '.[test]' first")
    return [exe]


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_cli(
    *args: str | Path,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> Run:
    full_env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    full_env.update(env or {})
    proc = subprocess.run(
        [*qrecover_exe(), *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return Run(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def run_main(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Run:
    """``qrecover ARGS`` as ``run_cli`` runs it, but in this process: ``cli.main``, the
    function the installed script calls, given the argv and the standard output and
    error the program would have (text streams encoded as Python encodes a pipe's),
    with the environment and folder of its own; all put back afterwards.  It saves the
    start of a Python process per run; ``run_cli`` stays for what only a separate
    process shows (signals, /proc, standard input, programs on PATH)."""
    from qrecover.cli import main

    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes)
    err = io.TextIOWrapper(err_bytes, errors="backslashreplace", line_buffering=True)
    code: int | str | None
    try:
        os.environ.pop("QRECOVER_PASSPHRASE", None)
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        try:
            main([str(a) for a in args], stdout=out, stderr=err)
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # what the interpreter would print, and its exit 1
            traceback.print_exc(file=err)
            code = 1
    finally:
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    out.flush()
    err.flush()
    return Run(
        code if isinstance(code, int) else (0 if code is None else 1),
        out_bytes.getvalue().decode("utf-8", "replace"),
        err_bytes.getvalue().decode("utf-8", "replace"),
    )


@dataclass
class Backup:
    path: Path
    passfile: Path
    manifest: Any
    vms: list[Any]
    dom0_home: Path | None

    def expected_files(self, vm_names: list[str] | None = None) -> dict[str, Path]:
        """Output-relative path -> source file, for every regular file the writer stored."""
        result: dict[str, Path] = {}
        for stored in self.manifest.files:
            if stored.vm is None or (vm_names is not None and stored.vm not in vm_names):
                continue
            source = Path(stored.source)
            if stored.vm == "dom0":
                base = f"dom0-home/{source.name}"
            elif stored.name.endswith("/."):
                base = stored.vm
            else:
                base = f"{stored.vm}/{source.name}"
            if source.is_dir():
                for path in source.rglob("*"):
                    if path.is_file() and not path.is_symlink():
                        result[f"{base}/{path.relative_to(source)}"] = path
            else:
                result[base] = source
        return result


def bin_dir(folder: Path, programs: list[str]) -> Path:
    """``folder/bin``: a PATH folder holding only ``programs`` (each installed)."""
    bindir = folder / "bin"
    bindir.mkdir()
    for program in programs:
        found = shutil.which(program)
        assert found is not None, f"{program} is not installed (.ci/run installs it)"
        os.symlink(found, bindir / program)
    return bindir


def children_of(pid: int) -> list[int]:
    """The processes that ``pid`` (any of its threads) started and that still exist."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    if tasks and not (tasks[0] / "children").exists():  # a kernel without CONFIG_PROC_CHILDREN
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[1]) == pid:
                        found.append(int(entry.name))
        return found
    for task in tasks:  # the fast way, quick enough to see short-lived children
        with contextlib.suppress(OSError):
            found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def family_of(pid: int) -> list[int]:
    """``pid`` and every process under it, as they are now."""
    family = [pid]
    for member in family:
        family.extend(children_of(member))
    return family


def marked_env() -> tuple[str, dict[str, str]]:
    """A mark, and an environment (without the passphrase variable) that carries
    it: every program a qrecover started with it runs inherits the mark, whatever
    session or process group it is in (qrecover gives each its own group)."""
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if k != "QRECOVER_PASSPHRASE"}
    env["QRECOVER_TEST_RUN"] = mark
    return mark, env


def marked_processes(mark: str) -> list[int]:
    """The live processes whose environment carries ``mark`` (a zombie has none;
    one that ends between two looks at /proc is simply not there)."""
    found = []
    needle = f"QRECOVER_TEST_RUN={mark}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
    return found


def left_after(mark: str, patience: float = 10) -> list[dict[str, str]]:
    """What of a finished run's programs is still there after ``patience`` seconds
    (a SIGKILL is delivered asynchronously: a process may take a moment to go);
    each described for the failure message, then killed."""
    deadline = time.monotonic() + patience
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = []
    for pid in left:
        what = {"pid": str(pid)}
        for name in ("cmdline", "wchan", "stat"):
            with contextlib.suppress(OSError):
                what[name] = Path(f"/proc/{pid}/{name}").read_bytes()[:300].decode(
                    "utf-8", "replace").replace("\0", " ")
        with contextlib.suppress(OSError):
            what["fds"] = repr({e.name: os.readlink(e.path)
                                for e in os.scandir(f"/proc/{pid}/fd")})
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        if what.get("cmdline"):  # a zombie is gone, only not yet reaped
            seen.append(what)
    return seen


@dataclass(frozen=True)
class Seen:
    """One process of a running qrecover's family, as /proc showed it."""

    pid: int
    comm: str
    cmdline: bytes
    environ: bytes


def look_at(pid: int) -> Seen | None:
    """What /proc shows of ``pid``; None if it has already gone."""
    try:
        proc = Path(f"/proc/{pid}")
        return Seen(
            pid,
            (proc / "comm").read_text().strip(),
            (proc / "cmdline").read_bytes(),
            (proc / "environ").read_bytes(),
        )
    except OSError:
        return None


def watch_family(proc: subprocess.Popen[bytes], timeout: float = 240) -> list[Seen]:
    """Look at ``proc`` and every process under it, over and over, until it ends."""
    seen: list[Seen] = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("qrecover did not finish in time")
        for pid in family_of(proc.pid):
            if (what := look_at(pid)) is not None:
                seen.append(what)
        time.sleep(0.001)  # a breath for the shared machine; children live far longer
    return seen



def reference(backup: Backup, out: Path, *extra: str | Path) -> None:
    """The backup restored by ``qrecover restore`` into ``out``: what a script or a
    transcript must restore too."""
    result = run_main(
        "restore", backup.path, "-o", out, "--passphrase-file", backup.passfile, *extra
    )
    assert result.code == 0, result.text


def assert_restored(out: Path, backup: Backup, vm_names: list[str] | None = None) -> None:
    """Every stored file is back, byte for byte, and images stay sparse."""
    expected = backup.expected_files(vm_names)
    assert expected, "the fixture should hold files"
    for rel, source in expected.items():
        restored = out / rel
        assert restored.is_file(), f"missing {rel}"
        assert restored.stat().st_size == source.stat().st_size, rel
        assert sha(restored) == sha(source), f"content differs: {rel}"
        if source.stat().st_size >= 1 << 20:
            src_alloc = source.stat().st_blocks * 512
            if src_alloc < source.stat().st_size // 2:  # a sparse source stays sparse
                assert restored.stat().st_blocks * 512 <= src_alloc + (1 << 20), rel
    assert (out / "qubes.xml").is_file()
    leftovers = [
        p for p in out.rglob("*") if ".partial" in p.name or p.name.startswith(".qrecover")
    ]
    assert not leftovers, leftovers


T = TypeVar("T")
_BUILT: dict[Path, Any] = {}  # this worker's copies of what built_once returned


def built_once(factory: pytest.TempPathFactory, key: str, build: Callable[[Path], T]) -> T:
    """``build(folder)``, run once per test run whichever worker asks first; a worker
    asking later (or at the same time: it waits on the lock) gets the same value,
    pickled.  What is built is shared by every test of the run: read it, never
    change it (copy it first)."""
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own folder in the run's
        base = base.parent
    root = base / "built-once"
    root.mkdir(exist_ok=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder, result = root / name, root / f"{name}.pickle"
    if result in _BUILT:
        return _BUILT[result]  # type: ignore[no-any-return]
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if result.exists():
            _BUILT[result] = pickle.loads(result.read_bytes())
            return _BUILT[result]  # type: ignore[no-any-return]
        if folder.exists():  # a build that failed half way, in a test that then failed
            shutil.rmtree(folder)
        folder.mkdir()
        value = build(folder)
        partial = root / f"{name}.pickle.partial"
        partial.write_bytes(pickle.dumps(value))
        partial.rename(result)
        _BUILT[result] = value
        return value


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], Path]:
    return built_once(
        tmp_path_factory, "sample tree", lambda folder: gen.make_sample_tree(folder, image_mb=4)
    )


MakeBackup = Callable[..., Backup]


def _backup_maker(
    factory: pytest.TempPathFactory, sample: tuple[list[Any], Path], writer: Callable[..., Any],
    filename: str,
) -> MakeBackup:
    """Build (once per run, see ``built_once``) a backup of the sample tree, or of the
    ``vms`` and ``dom0_home`` given, with the given writer options."""
    vms, home = sample

    def build(**options: Any) -> Backup:
        def write(folder: Path) -> Backup:
            passfile = folder / "passphrase"
            passfile.write_text(PASSPHRASE + "\n", encoding="utf-8")
            use_vms = options.pop("vms", vms)
            use_home = options.pop("dom0_home", home)
            path = folder / filename
            manifest = writer(
                path, PASSPHRASE, use_vms, dom0_home=use_home, workdir=folder, **options
            )
            return Backup(path, passfile, manifest, use_vms, use_home)

        return built_once(factory, f"{filename} {sorted(options.items())!r}", write)

    return build


@pytest.fixture(scope="session")
def make(
    tmp_path_factory: pytest.TempPathFactory, sample_tree: tuple[list[Any], Path]
) -> MakeBackup:
    """Build (and cache) a backup of the sample tree with the given writer options."""
    return _backup_maker(tmp_path_factory, sample_tree, gen.make_backup, "qubes-backup")


@pytest.fixture
def default_backup(make: MakeBackup) -> Backup:
    return make()


@pytest.fixture(scope="session")
def make4(
    tmp_path_factory: pytest.TempPathFactory, sample_tree: tuple[list[Any], Path]
) -> MakeBackup:
    """Build (and cache) a format-4 backup of the sample tree (R4's writer, real scrypt)."""
    return _backup_maker(tmp_path_factory, sample_tree, gen4.make_backup_v4, "qubes-backup-r4")


@pytest.fixture(scope="session")
def make2(
    tmp_path_factory: pytest.TempPathFactory, sample_tree: tuple[list[Any], Path]
) -> MakeBackup:
    """Build (and cache) a format-2 backup of the sample tree (R2's writer: real
    ``tar -M`` volumes, openssl or gzip per volume)."""
    return _backup_maker(tmp_path_factory, sample_tree, gen2.make_backup_v2, "qubes-backup-v2")


@pytest.fixture(scope="session")
def backup_past_1000(make: MakeBackup, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    """One VM whose private.img is cut into more than 1000 16-byte chunks (``.999``,
    then ``.1000``), the last one empty as R3.2 wrote it when the encrypted stream is
    a multiple of the chunk size.  Built once per run and shared by every test that
    needs chunks past 999: read it, never change it (copy it first)."""
    def source(folder: Path) -> Path:
        (folder / "tiny").mkdir()
        (folder / "tiny" / "private.img").write_bytes(hashlib.shake_256(b"tiny").digest(16 << 10))
        return folder / "tiny"

    src = built_once(tmp_path_factory, "past 1000 source", source)
    backup = make(vms=[gen.VmSpec("tiny", 12, source=src)], dom0_home=None, chunk_size=16)
    names = backup.manifest.member_names()
    assert "vm12/private.img.999" in names and "vm12/private.img.1000" in names
    return backup



@pytest.fixture(scope="session")
def past_1000_restored(
    backup_past_1000: Backup, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Run]:
    """(output folder, run): qrecover's restore of ``backup_past_1000``, run once per
    test run: test_chunk_1000_and_beyond checks it, the script's restore is compared
    with it.  Read it, never change it."""

    def restore(folder: Path) -> tuple[Path, Run]:
        out = folder / "out"
        backup = backup_past_1000
        args = ("restore", backup.path, "-o", out, "--passphrase-file", backup.passfile)
        return out, run_main(*args)

    return built_once(tmp_path_factory, "past 1000 restored", restore)

# The longest tests, started first: the two workers then end together, rather than
# one running a long test alone at the end.  Two that build the >1000-chunk backup
# are kept apart by a fuzz run, so that the other worker is not left waiting for
# the build (built_once) at the start.
LONG_FIRST = (
    "test_script_chunks_past_1000",
    "test_short_fuzz_run",
    "test_chunk_1000",
    "test_short_fuzz_run_of_inputs_that_are_not_backups",
    "test_chunk_1000_and_beyond",
    "test_bench_smoke",
    "test_generator_time1_writes_a_real_cost_that_parses",
    "test_passphrase_never_shown",
    "test_r4_passphrase_never_shown",
)


# The in-process part of the suite (marker "inprocess"): modules that run qrecover's
# own code in this interpreter (cli.main through run_main, the modules directly) in
# little time; scripts/test-all runs them on the oldest and newest Pythons too.
INPROCESS = frozenset({
    "test_inprocess.py", "test_plan.py", "test_json.py", "test_bad_input.py",
    "test_selection.py", "test_fixture_sample.py", "test_header.py", "test_container.py",
    "test_inventory.py", "test_verify.py", "test_argv.py", "test_format4_units.py",
    "test_format1_units.py", "test_files_units.py", "test_chunk_pool.py", "test_signals.py",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(getattr(item, "originalname", item.name), len(rank)))
    for item in items:
        if Path(str(item.fspath)).name in INPROCESS:
            item.add_marker(pytest.mark.inprocess)


def sigint_as_at_a_terminal() -> None:
    """preexec_fn for a qrecover a test will interrupt with SIGINT: the signal's
    default disposition, as a shell's foreground job has.  A child inherits an
    ignored SIGINT, and Python then installs no handler for it; a test that
    sends SIGINT must not depend on what the test process had meanwhile."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
