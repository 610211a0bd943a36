"""The README is a front page that works: its set-up commands are the Makefile's, and every
relative link of it and of the pages in docs/ leads to a file (and a heading) that exists."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings, as GitHub makes them."""
    text, in_code, found = page.read_text(), False, set()
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # another site
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name} links to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{page.name} links to {target}: no such heading"


def test_the_readme_opens_with_the_set_up_commands_and_they_are_the_makefiles():
    text = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first and text.index(first[0]) < text.index("\n## "), "no command block first"
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    commands = [shlex.split(line.split("#")[0]) for line in first[1].splitlines()]
    assert len(commands) == 2
    for words in commands:
        words = [w for w in words if "=" not in w]  # CNNLAB_DATA=./data
        assert words[0] == "make" and words[1] in targets, words
    assert re.search(r"^train: setup", makefile, re.M) and re.search(r"^test: setup", makefile,
                                                                     re.M)
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test\n" in ci  # CI runs the README's test command


def test_the_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 100
    assert "![" in text.split("\n## ")[0]  # a picture before the first section
