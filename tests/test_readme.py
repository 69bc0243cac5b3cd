"""The README and docs/*.md say only what is there: every `semhitok` line of a ```bash block names a subcommand
and flags the CLI has (README lines parse as written), every `make X` is a Makefile target, every repository
file a block or a link names exists, every in-page anchor is a heading, and the README stays short. No command
runs: the CLI's parser is built in-process (tests/test_wheel.py runs the README's tested block)."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from semhitok.cli import build_parser
from tests.conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 300
# top-level folders of the repository: a block's token under one of them with a suffix is a file that must exist
REPO_FOLDERS = ("benchmarks", "configs", "data", "docker", "docs", "eval", "launch_scripts", "tests")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def command_lines(block: str) -> list[list[str]]:
    """A block's commands as argv lists: continuation lines joined, comments dropped, `[--flag]` (optional) kept
    as `--flag`."""
    argvs = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = [tok[1:-1] if tok.startswith("[-") and tok.endswith("]") else tok for tok in shlex.split(line, comments=True)]
        if argv:
            argvs.append(argv)
    return argvs


def semhitok_argv(argv: list[str]) -> list[str] | None:
    """The arguments after `semhitok` (as a command, `-m semhitok.cli`, or the Docker image's entry point)."""
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if argv[:1] == ["semhitok"]:
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["semhitok.cli"]:
        return argv[argv.index("-m") + 2:]
    if argv[:2] == ["docker", "run"] and "semhitok" in argv:
        return argv[argv.index("semhitok") + 1:]
    return None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_problems(args: list[str], parse: bool) -> list[str]:
    """What is wrong with `semhitok ARGS`: an unknown subcommand or flag (names exactly as the parser has them, no
    abbreviations); with `parse`, also whatever argparse refuses (a missing required flag, a bad choice)."""
    parser, words = build_parser(), []
    rest = list(args)
    while _subparsers(parser) and rest and not rest[0].startswith("-"):
        subs = _subparsers(parser)
        if rest[0] not in subs:
            return [f"unknown subcommand {' '.join(words + rest[:1])!r} (known: {', '.join(subs)})"]
        words.append(rest.pop(0))
        parser = subs[words[-1]]
    if _subparsers(parser) and not (rest and rest[0] in ("-h", "--help", "--version")):
        return [f"{' '.join(['semhitok', *words])!r} needs a subcommand"]
    problems = [f"{' '.join(['semhitok', *words])}: unknown flag {tok.split('=', 1)[0]!r}"
                for tok in rest if tok.startswith("-") and not re.fullmatch(r"-[0-9.]+", tok)
                and tok.split("=", 1)[0] not in parser._option_string_actions]
    if parse and not problems:
        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            if exc.code not in (0, None):
                problems.append(f"argparse refuses {shlex.join(['semhitok', *args])}")
    return problems


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE))


def block_problems(text: str, parse: bool) -> list[str]:
    """Every ```bash block of a page: its semhitok lines, make targets and repository files."""
    problems, targets = [], make_targets()
    for block in bash_blocks(text):
        for argv in command_lines(block):
            args = semhitok_argv(argv)
            if args is not None:
                problems += [f"{shlex.join(argv)}: {p}" for p in cli_problems(args, parse)]
            if argv[0] == "make":
                problems += [f"{shlex.join(argv)}: no Makefile target {t!r}" for t in argv[1:]
                             if not t.startswith("-") and "=" not in t and t not in targets]
            for tok in argv:
                path = tok.split("=", 1)[-1]
                named_file = path.split("/", 1)[0] in REPO_FOLDERS and re.search(r"\.[a-z]+$", path) and "*" not in path
                if named_file and not (REPO / path).exists():
                    problems.append(f"{shlex.join(argv)}: no file {path}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def link_problems(page: Path, text: str) -> list[str]:
    """Every Markdown link, image and <img src> of a page outside code: the file exists (relative to the page),
    and an anchor is one of the target page's headings."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)
    problems = []
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.name}: link to {target}: no {file.relative_to(REPO) if file.is_relative_to(REPO) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{page.name}: link to {target}: no heading with anchor #{anchor} in {file.name}")
    return problems


def test_readme_is_short_and_starts_with_the_user_path():
    lines = README.read_text().splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines (< {MAX_README_LINES}): move notes to docs/"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:3] == ["## What the default job shows", "## Set up and run (fresh machine, Python >= 3.11)",
                            "## What you get"], headings


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_command_blocks_name_what_exists(page):
    problems = block_problems(page.read_text(), parse=page == README)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_images_exist(page):
    problems = link_problems(page, page.read_text())
    assert not problems, "\n".join(problems)


def test_the_tested_block_is_semhitok_commands_only():
    """tests/test_wheel.py runs the block after the marker with the wheel's `semhitok`; keep it runnable there."""
    text = README.read_text()
    assert "<!-- readme-test:" in text
    block = text[text.index("<!-- readme-test:"):].split("```bash\n", 1)[1].split("```", 1)[0]
    argvs = command_lines(block)
    assert argvs and all(argv[0] == "semhitok" for argv in argvs), block


def test_the_checks_catch_a_broken_block_and_link(tmp_path):
    """Each check fails on what it is there to catch."""
    broken = ("```bash\nsemhitok sampel --model m --out o --prompt p\nsemhitok sample --model m --out o --prompt p "
              "--cfg 2\nsemhitok eval\nmake demoo\nbash launch_scripts/nope.sh\n"
              "torchrun --nproc_per_node 8 -m semhitok.cli train --confg 256\n```\n")
    problems = block_problems(broken, parse=True)
    assert len(problems) == 6, problems
    assert "sampel" in problems[0] and "'--cfg'" in problems[1] and "argparse refuses" in problems[2]
    assert "demoo" in problems[3] and "nope.sh" in problems[4] and "'--confg'" in problems[5]
    assert not block_problems("```bash\nsemhitok sample --model m --out o --prompt p --cfg-scale 2\nmake demo\n```\n",
                              parse=True)
    page = REPO / "docs" / "x.md"
    assert link_problems(page, "[a](tokenizer.md) ![b](images/shapes_generation.png) [c](eval.md#evaluation)") == []
    assert len(link_problems(page, "[a](tokenizr.md) ![b](docs/images/shapes_generation.png) "
                                   "<img src=\"images/nope.png\"> [c](eval.md#no-such-heading)")) == 4
