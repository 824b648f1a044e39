"""What a format-4 chunk's key derivation costs, and how many can run at once.

Every file written by ``scrypt enc`` starts with a 96-byte header that states
its cost in clear: ``scrypt``, format version 0, logN, r and p (big-endian),
the salt, the first 16 bytes of SHA-256 over the first 48 bytes, and an HMAC
that only the right passphrase can check.  ``scrypt dec`` fills an array of
``128 * r * 2^logN`` bytes; measured with ``/usr/bin/time -f %M`` on scrypt
1.3.1 (logN 10-20, r 1-32, p 1-32), its peak RSS is that array, plus
``128 * r * p`` bytes, plus 2.84 MiB for the program itself (input size plays
no part: it works in 64 KiB blocks).

These bytes are read before scrypt has authenticated anything, so they are
treated as untrusted: values scrypt itself refuses, and costs no machine could
have produced, are refused here as a damaged chunk (exit 4).  A plausible cost
that this machine cannot afford is not damage: :class:`InsufficientMemory`
(exit 6, an output-side problem like a full disk) says to restore on a
machine with more RAM.

Several ``scrypt dec`` at once must fit in memory together, and scrypt's own
check cannot see the others (it allows each process half of the total RAM),
so qrecover sizes the jobs from ``MemAvailable`` and gives each ``scrypt
dec`` its share with ``-M``.  Pure but for the readers of the machine
(:func:`read_params`, :func:`read_memory`, :func:`cgroup_room`,
:func:`scrypt_ceiling`, :func:`cores`) and :func:`plan_here`, which asks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qrecover.errors import BackupError, OutputError

HEADER_SIZE = 96
MAGIC = b"scrypt"
MiB = 1024 * 1024
GiB = 1024 * MiB

# Measured peak RSS of scrypt 1.3.1 beyond its arrays: 2.84 MiB at every
# parameter set tried; 4 MiB leaves room for other builds and libcs.
SCRYPT_BASE_RSS = 4 * MiB
# Left to everything else a restore runs while the scrypts work: qrecover's
# own process with the guard (38 MiB measured, see docs/performance.md), the decompressor
# (zstd -d refuses windows over 128 MiB; xz -d of -9 needs 65 MiB; gzip,
# igzip, pigz and bzip2 a few MiB), tar and cat (under 16 MiB), the 1 MiB
# pipes between them, and room in the page cache for the two chunks in
# transit (the one being copied to scratch and the plaintext cat is reading,
# 200 MiB with R4's 100 MiB chunks): 38 + 128 + 16 + 4 + 200 = 386 MiB,
# rounded up.
HEADROOM = 512 * MiB
# scrypt's own limits (lib/scryptenc: it refuses a file outside them).
MAX_LOG_N = 63
MAX_RP = 1 << 30
# Costs no writer could have chosen: scrypt enc gives the array at most an
# eighth of the RAM and 5 s of CPU by default, so 1 TiB of array (a writer
# with 8 TiB of RAM) or 2^34 block mixes (about 2000 times R4's usual
# logN 20, r 8, p 1: hours a chunk) can only be a damaged header.
MAX_KDF_MEMORY = 1 << 40
MAX_WORK = 1 << 34
# Given to every scrypt dec as -t.  scrypt dec estimates its CPU speed from
# one timed 20 us burst and refuses a file it thinks would take over 300 s;
# with several jobs on shared cores one preemption in that burst makes a 5 s
# chunk look like 1000 s.  A day is a limit no real chunk meets; MAX_WORK is
# the real bound on CPU.
SCRYPT_MAXTIME = 86400


class InsufficientMemory(OutputError):
    """A chunk's key derivation needs more memory than this machine can give (exit 6)."""


@dataclass(frozen=True)
class ScryptParams:
    """The cost a chunk's scrypt header states (untrusted until scrypt exits 0)."""

    log_n: int
    r: int
    p: int

    @property
    def n(self) -> int:
        return 1 << self.log_n

    @property
    def kdf_memory(self) -> int:
        """The array scrypt allocates, and what it checks against ``-M``."""
        return 128 * self.r * self.n

    @property
    def rss(self) -> int:
        """Peak resident memory of one ``scrypt dec`` of this chunk (measured model)."""
        return self.kdf_memory + 128 * self.r * self.p + 256 * self.r + SCRYPT_BASE_RSS

    @property
    def work(self) -> int:
        """Block mixes (BlockMix of r blocks, N of them twice, p times)."""
        return self.n * self.r * self.p


def parse_params(data: bytes, chunk: str) -> ScryptParams:
    """The cost in the first 96 bytes of a file written by ``scrypt enc``.

    Raises BackupError naming ``chunk`` for a file scrypt could not have
    written or would refuse, or a cost no machine could have chosen.
    """
    if len(data) < HEADER_SIZE:
        raise BackupError(f"{chunk}: too short for a scrypt file ({len(data)} bytes)")
    if not data.startswith(MAGIC):
        raise BackupError(f"{chunk}: not a file written by scrypt enc (no 'scrypt' magic)")
    if data[6] != 0:
        raise BackupError(f"{chunk}: scrypt file format {data[6]}, only format 0 exists")
    if hashlib.sha256(data[:48]).digest()[:16] != data[48:64]:
        raise BackupError(
            f"{chunk}: the checksum of its scrypt header is wrong: the chunk is damaged; "
            "nothing of it was used"
        )
    log_n = data[7]
    r = int.from_bytes(data[8:12], "big")
    p = int.from_bytes(data[12:16], "big")
    if not 1 <= log_n <= MAX_LOG_N or r < 1 or p < 1 or r * p >= MAX_RP:
        raise BackupError(
            f"{chunk}: scrypt parameters logN={log_n} r={r} p={p} are invalid "
            "(scrypt refuses them): the chunk is damaged"
        )
    params = ScryptParams(log_n, r, p)
    if params.kdf_memory > MAX_KDF_MEMORY or params.work > MAX_WORK:
        raise BackupError(
            f"{chunk}: scrypt parameters logN={log_n} r={r} p={p} ask for "
            f"{human(params.kdf_memory)} and {params.work} block mixes, more than any "
            "writer chooses: the chunk's header is damaged"
        )
    return params


def read_params(path: Path, chunk: str) -> ScryptParams:
    """:func:`parse_params` of the first 96 bytes of ``path`` (the file scrypt will read)."""
    try:
        with path.open("rb") as f:
            data = f.read(HEADER_SIZE)
    except OSError as exc:
        raise OutputError(f"{chunk}: cannot read {path}: {exc.strerror}") from None
    return parse_params(data, chunk)


@dataclass(frozen=True)
class Memory:
    """What /proc/meminfo says, in bytes."""

    total: int
    available: int


def parse_meminfo(text: str) -> Memory:
    """``MemTotal`` and ``MemAvailable`` (kernel >= 3.14; before it, free + cache)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if parts[1:2] == ["kB"] else 1
            fields[key.strip()] = int(parts[0]) * scale
    if "MemTotal" not in fields:
        raise OutputError("/proc/meminfo has no MemTotal: cannot tell how much memory there is")
    available = fields.get("MemAvailable")
    if available is None:
        available = fields.get("MemFree", 0) + fields.get("Cached", 0)
    return Memory(fields["MemTotal"], available)


def read_memory(
    path: Path = Path("/proc/meminfo"),
    cgroups: Path = Path("/sys/fs/cgroup"),
    own: Path = Path("/proc/self/cgroup"),
) -> Memory:
    """MemAvailable, or less if this process's memory cgroup allows less (a
    container: /proc/meminfo shows the host's, and the OOM killer the cgroup's)."""
    try:
        memory = parse_meminfo(path.read_text(encoding="ascii", errors="replace"))
    except OSError as exc:
        raise OutputError(f"{path}: {exc.strerror}: cannot tell how much memory there is") from None
    room = cgroup_room(cgroups, own)
    if room is not None and room < memory.available:
        return Memory(memory.total, room)
    return memory


# A cgroup limit at or above this is "no limit" (v1 writes 2^63 rounded to pages).
_UNLIMITED = 1 << 62


def cgroup_room(cgroups: Path, own: Path) -> int | None:
    """What the tightest memory cgroup around this process still allows
    (limit less usage, the reclaimable inactive file pages not counted as
    used), or None without a limit.  cgroup v2 (``0::/path``, memory.max) and
    v1 (``N:memory:/path``, memory.limit_in_bytes); in a namespace whose
    path is not visible, the mount's own root is this process's cgroup."""
    try:
        lines = own.read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, rel = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            base, files = cgroups, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = cgroups / "memory", (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / rel.lstrip("/")
        if not folder.is_dir():
            folder = base
        while True:
            room = _room(folder, *files)
            if room is not None:
                rooms.append(room)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(rooms) if rooms else None


def _room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit_text = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    if not limit_text.isdigit() or int(limit_text) >= _UNLIMITED:
        return None
    inactive = 0
    with contextlib.suppress(OSError, ValueError):
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    return max(0, int(limit_text) - usage + inactive)


def scrypt_ceiling(total: int) -> int:
    """The most any ``scrypt dec`` allows itself, whatever ``-M`` says: half of
    the RAM or of the smallest memory rlimit (which children inherit)."""
    smallest = total
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_RSS):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            smallest = min(smallest, soft)
    return smallest // 2


def cores() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class JobPlan:
    """How many ``scrypt dec`` run at once, and the memory they share."""

    jobs: int
    budget: int  # bytes all running scrypt dec together may hold
    per_job: int  # peak RSS of one, for the chunk the plan was made from
    limited_by: Literal["request", "cores", "memory"]


def plan_jobs(
    params: ScryptParams,
    chunk: str,
    *,
    requested: int | None,
    cpus: int,
    memory: Memory,
    ceiling: int,
    headroom: int = HEADROOM,
) -> JobPlan:
    """``min(requested or cpus, cpus, (MemAvailable - headroom) // per_job)``.

    Raises InsufficientMemory naming ``chunk`` when even one ``scrypt dec``
    of it does not fit, or when scrypt would refuse it anyway (its array
    over ``ceiling``, see :func:`scrypt_ceiling`).
    """
    budget = max(0, memory.available - headroom)
    check_fits(params, chunk, budget, ceiling)
    by_memory = budget // params.rss
    want = min(requested, cpus) if requested else cpus
    jobs = min(want, by_memory)
    why: Literal["request", "cores", "memory"]
    if by_memory < want:
        why = "memory"
    elif requested and requested < cpus:
        why = "request"
    else:
        why = "cores"
    return JobPlan(max(1, jobs), budget, params.rss, why)


def plan_here(params: ScryptParams, chunk: str, requested: int | None) -> JobPlan:
    """:func:`plan_jobs` for this machine: its cores, memory and scrypt's ceiling."""
    memory = read_memory()
    return plan_jobs(
        params, chunk, requested=requested, cpus=cores(), memory=memory,
        ceiling=scrypt_ceiling(memory.total),
    )


def check_fits(params: ScryptParams, chunk: str, budget: int, ceiling: int) -> None:
    """Raise InsufficientMemory if one ``scrypt dec`` of ``chunk`` cannot run here."""
    cost = (
        f"{chunk}: its scrypt key derivation (logN={params.log_n} r={params.r} "
        f"p={params.p}) needs {human(params.rss)} of memory"
    )
    hint = "restore on a machine with more RAM (or close programs that use it)"
    if params.kdf_memory > ceiling:
        raise InsufficientMemory(
            f"{cost}; scrypt allows itself at most {human(ceiling)} here (half of the RAM)",
            hint=hint,
        )
    if params.rss > budget:
        raise InsufficientMemory(
            f"{cost}; {human(budget)} is available (MemAvailable less "
            f"{human(HEADROOM)} for the other stages)",
            hint=hint,
        )


def maxmem(params: ScryptParams) -> int:
    """The ``-M`` for one ``scrypt dec`` of a chunk: exactly its array, the
    least scrypt accepts for it.  The pool reserves ``params.rss`` of the
    budget for it, so the jobs running together fit, and a file whose header
    changed after it was read (a folder given as BACKUP) cannot take more."""
    return params.kdf_memory


def limit_args(params: ScryptParams) -> tuple[str, ...]:
    """The options that bound one ``scrypt dec``: ``-M`` (:func:`maxmem`), and a
    ``-t`` so high that scrypt's noisy CPU estimate never refuses a good chunk."""
    return ("-M", str(maxmem(params)), "-t", str(SCRYPT_MAXTIME))


def human(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"
