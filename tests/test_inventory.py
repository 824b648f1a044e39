"""qubes.xml (R2/R3 and R4 forms): entities, names, paths, hostile content."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrecover.errors import BackupError, UsageError
from qrecover.inventory import parse_inventory

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "qubes-xml" / "r3-sample.xml"
R4_SAMPLE = SAMPLE.with_name("r4-sample.xml")


def xml(*vms: str) -> bytes:
    return ("<QubesVmCollection>" + "".join(vms) + "</QubesVmCollection>").encode()


def vm(tag: str = "QubesAppVm", **attrs: str) -> str:
    return f"<{tag} " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + "/>"


def r4(*domains: str) -> bytes:
    return ("<qubes><labels/><domains>" + "".join(domains) + "</domains></qubes>").encode()


def domain(klass: str, name: str, path: str | None, template: str = "", content: str = "1") -> str:
    props = f'<property name="name">{name}</property>' if name else ""
    if template:
        props += f'<property name="template">{template}</property>'
    feats = ""
    if path is not None:
        feats = (
            f'<feature name="backup-content">{content}</feature>'
            f'<feature name="backup-path">{path}</feature>'
            '<feature name="backup-size">4096</feature>'
        )
    return (
        f'<domain class="{klass}"><properties>{props}</properties>'
        f"<features>{feats}</features></domain>"
    )


def test_real_r4_sample() -> None:
    inv = parse_inventory(R4_SAMPLE.read_bytes())
    by_name = {e.name: e for e in inv.entities}
    assert by_name["dom0"].backup_path == "dom0-home/user"
    assert by_name["dom0"].dest == "dom0-home/user"
    assert by_name["dom0"].type == "AdminVM"
    assert by_name["test-d8test"].backup_path == "appvms/test-d8test"
    assert by_name["test-d8test"].template == "debian-8"
    assert by_name["test-d8test"].size == 20971520
    assert by_name["test-fedora-25-clone"].type == "TemplateVM"
    assert by_name["test-hvm"].type == "StandaloneVM"
    # VMs without backup-content (debian-8, personal, sys-net...) are not in it
    assert "debian-8" not in by_name and "personal" not in by_name
    assert len(inv.entities) == 9


def test_r4_hidden_paths_with_slash_and_false_content() -> None:
    inv = parse_inventory(
        r4(
            domain("TemplateVM", "fedora-23", "vm3/"),
            domain("AppVM", "work", "vm7/", template="fedora-23"),
            domain("AppVM", "play", "vm8/", content=""),  # R4 writes False as ""
            domain("AppVM", "idle", None),
            domain("AdminVM", "", "dom0-home/alice"),
        )
    )
    assert inv.names() == ["fedora-23", "work", "dom0"]
    work = inv.select(["work"])[0]
    assert (work.backup_path, work.template, work.dest) == ("vm7", "fedora-23", "work")
    assert inv.owner("vm7/private.img") == work
    assert inv.owner("dom0-home/alice").dest == "dom0-home/alice"  # type: ignore[union-attr]


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
        b"<qubes><labels/></qubes>",
        r4(domain("AppVM", "work", "../../x")),
        r4(domain("AppVM", "work", "/etc/")),
        r4(domain("AppVM", "a/b", "vm7/")),
        r4(domain("AppVM", "qubes.xml", "vm7/")),
        r4(domain("AppVM", "work", "vm7/"), domain("AppVM", "play", "vm7/")),
        r4(domain("AdminVM", "", "dom0-home/../../x")),
        b'<!DOCTYPE q [<!ENTITY e SYSTEM "file:///etc/passwd">]><qubes><domains>&e;'
        b"</domains></qubes>",
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


def test_template_name_of_a_vm_not_restored_is_checked_too() -> None:
    # The template's element is not restored, so its name was never checked;
    # it is shown (in scripts' comments too): a newline there could run a command.
    inv = parse_inventory(
        xml(
            vm(
                "QubesTemplateVm",
                qid="1",
                name="tpl&#10;touch /tmp/PWNED #",
                backup_content="False",
            ),
            vm(qid="7", name="work", template_qid="1", backup_content="True", backup_path="vm7"),
        )
    )
    assert inv.entities[0].template is None
