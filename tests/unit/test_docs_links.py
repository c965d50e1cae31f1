"""README.md and docs/*.md: every relative link points at a file of the repository, every #anchor at a heading.

Anchors follow GitHub's rules: the heading's text (inline code and emphasis marks dropped) lower-cased, every
character other than a letter, a digit, a space, `-` or `_` removed, spaces turned into `-`; a repeated heading
gets `-1`, `-2`, …. Links inside fenced code blocks and inline code are not links. External links are not fetched.
"""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their 1-based numbers."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters, digits and _ (Unicode letters stay, as on GitHub)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, m.group(1)))
    return found


def test_the_slugs_follow_githubs_rules() -> None:
    assert slug("The targets of issue 14, where they stand, and why (2026-12-04 23:41)") == \
        "the-targets-of-issue-14-where-they-stand-and-why-2026-12-04-2341"
    assert slug("Shared costs (`--rules FILE`)") == "shared-costs---rules-file"
    assert slug("Model aliases (`kind: model_aliases`)") == "model-aliases-kind-model_aliases"
    assert slug("`tally price`: why did this cost that") == "tally-price-why-did-this-cost-that"


def test_links_are_found_outside_code_only(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [a](a.md#x) and `[b](b.md)`.\n\n```\n[c](c.md)\n```\n![pic](p.png)\n")
    assert links(page) == [(3, "a.md#x"), (8, "p.png")]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_points_at_a_file_and_every_anchor_at_a_heading(page: Path) -> None:
    problems = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto: not fetched
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(REPO_ROOT)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if REPO_ROOT not in dest.parents and dest != REPO_ROOT:
            problems.append(f"{where}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with the anchor #{anchor}")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_landing_page() -> None:
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(REPO_ROOT / t.partition("#")[0]).resolve() for _, t in links(REPO_ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"
