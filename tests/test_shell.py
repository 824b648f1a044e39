"""The sh building blocks: quoting, and the HMAC the scripts compute without argv."""

from __future__ import annotations

import hmac
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from qrecover.formats.v3_words import hmac_init_line
from qrecover.hmacs import ALL_DIGESTS
from qrecover.render import shell
from qrecover.stages.extract import extract_stage

DASH = shutil.which("dash") or "/usr/bin/dash"


def test_render_argv_is_pasteable() -> None:
    argv = ("tar", "-x", "-C", "/tmp/out dir ü €/it's", "--strip-components=1")
    assert shlex.split(shell.render_argv(argv)) == list(argv)
    stage = extract_stage(Path("/PLACEHOLDER"), 2)
    rendered = shell.render_argv(stage.argv, {"/PLACEHOLDER": '"$work/stage"'})
    assert '-C "$work/stage" --strip-components=2' in rendered


def test_comment_cannot_end_early() -> None:
    assert "\n" not in shell.comment("a\nrm -rf ~\n")
    assert shell.comment("out dir ü") == "out dir ü"


KEYS = [
    "correct horse battery staple ünïcödé",
    "666666",  # "6" xor 0x36 is a NUL byte in the padded key
    "k" * 200,  # longer than any block: hashed first
]


@pytest.mark.parametrize("key", KEYS, ids=["unicode", "nul-bytes", "long"])
def test_shell_hmac_equals_openssl_hmac(tmp_path: Path, key: str) -> None:
    data = tmp_path / "chunk"
    data.write_bytes(os.urandom(5000) + b"\x00\n")
    script = tmp_path / "h.sh"
    lines = [shell.PRELUDE, 'work=""']
    for digest in ALL_DIGESTS:
        lines += [hmac_init_line(digest), f"hmac_hex {shlex.quote(str(data))}; echo"]
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {**os.environ, "backup_pass": key}
    for sh in (DASH, "bash"):
        out = subprocess.run([sh, str(script)], env=env, capture_output=True, text=True, check=True)
        want = [
            hmac.new(key.encode(), data.read_bytes(), d.hashlib_name).hexdigest()
            for d in ALL_DIGESTS
        ]
        assert out.stdout.split() == want, sh
