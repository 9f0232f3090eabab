"""Every code block of README.md runs as written, each on its own (a fresh interpreter or shell in an empty
folder), so an example cannot silently depend on an earlier one or drift from the API.

Blocks left out are marked in README.md itself by an HTML comment on the line just before the fence:
``<!-- readme-test: skip REASON -->`` (the reason is required and shown in the test id). The two set-up
commands at the top (they create a venv and install) are left out that way; blocks without a language
(the layout tree) are not code. ``fastcurv`` in a shell block runs ``python -m fastcurv.cli`` from this
tree when no ``fastcurv`` command is installed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(?P<reason>\S.*?)\s*-->")
TIMEOUT_S = 900


def readme_blocks(path: str = README) -> list[dict]:
    """The fenced blocks with a language: line number of the opening fence, language, code, skip reason."""
    blocks, lines, i = [], open(path, encoding="utf-8").read().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w+)\s*$", lines[i])
        if not fence and lines[i].startswith("```"):  # a block without a language: skip past its end
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
        elif fence:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"README.md line {start}: the ```{fence.group(1)} block is never closed")
            skip = SKIP.search(lines[start - 2]) if start >= 2 else None
            blocks.append({"line": start, "language": fence.group(1), "code": "\n".join(body) + "\n",
                           "skip": skip.group("reason") if skip else None})
        i += 1
    return blocks


BLOCKS = readme_blocks()


def _block_id(block: dict) -> str:
    first = next((line.strip() for line in block["code"].splitlines() if line.strip()), "")[:40]
    return f"line{block['line']}-{block['language']}-{first}"


def test_readme_has_blocks_and_the_install_commands_are_excluded_explicitly():
    assert len(BLOCKS) >= 5
    installs = [b for b in BLOCKS if "pip install" in b["code"] and "python3 -m venv" in b["code"]]
    assert len(installs) == 2 and all(b["skip"] for b in installs), \
        "the README's two set-up commands must stay marked <!-- readme-test: skip ... -->"
    unknown = {b["language"] for b in BLOCKS} - {"python", "bash"}
    assert not unknown, f"README blocks in languages this test cannot run: {unknown}"


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_readme_block_runs_as_written(block, tmp_path):
    if block["skip"]:
        pytest.skip(f"marked in README.md: {block['skip']}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore",
           # the interpreter's own scripts (torchrun, fastcurv) as an activated venv would have them
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    if block["language"] == "python":
        command = [sys.executable, "-c", block["code"]]
    else:
        prelude = "set -euo pipefail\n"
        if subprocess.run(["bash", "-c", "command -v fastcurv"], capture_output=True, env=env).returncode != 0:
            prelude += f'fastcurv() {{ "{sys.executable}" -m fastcurv.cli "$@"; }}\n'
        prelude += f'python() {{ "{sys.executable}" "$@"; }}\n'
        command = ["bash", "-c", prelude + block["code"]]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        pytest.fail(f"README.md line {block['line']}: the ```{block['language']} block failed (exit status "
                    f"{result.returncode}) when run alone in an empty folder. Make it self-contained (its own imports "
                    f"and inputs), or mark it with <!-- readme-test: skip REASON --> on the line before the fence.\n"
                    f"--- output (last lines) ---\n{tail}", pytrace=False)
