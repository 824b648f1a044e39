"""Which distribution package provides each program qrecover may run: named
in the message when one is missing (exit code 5)."""

from __future__ import annotations

# Which distribution package provides each program we may run.
PACKAGES: dict[str, str] = {
    "openssl": "openssl",
    "tar": "tar",
    "cat": "coreutils",
    "gzip": "gzip",
    "pigz": "pigz",
    "igzip": "isal",
    "bzip2": "bzip2",
    "xz": "xz-utils (Fedora: xz)",
    "lzma": "xz-utils (Fedora: xz)",
    "zstd": "zstd",
    "scrypt": "scrypt",
    "debugfs": "e2fsprogs",
    "printf": "coreutils",
    "fls": "sleuthkit",
    "icat": "sleuthkit",
}
