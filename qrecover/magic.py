"""What a file's first bytes say it is: a compression undone as a whole (gzip,
bzip2, xz, zstd, by magic number, with the command that undoes it), or a format
a person may point qrecover at by mistake, named in the one-line error."""

from __future__ import annotations

from dataclasses import dataclass

SNIFF = 512  # one tar block: enough for every magic number below


@dataclass(frozen=True)
class Compression:
    """A whole-file compression told by its magic bytes, and what undoes it."""

    name: str
    magic: bytes
    argv: tuple[str, ...]


COMPRESSIONS = (
    Compression("gzip", b"\x1f\x8b", ("gzip", "-d", "-c")),
    Compression("bzip2", b"BZh", ("bzip2", "-d", "-c")),
    Compression("xz", b"\xfd7zXZ\x00", ("xz", "-d", "-c")),
    Compression("zstd", b"\x28\xb5\x2f\xfd", ("zstd", "-d", "-c", "-q")),
)

# Other formats a person may point qrecover at by mistake, by magic bytes.
FOREIGN: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive (unzip it first: a Qubes backup is a tar file)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (extract it first: a Qubes backup is a tar file)"),
    (b"Rar!\x1a\x07", "a RAR archive (extract it first: a Qubes backup is a tar file)"),
    (b"!<arch>\n", "an ar archive (such as a .deb package)"),
    (b"070707", "a cpio archive"),
    (b"070701", "a cpio archive"),
    (b"070702", "a cpio archive"),
    (b"\xc7\x71", "a cpio archive"),
    (b"\x71\xc7", "a cpio archive"),
    (b"Salted__", "a file encrypted with openssl enc (decrypt it first)"),
    (b"scrypt\x00", "a file encrypted with scrypt (decrypt it first)"),
    (b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (b"\x1f\x9d", "a compress (.Z) stream, which qrecover does not undo (uncompress it first)"),
    (b"\x04\x22\x4d\x18", "an lz4 stream, which qrecover does not undo (lz4 -d it first)"),
    (b"LZIP", "an lzip stream, which qrecover does not undo (lzip -d it first)"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an ELF program"),
)


def compression_of(head: bytes) -> Compression | None:
    for comp in COMPRESSIONS:
        if head.startswith(comp.magic):
            # bzip2's "BZh" is followed by its block size, a digit 1-9.
            if comp.name == "bzip2" and not (len(head) > 3 and 0x31 <= head[3] <= 0x39):
                continue
            return comp
    return None


def describe(head: bytes, subject: str = "it") -> str:
    """What a block that is not a tar header looks like, for the one-line error."""
    comp = compression_of(head)
    if comp is not None:
        return f"{subject} starts like a {comp.name} stream (compressed twice?)"
    for magic, what in FOREIGN:
        if head.startswith(magic):
            return f"{subject} is {what}"
    if not head.strip(b"\0"):
        return f"{subject} is zero-filled"
    text = head.rstrip(b"\0")
    if all(32 <= b < 127 or b in b"\t\r\n" for b in text):
        return f"{subject} starts like text"
    shown = " ".join(f"{b:02x}" for b in head[:8])
    return (f"{subject} starts with the bytes {shown} "
            "(random data, or a format qrecover does not know)")
