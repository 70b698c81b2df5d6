"""Every command the README and docs/ show, checked as typed: each `python -m cascade ...` line
composes to a valid config (the same check the CLI makes before Ray starts) with only the flags its
sub-command takes, the planner's commands run to their output, `--help` runs, each benchmark and
script named exists and takes the flags shown. The commands that run models are run as typed by
the tests that own them (the README's two by test_readme, a kill and a resume included); a command
here is checked for what a typo would break."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
START = re.compile(r"^    (\$ )?((\.venv/bin/)?python |scripts/\S|curl |[A-Z_]+=\S+ )")


def shown() -> list[tuple[str, list[str], list[str]]]:
    """(page:line, argv, the output shown after a `$ ` command) for every command line of the
    pages' indented blocks: `\\` continuations joined, comments dropped, `a && b` split."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            m = START.match(line)
            if not m:
                continue
            text, j = line[4 + len(m.group(1) or ""):], i
            while text.rstrip().endswith("\\"):
                j += 1
                text = text.rstrip()[:-1] + " " + lines[j].strip()
            output = []
            if m.group(1):  # `$ cmd` then what it prints, up to a blank line
                k = j + 1
                while k < len(lines) and lines[k].strip():
                    output.append(lines[k].strip())
                    k += 1
            argv = shlex.split(text, comments=True)
            while "&&" in argv:
                cut = argv.index("&&")
                out.append((f"{page.name}:{i + 1}", argv[:cut], []))
                argv = argv[cut + 1:]
            out.append((f"{page.name}:{i + 1}", argv, output))
    return out


COMMANDS = shown()


def _flags(script: Path) -> set[str]:
    """The --options a script's argparse declares."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            names |= {a.value for a in node.args
                      if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return names


def _cascade(where: str, args: list[str], output: list[str], tmp: Path) -> None:
    from cascade.__main__ import SUBCOMMANDS
    from cascade.config import compose

    if "--help" in args or args[:1] == ["plan"] or "plan=true" in args:
        r = subprocess.run([sys.executable, "-m", "cascade", *args], cwd=tmp, text=True,
                           capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
        said = r.stdout + r.stderr
        if output:  # the page shows what it prints: its first line's head must be there
            assert output[0][:40] in said, (where, output[0], said[-2000:])
        else:
            assert r.returncode == 0, (where, said[-2000:])
        return
    known: tuple[str, ...] = ()
    if args and args[0] in SUBCOMMANDS:
        known = SUBCOMMANDS[args[0]][1]
        args = args[1:]
    flags = [a for a in args if a.startswith("--")]
    assert set(flags) <= set(known), (where, flags, known)
    compose([a for a in args if a not in flags])  # raises what the CLI would report


@pytest.mark.parametrize("where,argv,output", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_in_the_docs_holds_as_typed(where, argv, output, tmp_path):
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # an environment variable set for the command
        argv = argv[1:]
    if "..." in argv or argv[0] == "curl":
        pytest.skip("elided, or needs a server the page starts first (test_serve runs one)")
    if argv[0].endswith("python") and argv[1:3] == ["-m", "cascade"]:
        return _cascade(where, argv[3:], output, tmp_path)
    if argv[0].endswith("python") and argv[1] == "-m":  # the test command: CI runs it as typed
        assert argv[2] == "pytest", (where, argv)
        return
    script = ROOT / (argv[1] if argv[0].endswith("python") else argv[0])
    assert script.is_file(), (where, script)
    if script.suffix == ".sh":
        assert os.access(script, os.X_OK), (where, script)
        return
    flags = {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
    assert flags <= _flags(script), (where, flags - _flags(script))
    from cascade.config import compose

    compose([a for a in argv[2:] if "=" in a and not a.startswith("--")] + ["+stage=4b"])


def test_the_docs_show_commands():
    """The extraction finds what the pages hold (a reformatted page cannot turn this test empty)."""
    assert len(COMMANDS) >= 30, COMMANDS
    assert sum(a[1:3] == ["-m", "cascade"] for _, a, _ in COMMANDS) >= 15
