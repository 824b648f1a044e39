"""qubes.xml (R2/R3 form): entities, names, paths, hostile content."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrecover.errors import BackupError, UsageError
from qrecover.inventory import parse_inventory

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "qubes-xml" / "r3-sample.xml"


def xml(*vms: str) -> bytes:
    return ("<QubesVmCollection>" + "".join(vms) + "</QubesVmCollection>").encode()


def vm(tag: str = "QubesAppVm", **attrs: str) -> str:
    return f"<{tag} " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + "/>"


def test_real_r3_sample() -> None:
    inv = parse_inventory(SAMPLE.read_bytes())
    by_name = {e.name: e for e in inv.entities}
    assert by_name["dom0"].backup_path == "dom0-home/user"
    assert by_name["dom0"].dest == "dom0-home/user"
    assert by_name["test-work"].backup_path == "appvms/test-work"
    assert by_name["test-work"].type == "AppVM"
    assert by_name["test-work"].template == "fedora-20-x64"
    assert by_name["test-template-clone"].type == "TemplateVM"
    assert len(inv.entities) == 8


def test_hidden_names_and_selection() -> None:
    inv = parse_inventory(
        xml(
            vm(qid="1", name="fedora-23", backup_content="False"),
            vm(
                qid="7",
                name="work",
                template_qid="1",
                backup_content="True",
                backup_path="vm7",
                backup_size="123",
            ),
            vm("QubesTemplateVm", qid="3", name="tpl", backup_content="True", backup_path="vm3"),
        )
    )
    assert inv.names() == ["work", "tpl"]
    assert inv.owner("vm7/private.img").name == "work"  # type: ignore[union-attr]
    assert inv.owner("vm70/private.img") is None
    assert inv.owner("vm3/.").name == "tpl"  # type: ignore[union-attr]
    assert [e.name for e in inv.select(["tpl"])] == ["tpl"]
    with pytest.raises(UsageError, match="available: work, tpl"):
        inv.select(["nope"])


@pytest.mark.parametrize(
    "doc",
    [
        b"<QubesVmCollection>",
        b"not xml",
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
        b"<QubesVmCollection>&lol2;</QubesVmCollection>",
        b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><QubesVmCollection>&e;'
        b"</QubesVmCollection>",
        b"<qubes><domains/></qubes>",
        xml(vm(name="work", backup_content="True", backup_path="../../x")),
        xml(vm(name="work", backup_content="True", backup_path="/etc")),
        xml(vm(name="a/b", backup_content="True", backup_path="vm7")),
        xml(vm(name="..", backup_content="True", backup_path="vm7")),
        xml(vm(name="qubes.xml", backup_content="True", backup_path="vm7")),
        xml(
            vm(name="work", backup_content="True", backup_path="vm7"),
            vm(name="play", backup_content="True", backup_path="vm7"),
        ),
        xml(
            vm(name="work", backup_content="True", backup_path="appvms"),
            vm(name="play", backup_content="True", backup_path="appvms/play"),
        ),
        xml(vm("QubesAdminVm", name="dom0", backup_content="True", backup_path="home/../x")),
    ],
)
def test_hostile_or_broken(doc: bytes) -> None:
    with pytest.raises(BackupError):
        parse_inventory(doc)
