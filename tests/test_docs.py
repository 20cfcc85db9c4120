"""The documentation holds together: the README stays a front page, every relative link resolves, the
README's Install and Tests blocks are what CI runs, and nothing cites a design document that is not in the
repository (the project's own ``docs/`` hold the equations and contracts the code cites)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
README_MAX_LINES = 160
# Built from two pieces so that this file does not match its own search.
EXTERNAL_DESIGN_CITATION = "DESIGN " + "§"

FENCE = re.compile(r"^\s*(```|~~~)")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: tracked files are unknown")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listing.decode().split("\0") if name]


def documentation_pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = github_anchor(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def relative_links(page: Path) -> list[str]:
    links = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in MARKDOWN_LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
                links.append(target)
    return links


def code_block_lines(markdown: str, section: str) -> list[str]:
    """The lines of the fenced code blocks under the level-2 heading ``section`` of a Markdown text."""
    lines, in_section, in_fence = [], False, False
    for line in markdown.splitlines():
        if not in_fence and line.startswith("## "):
            in_section = line[3:].strip() == section
            continue
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_section and in_fence:
            lines.append(line.strip())
    return lines


def ci_commands(prefix: str) -> list[str]:
    """The command lines of ``.ci/run`` that start with ``prefix``, comments and blank lines skipped."""
    commands = []
    for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and shlex.split(stripped)[: len(prefix.split())] == prefix.split():
            commands.append(stripped)
    return commands


def test_no_citation_of_an_external_design_document():
    offenders = []
    for path in tracked_files():
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        offenders += [
            f"{path.relative_to(ROOT)}:{number}"
            for number, line in enumerate(text.splitlines(), start=1)
            if EXTERNAL_DESIGN_CITATION in line
        ]
    assert not offenders, f"cite the project's docs/ instead of {EXTERNAL_DESIGN_CITATION}N: {offenders}"


def test_readme_is_a_front_page():
    n_lines = len(README.read_text(encoding="utf-8").splitlines())
    assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines; move detail into docs/"


@pytest.mark.parametrize("page", documentation_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    tracked = set(tracked_files())
    in_repository = tracked | {folder for path in tracked for folder in path.parents}
    broken = []
    for link in relative_links(page):
        path_part, _, anchor = link.partition("#")
        target = (page.parent / path_part).resolve() if path_part else page
        if target not in in_repository:
            broken.append(f"{link} (not a file or folder tracked in the repository)")
        elif anchor and target.suffix == ".md" and anchor not in anchors_of(target):
            broken.append(f"{link} (no heading with anchor #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_install_and_tests_are_what_ci_runs():
    readme = README.read_text(encoding="utf-8")
    installs, test_commands = ci_commands("pip install"), ci_commands("python -m pytest")
    assert installs and test_commands, ".ci/run no longer has the pip install / python -m pytest lines this test reads"
    install_block = code_block_lines(readme, "Install")
    missing = [command for command in installs if command not in install_block]
    assert not missing, f"README's Install block lacks what .ci/run installs: {missing}"
    positions = [install_block.index(command) for command in installs]
    assert positions == sorted(positions), "README's Install block gives the installs in another order than .ci/run"
    tests_block = code_block_lines(readme, "Tests")
    missing = [command for command in test_commands if command not in tests_block]
    assert not missing, f"README's Tests block lacks the command .ci/run runs: {missing}"
