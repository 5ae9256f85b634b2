"""The docs name only flags the CLI has: every `--flag` on a line that runs a `distill`
command in README.md or docs/*.md must be in that command's --help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distillcache.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("serve", "cache", "train", "inspect", "verify", "export", "demo")
COMMAND_LINE = re.compile(r"\bdistill (" + "|".join(COMMANDS) + r")\b(.*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def help_text(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result.output


def doc_flags() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for match in COMMAND_LINE.finditer(line):
                command, rest = match.groups()
                for flag in FLAG.findall(rest.split("`")[0] if "`" in line else rest):
                    found.append((f"{doc.relative_to(ROOT)}:{number}", command, flag))
    return found


def test_the_docs_run_distill_commands_with_flags():
    assert len(doc_flags()) >= 20


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_the_docs_give_a_command_is_in_its_help(command):
    helps = help_text(command)
    missing = [
        f"{where}: distill {cmd} {flag}"
        for where, cmd, flag in doc_flags()
        if cmd == command and flag not in helps
    ]
    assert not missing, "flags the docs name but the CLI lacks:\n" + "\n".join(missing)
