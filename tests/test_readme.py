"""README.md says what runs: its python blocks execute as written, and its relative links resolve.

The python blocks are one session: the README tells the reader to run them in order, later
blocks using names the first one defines. So they run in that order, in one namespace, in a fresh
interpreter (a subprocess, so nothing this test process imported or configured leaks in). Each
block is compiled under its own name, ``README.md block N (line L)``, so a failure's traceback
shows the block and its line number in the README. bash blocks such as ``make``, ``torchrun`` and
``verify`` are left out: they install things, start processes or wait for other tools.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# A fenced block: the opening fence with its language, the body, the closing fence on a line of its own.
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# An inline link or image target: ](target) or ](target "title").
LINK = re.compile(r"\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")

# What the subprocess runs: (name, source) pairs from stdin, in order, in one namespace.
RUNNER = textwrap.dedent(
    """
    import json, sys
    namespace = {"__name__": "__main__"}
    blocks = json.load(sys.stdin)
    for name, source in blocks:
        exec(compile(source, name, "exec"), namespace)
    print(f"ran {len(blocks)} blocks")
    """
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line of the body, body) of every ```python block, in order."""
    return [
        (text.count("\n", 0, match.start("body")) + 1, match.group("body"))
        for match in FENCE.finditer(text)
        if match.group("lang") == "python"
    ]


def relative_links(text: str) -> list[str]:
    """Link targets outside fenced blocks that are neither URLs nor in-page anchors."""
    prose = FENCE.sub("", text)
    targets = [match.group("target") for match in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def named_sources(blocks: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """Each block under its own name, padded with blank lines so line numbers are the README's."""
    return [
        (f"README.md block {number} (line {line})", "\n" * (line - 1) + source)
        for number, (line, source) in enumerate(blocks, start=1)
    ]


def run_blocks(blocks: list[tuple[int, str]]) -> subprocess.CompletedProcess:
    """RUNNER in a fresh interpreter on ``blocks``, from the repository root.

    One intra-op thread: with two threads on two busy cores (CI runs other work beside it) every
    op waits for its partner thread, and the blocks took 12 s instead of 3.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(named_sources(blocks)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_python_blocks_run_in_order_in_one_session():
    text = README.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) >= 5, f"expected the README's usage blocks, found {len(blocks)} python blocks"
    # Every name the text says later blocks reuse is defined by the first block.
    first = blocks[0][1]
    for name in ("q", "k", "v", "settings", "out"):
        assert re.search(rf"^(?:\w+,\s*)*{name}\b[\w,\s]*=", first, re.MULTILINE), f"block 1 does not define {name!r}"

    result = run_blocks(blocks)
    assert result.returncode == 0, f"a README python block failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.rstrip().endswith(f"ran {len(blocks)} blocks"), result.stdout


def test_a_failing_block_fails_the_run():
    """The runner shares one namespace and reports a block that raises by its block and README line."""
    blocks = python_blocks("text\n```python\nx = 1\n```\nmore\n\n```python\nassert x == 2, 'x is 1'\n```\n")
    assert [line for line, _ in blocks] == [3, 8]
    result = run_blocks(blocks)
    assert result.returncode != 0
    assert 'File "README.md block 2 (line 8)", line 8' in result.stderr, result.stderr
    assert "AssertionError: x is 1" in result.stderr, result.stderr


def test_relative_links_point_to_existing_files():
    text = README.read_text(encoding="utf-8")
    links = relative_links(text)
    assert len(links) >= 5, f"expected the README's links to docs and results, found {links}"
    missing = [link for link in links if not (ROOT / unquote(link.split("#", 1)[0])).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_link_check_sees_a_missing_file():
    text = "[a](docs/semantics.md#1-tensors) [b](https://arxiv.org/abs/2307.02486) [c](#usage) [d](no/such/file.md)"
    assert relative_links(text) == ["docs/semantics.md#1-tensors", "no/such/file.md"]
    assert not (ROOT / "no/such/file.md").exists()
