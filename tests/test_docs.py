"""The README is a landing page and docs/ holds the reference: every link between them resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def _local_links(page: Path) -> list[tuple[str, Path, str]]:
    links = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        links.append((target, (page.parent / path).resolve() if path else page, anchor))
    return links


def test_every_local_link_resolves_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target, path, anchor in _local_links(page):
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_and_links_back():
    linked = {path for _, path, _ in _local_links(ROOT / "README.md")}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ is empty"
    assert [p.name for p in pages if p.resolve() not in linked] == []
    assert [
        p.name for p in pages if (ROOT / "README.md").resolve() not in {x for _, x, _ in _local_links(p)}
    ] == []


def test_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text  # the two set-up commands


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad](there.md#nope) [web](https://x.org)\n")
    found = [
        (t, p.exists(), a in _anchors(p) if p.exists() and a else None) for t, p, a in _local_links(page)
    ]
    assert found == [
        ("there.md#a-heading", True, True),
        ("missing.md", False, None),
        ("there.md#nope", True, False),
    ]
