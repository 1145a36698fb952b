"""The Markdown pages against the repository: every relative link and anchor resolves,
every flag a page gives one of our commands is one that command's `--help` knows, every
`make` target exists, every test a page cites exists, and the README stays a short guide.

A page goes stale without anyone noticing when a file moves or a flag is renamed; these
checks make that a failing test instead."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"runs", "node_modules"}  # and hidden directories: .venv, .git, caches
README_MAX_LINES = 250
# Flags the pages name on purpose as ones the commands refuse (abbreviations of --trials
# and --epochs: a resume compares exact settings, so no abbreviation is accepted).
NAMED_AS_REFUSED = {"--trial", "--epoch"}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
# One of our scripts, run with python or named alone (`bench/train_throughput.py --quick`).
COMMAND = re.compile(r"(?:^|\s)(?:\S*python3?\s+)?((?:sweep|bench|data)/\w+\.py)\b(.*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
MAKE = re.compile(r"(?:^|\s)make\s+([a-z][\w-]*)")
TEST_REF = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")
# A quoted run of flags is a recipe or model for sweep/train.py's parser (the benchmarks'
# --a, --b, --c, --model): its flags are train.py's.
QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")


def markdown_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.md")
                  if not any(part in SKIP_DIRS or part.startswith(".") or part.endswith(".egg-info")
                             for part in p.relative_to(ROOT).parts[:-1]))


def split_code(text: str) -> tuple[str, list[str]]:
    """The page's prose with code taken out, and its code: fenced blocks (backslash
    continuations joined) and inline spans."""
    blocks = [b.replace("\\\n", " ") for b in FENCE.findall(text)]
    prose = FENCE.sub("", text)
    spans = INLINE_CODE.findall(prose)
    return INLINE_CODE.sub("", prose), blocks + spans


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    headings = HEADING.findall(FENCE.sub("", page.read_text()))  # a `# comment` is no heading
    return frozenset(slug(h) for h in headings)


def broken_links(page: Path) -> list[str]:
    prose, _ = split_code(page.read_text())
    broken = []
    for target in LINK.findall(prose) + REF_LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    return broken


# Every script's `--help`, each run as `python SCRIPT --help` would run it, in one Python
# process: the scripts share their imports (torch, Ray), which dominate each start.
HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
    out[script] = [code, text.getvalue()]
print(json.dumps(out))
"""


def help_texts(scripts: list[str]) -> dict[str, str]:
    """What `python SCRIPT --help` prints, for each script."""
    run = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.splitlines()[-1])
    failed = {s: code for s, (code, _) in results.items() if code not in (0, None)}
    assert not failed, f"--help did not exit 0: {failed}"
    return {s: text for s, (_, text) in results.items()}


def commands_in(code: str) -> list[tuple[str, list[str]]]:
    """(script, flags given to it) for each of our commands in a piece of code."""
    found = []
    for line in code.splitlines():
        for chunk in re.split(r"\|\||&&|;|\|", line):
            m = COMMAND.search(chunk.split(" #")[0])
            if m:
                quoted = " ".join(QUOTED.findall(m.group(2)))
                found.append((m.group(1), FLAG.findall(QUOTED.sub("", m.group(2)))))
                if FLAG.search(quoted):
                    found.append(("sweep/train.py", FLAG.findall(quoted)))
    return found


def scripts_named() -> set[str]:
    scripts = set()
    for page in markdown_files():
        _, code = split_code(page.read_text())
        scripts |= {s for c in code for s, _ in commands_in(c)}
    return scripts | {"sweep/run.py", "sweep/train.py"}


@pytest.fixture(scope="module")
def known_flags() -> dict[str, frozenset[str]]:
    """For each script the pages name, the flags its --help prints: what it accepts."""
    scripts = sorted(s for s in scripts_named() if (ROOT / s).is_file())
    return {s: frozenset(FLAG.findall(text)) for s, text in help_texts(scripts).items()}


def test_every_relative_link_and_anchor_resolves() -> None:
    pages = markdown_files()
    assert ROOT / "README.md" in pages and len(pages) > 1
    broken = {str(p.relative_to(ROOT)): b for p in pages if (b := broken_links(p))}
    assert not broken, f"links that point nowhere: {broken}"


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading, with `code`\n")
    page.write_text("[ok](other.md#a-heading-with-code) [gone](nope.md) "
                    "[no anchor](other.md#elsewhere) [web](https://example.com)\n"
                    "`[in code](nowhere.md)`\n")
    assert broken_links(page) == ["nope.md (no such file)",
                                  "other.md#elsewhere (no such heading)"]


def test_every_flag_the_pages_give_a_command_is_one_it_knows(known_flags) -> None:
    every_flag = frozenset().union(*known_flags.values())
    unknown = []
    for page in markdown_files():
        _, code = split_code(page.read_text())
        where = page.relative_to(ROOT)
        for piece in code:
            for script, flags in commands_in(piece):
                unknown += [f"{where}: {script} {f}" for f in flags
                            if f not in known_flags.get(script, ()) and f != "--help"]
            # Flags on their own (`--gpus-per-trial 0.5`) must be some command's.
            if piece.startswith("--"):
                unknown += [f"{where}: {f}" for f in FLAG.findall(piece)
                            if f not in every_flag and f not in NAMED_AS_REFUSED]
    assert not unknown, f"flags no command's --help knows: {unknown}"


def test_the_flag_check_tells_a_script_from_the_next_command() -> None:
    code = ("python sweep/run.py --gpus 4 --bogus && ray start --head  # --not-this\n"
            ".venv/bin/python sweep/train.py --preset small | tee log\n"
            "python bench/time_to_quality.py --c '--output one' --model \"--depth 3\"")
    assert commands_in(code) == [("sweep/run.py", ["--gpus", "--bogus"]),
                                 ("sweep/train.py", ["--preset"]),
                                 ("bench/time_to_quality.py", ["--c", "--model"]),
                                 ("sweep/train.py", ["--output", "--depth"])]


def test_every_make_target_the_pages_name_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    missing = []
    for page in markdown_files():
        _, code = split_code(page.read_text())
        missing += [f"{page.relative_to(ROOT)}: make {t}" for c in code
                    for t in MAKE.findall(c) if t not in targets]
    assert not missing, f"make targets the Makefile lacks: {missing}"


def test_every_test_the_pages_cite_exists() -> None:
    missing = []
    for page in markdown_files():
        for path, name in TEST_REF.findall(page.read_text()):
            test_file = ROOT / path
            if not test_file.is_file() or not re.search(rf"^def {name}\(",
                                                        test_file.read_text(), re.M):
                missing.append(f"{page.relative_to(ROOT)}: {path}::{name}")
    assert not missing, f"tests the pages cite that do not exist: {missing}"


def test_the_readme_is_a_short_guide() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines < README_MAX_LINES, (f"README.md has {lines} lines; keep it under "
                                      f"{README_MAX_LINES} and move detail to docs/")
