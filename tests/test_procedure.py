"""Each format's recovery page, declared once (qrecover.procedure), and what
the renderers take from it."""

from __future__ import annotations

import pytest

from qrecover import formats
from qrecover.formats import v1_words, v3_words
from qrecover.formats.v2 import words as v2_words
from qrecover.formats.v4 import words as v4_words
from qrecover.procedure import Procedure, Step

DECLARED = {
    1: v1_words.PROCEDURE,
    2: v2_words.PROCEDURE,
    3: v3_words.PROCEDURE,
    4: v4_words.PROCEDURE,
}


@pytest.mark.parametrize("version", sorted(DECLARED))
def test_steps_are_numbered_from_the_declaration(version: int) -> None:
    procedure = DECLARED[version]
    assert [s.number for s in procedure.steps] == list(range(1, len(procedure.steps) + 1))
    assert procedure.mount.key == "mount"
    assert procedure.heading("mount") == (
        f"Step {len(procedure.steps)} - mount an image to read its files"
    )


def test_the_pages_as_qubes_numbered_them() -> None:
    """The numbers the renderings print: format 3's page has 8 steps, format
    4's 9 (steps 2 and 5 are the passphrase and the backup id)."""
    v3, v4 = DECLARED[3], DECLARED[4]
    assert v3.span("verify chunk", "untar stored") == "4-7"
    assert v3["decrypt"].number == 5 and v3.mount.number == 8
    assert v4["verify header"].number == 3 and v4["chunks"].number == 8
    assert v4.heading("chunks", "verify and decrypt x.000.enc") == (
        "Step 8 - verify and decrypt x.000.enc"
    )
    assert DECLARED[2].span("decrypt", "decompress") == "4-5"
    assert [DECLARED[1][k].number for k in ("read qubes.xml", "copy")] == [1, 2]
    assert {p.check for p in DECLARED.values()} == {"none", "hmac", "scrypt"}


def test_renumbering_is_one_change() -> None:
    """A step added to a declaration moves every later number: none is typed."""
    procedure = Procedure(
        page="p",
        check="hmac",
        steps=(
            Step("untar", "untar", "backup"),
            Step("new", "a new step", "backup"),
            Step("verify chunk", "verify", "chunk"),
            Step("mount", "mount an image to read its files", "backup"),
        ),
    )
    assert procedure["verify chunk"].number == 3
    assert f"step {procedure['verify chunk']}" == "step 3"
    assert procedure.mount.number == 4


def test_a_step_named_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="named twice"):
        Procedure(page="p", check="none",
                  steps=(Step("a", "a", "backup"), Step("a", "b", "backup")))


def test_words_before_any_header() -> None:
    """A run that stopped before a header was verified is told on format 3's
    page without asking anything of a format: the page's own step 1 (tar -i),
    and a chunk's lines."""
    words = formats.words(None)
    assert words.procedure is v3_words.PROCEDURE
    assert words.first_step("backup.bin") is None
    assert "(hence tar -i, --ignore-zeros)" in words.intro
    assert words.transcript_chunk("vm1/private.img.000", None)[-2:] == [
        "take vm1/private.img.000 vm1/private.img.000.hmac",
        "check_hmac vm1/private.img.000",
    ]
