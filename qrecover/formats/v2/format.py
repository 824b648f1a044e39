"""Format 2 (Qubes R2-Beta3 to R2): an HMAC per chunk, each chunk one tar volume.

Every chunk ``NAME.NNN`` is followed by ``NAME.NNN.hmac`` as in format 3, but
each chunk was encrypted (``openssl enc``, its own salt) or gzipped *on its
own*, and the chunks' plaintexts are the volumes of one GNU multi-volume tar
(``tar -M``, 102,400,000-byte volumes; volume 2 on starts with a GNU ``M``
continuation header).  So each chunk is checked, then decrypted or
decompressed alone into private scratch (:class:`_Volume`), and GNU ``tar
-M`` reads the volumes in order (qrecover.formats.v2.volumes).

Two shapes of header (fixtures/README.md, "Format 2"):

* v2.1.39 to R2 (v2.1.63): ``backup-header`` of four lines and no
  ``version`` key, authenticated by its ``.hmac`` as in format 3;
* R2-Beta3 (v2.1.34-38): no header at all; the first member is
  ``qubes.xml.000``, HMAC-MD5 (OpenSSL 1.0's default ``dgst`` digest), so
  its HMAC is what tells a wrong passphrase.  Encryption and compression
  were options the restorer had to repeat: each authenticated chunk tells
  (``Salted__``: encrypted, and zlib inside it for ``openssl enc -z``; gzip
  magic; or a bare tar volume).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qrecover.archive.members import (
    HEADER,
    HEADER_HMAC,
    MAX_MEMBER,
    QUBES_XML,
    ChunkName,
    Member,
    Truncated,
)
from qrecover.archive.members import parse_member_name as _parse
from qrecover.errors import (
    AuthenticationError,
    BackupError,
    DiskFull,
    MissingProgramError,
    StoredFileError,
)
from qrecover.formats.base import (
    ChunkOutcome,
    ChunkStore,
    ChunkWorks,
    InOrder,
    MemberStream,
    PendingChunk,
    Recognition,
)
from qrecover.formats.v2.volumes import VolumeTar
from qrecover.formats.v3 import allowed_cipher, allowed_digest, authenticate_header, dgst_command
from qrecover.header import Header, parse_bool
from qrecover.hmacs import MAX_HMAC_FILE, Digest, matches, parse_hmac_text
from qrecover.runner import PASS_ENV, CommandLog, Pipeline, Stage, StageResult, first_failure
from qrecover.stages.decompress import pick_gunzip
from qrecover.stages.sparse import Extent

VERSION = 2
PAGE = "https://www.qubes-os.org/doc/backup-emergency-restore-v2/"
# The four keys v2.1.39-v2.1.63 wrote, in this order, and nothing else.
KEYS = ("hmac-algorithm", "crypto-algorithm", "encrypted", "compressed")
BETA3_RELEASES = "Qubes R2-Beta3 (qubes-core-admin v2.1.34 to v2.1.38: no backup-header)"
# A volume was 102,400,000 bytes (--tape-length 100000); a chunk that
# expands past this is refused before it can fill the scratch disk.
MAX_VOLUME = MAX_MEMBER
_SALTED = b"Salted__"
BETA3_HEX = 32  # hex digits of an HMAC-MD5
_GZIP = b"\x1f\x8b"
_CIPHER_BLOCK = 16  # the block of every cipher format 2 allows (its padding)
_TAR_BLOCK = 512  # a volume is whole tar blocks


class BackupHeaderV2(BaseModel):
    """A verified format-2 header; for R2-Beta3 (no header) the values it
    implies, ``encrypted`` and ``compressed`` None: each chunk tells."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    hmac_algorithm: str
    crypto_algorithm: str = "aes-256-cbc"
    encrypted: Optional[bool]  # Optional: pydantic evaluates it, on Python 3.8 too
    compressed_flag: Optional[bool] = Field(alias="compressed")

    @field_validator("hmac_algorithm")
    @classmethod
    def _hmac(cls, value: str) -> str:
        return allowed_digest(value)

    @field_validator("crypto_algorithm")
    @classmethod
    def _cipher(cls, value: str) -> str:
        return allowed_cipher(value)

    @field_validator("encrypted", "compressed_flag", mode="before")
    @classmethod
    def _bools(cls, value: object) -> bool:
        return parse_bool(value)

    @property
    def version(self) -> int:
        return VERSION

    @property
    def compressed(self) -> bool:
        return bool(self.compressed_flag)

    @property
    def digest(self) -> Digest:
        return Digest(self.hmac_algorithm)

    @property
    def filter(self) -> str | None:
        """Format 2 had no filter choice: gzip (or zlib inside openssl)."""
        return "gzip" if self.compressed else None

    def fields(self) -> dict[str, object]:
        if self.encrypted is None:
            return {
                "backup-header": "none (R2-Beta3 wrote none)",
                "hmac-algorithm": self.hmac_algorithm,
                "crypto-algorithm": self.crypto_algorithm,
                "encrypted": "told by each chunk",
                "compressed": "told by each chunk",
            }
        return {
            "hmac-algorithm": self.hmac_algorithm,
            "crypto-algorithm": self.crypto_algorithm,
            "encrypted": self.encrypted,
            "compressed": self.compressed_flag,
        }


BETA3_HEADER = BackupHeaderV2.model_construct(
    hmac_algorithm="MD5", crypto_algorithm="aes-256-cbc", encrypted=None, compressed_flag=None
)


def claims(header: bytes, header_hmac: bytes) -> bool:
    """Not by the .hmac's shape (it is format 3's, tried after this one), but by
    a header naming no version: R2 (v2.1.39-63) wrote no version key."""
    return not names_version(header)


def names_version(header: bytes) -> bool:
    """Whether the (not yet authenticated) header has a ``version`` line; only
    which format authenticates it depends on this, never what is trusted."""
    return any(line.startswith(b"version=") for line in header.splitlines())


def open_format(
    header: bytes,
    header_hmac: bytes,
    passphrase: str,
    log: CommandLog,
    parse: Callable[[bytes], Header],
) -> Format2:
    """A v2.1.39-R2 header: authenticated by its HMAC line, then parsed."""
    digest = authenticate_header(header, header_hmac, passphrase.encode("utf-8"))
    parsed = parse(header)
    if not isinstance(parsed, BackupHeaderV2):
        raise BackupError(f"backup-header: names format {parsed.version}, but has no version key")
    if parsed.hmac_algorithm != digest.name:
        raise BackupError(
            f"backup-header: names hmac-algorithm={parsed.hmac_algorithm} but was "
            f"authenticated with {digest.name}"
        )
    log(dgst_command(digest, HEADER) + f"  # done in-process: matches {HEADER_HMAC}")
    return Format2(parsed)


def headerless(first: str) -> Format2 | None:
    """R2-Beta3's backup, which starts with ``qubes.xml.000``; None otherwise."""
    if first == f"{QUBES_XML}.000":
        return FormatBeta3(BETA3_HEADER)
    return None


def decrypt_stage(cipher: str, chunk: str) -> Stage:
    """``openssl enc -d -CIPHER -md md5 -pass env:backup_pass -in CHUNK``: -md md5
    as OpenSSL 1.0 derived the key; the passphrase never in an argv."""
    return Stage(
        ("openssl", "enc", "-d", f"-{cipher}", "-md", "md5", "-pass", f"env:{PASS_ENV}",
         "-in", chunk),
        secret_env=(PASS_ENV,),
    )


def bound_stage() -> Stage:
    """``head -c``: a volume that expands past any real one stops there."""
    return Stage(("head", "-c", str(MAX_VOLUME + 1)))


def inflate_stage() -> Stage:
    """R2-Beta3's ``openssl enc -z`` deflated a zlib stream inside the
    encryption; today's OpenSSL builds cannot undo -z, pigz can."""
    return Stage(("pigz", "-d", "-z"))


def _zlib(head: bytes) -> bool:
    return len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0


@dataclass
class _Volume:
    """A chunk whose HMAC matched; :meth:`complete` makes its plaintext volume.

    With ``restore --salvage``, also a chunk that failed its check
    (``unverified`` says why): decrypted or decompressed all the same, and
    what the program wrote before it failed is kept (see :meth:`_salvaged`).
    """

    fmt: Format2
    store: ChunkStore
    member: str
    path: Path
    owned: bool
    mac: str
    unverified: str | None = None
    checked: bool = True
    said: str = ""  # --salvage: what became of it on the way (a program that failed)

    def _run(self, stages: list[Stage], stdin: Path | None, note: str) -> Path:
        out = self.store.scratch_file()
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as sink, open(stdin or os.devnull, "rb") as source:
            done = Pipeline(stages, stdin=source.fileno(), stdout=sink,
                            secrets={PASS_ENV: self.store.passphrase}, note=note,
                            log=self.store.log).start().wait()
        failure = first_failure(done)
        too_big = out.stat().st_size > MAX_VOLUME  # head -c stopped it (and its feeder)
        if not too_big and (failure is None or self._salvaged(out, failure)):
            return out
        out.unlink()
        if too_big:
            raise StoredFileError(f"{self.member}: expands past {MAX_VOLUME} bytes, more "
                                  "than any format-2 volume (a decompression bomb?)")
        assert failure is not None
        message = f"{self.member}: {failure.describe()}"
        raise DiskFull(message) if failure.disk_full else StoredFileError(message)

    def _salvaged(self, out: Path, failure: StageResult) -> bool:
        """--salvage: the decryptor or decompressor failed on a chunk that failed
        its check.  What it wrote is kept, and made as long as the volume was
        (``openssl enc``: the ciphertext less its 16-byte header and a block of
        padding; gzip: the size its trailer states), so that the volumes after
        it stay where tar expects them.  False: not salvaging, or no room."""
        if self.unverified is None or failure.disk_full or failure.output_trouble:
            return False
        have = out.stat().st_size
        said = f"{failure.describe()} after writing {have} bytes"
        size = self._volume_size()
        if size is not None and size != have:
            with out.open("r+b") as f:
                f.truncate(size)  # zeros after what it wrote (or cut to the size)
            said += (f"; {size - have} zero bytes fed after them" if size > have
                     else f"; cut to {size} bytes")
        self.said += f"; {said}"
        return True

    def _volume_size(self) -> int | None:
        """The plaintext volume's size, as far as the damaged chunk tells it."""
        header = self.fmt.header
        chunk = self.path.stat().st_size
        if header.encrypted and not header.compressed_flag:
            size = chunk - len(_SALTED) - 8 - _CIPHER_BLOCK  # a volume is whole blocks
        elif header.encrypted is False and header.compressed_flag:
            with self.path.open("rb") as fh:
                fh.seek(max(chunk - 4, 0))
                size = int.from_bytes(fh.read(4), "little")  # gzip's ISIZE
        else:
            return None
        return size if 0 < size <= MAX_VOLUME and size % _TAR_BLOCK == 0 else None

    def complete(self) -> ChunkOutcome:
        try:
            plain = self._plain()
        except (StoredFileError, DiskFull) as exc:
            return ChunkOutcome(error=exc, checked=self.checked,
                                reason=self.unverified if self.checked else None)
        owned = True if plain != self.path else self.owned
        return ChunkOutcome(plain=plain, owned=owned, checked=self.checked, mac=self.mac,
                            reason=self.unverified if self.checked else None,
                            unverified=None if self.unverified is None
                            else self.unverified + self.said)

    def _plain(self) -> Path:
        header = self.fmt.header
        with self.path.open("rb") as fh:
            head = fh.read(512)
        encrypted, compressed = header.encrypted, header.compressed_flag
        if encrypted is None:  # R2-Beta3: the authenticated chunk tells
            # anything else is a bare volume, which the guard and tar judge
            encrypted, compressed = head.startswith(_SALTED), head.startswith(_GZIP)
        # --salvage: GNU gzip, which writes all it decoded before the damage
        gunzip = pick_gunzip() if self.unverified is None else "gzip"
        try:
            if encrypted:
                plain = self._run([decrypt_stage(header.crypto_algorithm, str(self.path))],
                                  None, f"{self.member} decrypted into private scratch")
                with plain.open("rb") as fh:
                    zlib = _zlib(fh.read(2))
                if (compressed or header.encrypted is None) and zlib:
                    if shutil.which("pigz") is None:
                        plain.unlink()
                        raise MissingProgramError(
                            f"{self.member}: R2-Beta3 compressed it inside the encryption "
                            "(openssl enc -z), which today's OpenSSL cannot undo; pigz can",
                            hint="install the package 'pigz' (apt-get install pigz)")
                    inflated = self._run([inflate_stage(), bound_stage()], plain,
                                         f"{self.member}: zlib inflated")
                    plain.unlink()
                    return inflated
                return plain
            if compressed:
                return self._run([Stage((gunzip, "-d", "-c")), bound_stage()], self.path,
                                 f"{self.member} decompressed into private scratch")
            return self.path
        finally:
            if encrypted or compressed:
                self._drop()

    def _drop(self) -> None:
        self.store.drop(self.path, self.owned)


@dataclass(frozen=True)
class _Done:
    outcome: ChunkOutcome

    def complete(self) -> ChunkOutcome:
        return self.outcome


@dataclass(frozen=True)
class Format2:
    """Qubes R2-Beta3 to R2: HMAC per chunk, each chunk a volume of ``tar -M``."""

    header: BackupHeaderV2
    beta3 = False
    written_by = "Qubes R2-Beta3 to R2 (qubes-core-admin v2.1.39 to v2.1.63)"
    version = VERSION
    verdict = "all HMACs matched"
    multi_volume = True  # (the Format protocol's trait: each plaintext one volume)

    @property
    def authenticated_with(self) -> str:
        if self.beta3:
            return "HMAC-MD5 of qubes.xml.000 (R2-Beta3 wrote no header)"
        return f"HMAC-{self.header.hmac_algorithm}"

    def extract_with(self, chosen: str) -> str:
        """GNU tar, whatever was picked: only it reads a multi-volume archive (-M)."""
        return "tar"

    def own_feed(self, tar: Stage, scratch: Path, limit: int | None, stored: str,
                 stdout: IO[bytes] | None, log: CommandLog,
                 layout: list[Extent] | None) -> VolumeTar:
        """``tar -M`` given each chunk's plaintext as one volume, in turn."""
        return VolumeTar.start(tar, scratch, limit, stored, stdout, log, layout)

    def stream_stages(self, gunzip: str = "gzip") -> list[Stage]:
        """Nothing between the fed volumes and tar -M: each chunk was decrypted
        or decompressed on its own (:meth:`chunk_stages`)."""
        return []

    def chunk_stages(self, chunk: str, gunzip: str = "gzip") -> list[list[Stage]]:
        """What each chunk goes through on its own (one list per program run)."""
        header = self.header
        if header.encrypted is None:
            return [[decrypt_stage(header.crypto_algorithm, chunk)], [inflate_stage()],
                    [Stage((gunzip, "-d", "-c"))]]
        runs = []
        if header.encrypted:
            runs.append([decrypt_stage(header.crypto_algorithm, chunk)])
            if header.compressed_flag:
                runs.append([inflate_stage()])
        elif header.compressed_flag:
            runs.append([Stage((gunzip, "-d", "-c"))])
        return runs

    def programs(self, gunzip: str = "gzip") -> list[str]:
        header = self.header
        needed = ["head"]
        if header.encrypted is not False:
            needed.append("openssl")
        if header.encrypted and header.compressed_flag:
            needed.append("pigz")
        elif header.compressed_flag and not header.encrypted:
            needed.append(gunzip)
        return needed

    def check_programs(self, log: CommandLog) -> None:
        return None

    def owns_chunk(self, name: ChunkName) -> bool:
        return not name.is_enc

    def chunk_works(
        self, passphrase: str, scratch: Path, log: CommandLog, jobs: int | None
    ) -> ChunkWorks:
        return InOrder()

    def identity(self, xml: bytes, xml_macs: Sequence[str]) -> bytes:
        return b"\0qubes.xml hmacs\0" + "\0".join(xml_macs).encode()

    def read_chunk(
        self, store: ChunkStore, member: Member, name: ChunkName, members: MemberStream
    ) -> PendingChunk:
        """Copy the chunk while computing its HMAC, read its ``.hmac`` and compare;
        raises Truncated (and AuthenticationError for R2-Beta3's first chunk)."""
        digest = self.header.digest
        path, owned, got = store.copy(member, digest)
        nxt = members.peek()
        if nxt is None or _parse(nxt.name) != ChunkName(name.stored, name.index, True):
            if store.salvage:  # used all the same, knowingly
                return _Volume(self, store, member.name, path, owned, "",
                               "its .hmac is missing", checked=False)
            store.drop(path, owned)
            return _Done(ChunkOutcome(error=StoredFileError(
                f"{member.name}.hmac is missing: the chunk cannot be verified")))
        members.take()
        try:
            want = parse_hmac_text(nxt.read_all(MAX_HMAC_FILE)) if nxt.size <= MAX_HMAC_FILE \
                else None
        except Truncated:
            store.drop(path, owned)
            raise
        first = self.beta3 and name.stored == QUBES_XML and name.index == 0
        if first and want is not None and len(want) != BETA3_HEX:
            store.drop(path, owned)
            raise BackupError(f"{nxt.name}: not an HMAC-MD5, so not R2-Beta3's backup (which "
                              "wrote no backup-header): a backup whose header is missing?")
        if want is None or not matches(got, want):
            reason = "not an HMAC line" if want is None else "HMAC mismatch"
            if store.salvage and not first:  # used all the same, knowingly
                return _Volume(self, store, member.name, path, owned, "", reason,
                               checked=want is not None)
            store.drop(path, owned)
            if first:
                raise AuthenticationError(
                    f"{member.name}: the passphrase does not authenticate it with HMAC-MD5 "
                    "(wrong passphrase, or the chunk is damaged); nothing was written",
                    hint="R2-Beta3 wrote no backup-header: qubes.xml.000's HMAC is the first "
                    "check; the passphrase is case-sensitive")
            return _Done(ChunkOutcome(error=StoredFileError(
                f"{member.name}: {reason}: the chunk is damaged or was tampered with; "
                "nothing of it was used"), checked=want is not None, reason=reason))
        store.log(dgst_command(digest, member.name) + f"  # done in-process: matches {nxt.name}")
        return _Volume(self, store, member.name, path, owned, got)


def header_model(values: dict[str, str]) -> type[BackupHeaderV2] | None:
    """The model of a header without ``version``: format 2's four keys, or None."""
    return BackupHeaderV2 if set(values) == set(KEYS) else None


@dataclass(frozen=True)
class FormatBeta3(Format2):
    """R2-Beta3: no header, HMAC-MD5, each chunk tells how it was written."""

    beta3 = True
    written_by = BETA3_RELEASES


# Found by its header (no version key) and, for R2-Beta3, by qubes.xml.000 first.
RECOGNISED = Recognition(VERSION, header=claims, authenticate=open_format,
                         first_member=headerless)
