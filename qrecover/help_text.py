"""qrecover's --help: the top-level text, each command's summary and examples, and
the group class that keeps typer from printing a type after a flag.

Paragraphs are written without line breaks, so that they wrap to the terminal
(rich keeps a single line break as it is); examples are one command a line.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperGroup

from qrecover.errors import EXIT_CODES

EXIT_CODE_HELP = "\n\n".join(f"{code}: {text}" for code, text in EXIT_CODES.items())


def _examples(*lines: str) -> str:
    """A command's epilog: its examples, one command a line, indented (a code block
    in docs/cli.md)."""
    return "Examples:\n\n" + "\n".join(f"    {line}" for line in lines)


def _no_flag_types(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", "") is None:
            param.metavar = ""
    return params


class Group(TyperGroup):
    """typer's group, whose help shows no type after a flag, and each command's
    whole summary in the list of commands (click cut it to 45 characters in
    docs/cli.md).  typer 0.29's rich help prints an option's type (``<bool>``)
    unless the option has a metavar, flags included (its plain help and ``typer ...
    utils docs`` leave flags' types out); an empty metavar is what it prints
    instead.  Set here, for every flag of every command, so that a new flag needs
    nothing of its own.  (click's classes are named through Any: typer 0.29 vendors
    click, older versions import it.)"""

    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_types(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            # its --help too, which click keeps apart from its params (made once)
            _no_flag_types([*command.params, command.get_help_option(ctx)])
            if command.short_help is None and command.help:
                # the whole summary in lists of commands, never cut at 45 characters
                command.short_help = command.help.split("\n\n")[0]
        return command


TOP_HELP = (
    "Recover data from a Qubes OS backup on any Linux machine, without Qubes. "
    "Reads every format Qubes wrote, R1 to R4.3, and tells them apart: "
    "format 1 (Qubes R1, R2-Beta1 and R2-Beta2: a plain folder, in which nothing can be "
    "authenticated), format 2 (R2-Beta3 to R2), format 3 (R2 updated, R3.0 to R3.2) "
    "and format 4 (R4.0 to R4.3).\n\n"
    "Runs the official emergency recovery procedure (tar, openssl or scrypt, "
    "gzip/bzip2/xz/zstd, tar) as real pipelines, authenticating every chunk before "
    "anything of it is decrypted or decompressed. 'qrecover COMMAND --help' shows a "
    "command's options and examples.\n\n"
    "Exit codes:\n\n" + EXIT_CODE_HELP
)

# Each command's help: its summary (the first paragraph, shown in the list of
# commands), then what else to know.
SUMMARIES = {
    "restore": "Verify and restore the backup's VMs (all, or those named with --vm) into DIR.",
    "files": "Copy files out of a VM image, or straight from a backup with --vm NAME, "
    "without root and without mounting anything."
    "\n\n"
    "Reads ext2/3/4 with e2fsprogs' debugfs read-only (-c), a whole-disk image (a "
    "template's root.img: GPT; a Windows qube's private.img: MBR) through its "
    "partition's offset, and NTFS with The Sleuth Kit (fls, icat): permissions and "
    "times are kept, symbolic links are copied as links and never followed, special "
    "files (devices, FIFOs, sockets) are skipped with a note.",
    "verify": "Check everything restore would, writing nothing: every HMAC, decryption, "
    "decompression, and a listing of each inner archive.",
    "script": "Print a standalone POSIX sh recovery script (no Python, no qrecover needed) for "
    "the VMs named with --vm (all without it), after verifying the header and qubes.xml.",
    "kit": "Write a recovery kit to keep beside the backup: qrecover.pyz (runs with only "
    "python3), recover.sh (no Python) and RECOVERY.txt (the procedure for this backup). "
    "The passphrase is asked for to read qubes.xml; no file of the kit holds it.",
    "info": "Verify the header and qubes.xml, then show the header and the VMs in the backup.",
}

B = "qubes-backup-2016-08-04T123456"  # the examples' backup

EXAMPLES = {
    "qrecover": _examples(
        "qrecover restore BACKUP --output restored            # everything",
        "qrecover restore BACKUP --output restored --vm work  # one VM",
        "qrecover files restored/work/private.img -o files    # my files",
        "qrecover verify BACKUP                               # check a backup",
        "qrecover kit BACKUP --output kit                     # a kit beside it",
    ),
    "restore": _examples(
        f"qrecover restore {B} --output restored",
        f"qrecover restore {B} -o out --vm work --files",
        f"qrecover restore {B} --output restored --resume",
        f"ssh host cat {B} | qrecover restore - -o out",
    ),
    "files": _examples(
        "qrecover files restored/work/private.img --output recovered",
        "qrecover files restored/work/private.img -o recovered /home/user/Documents",
        "qrecover files restored/work/private.img --list /",
        f"qrecover files {B} --vm work -o recovered",
        "qrecover files restored/fedora-41/root.img --list",
    ),
    "verify": _examples(
        f"qrecover verify {B}",
        f"qrecover verify {B} --vm work --explain",
        "qrecover verify --json --passphrase-file /root/backup.pass /backups/latest",
    ),
    "script": _examples(
        f"qrecover script {B} -o /mnt/out > recover.sh",
        "sh recover.sh    # asks for the passphrase",
    ),
    "kit": _examples(
        f"qrecover kit {B} --output kit",
        f"python3 -S -I kit/qrecover.pyz restore {B} -o out",
    ),
    "info": _examples(f"qrecover info {B}", f"qrecover info --json {B}"),
}
