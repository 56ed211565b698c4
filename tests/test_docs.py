"""The docs stand alone in a clone: every link and cited path is inside the repository and exists."""

import re
import subprocess
from pathlib import Path

import pytest

from app.auth import RESERVED_SUBDOMAINS
from tests.support import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<(https?://[^>\s]+)>")
CITED_PATH = re.compile(r"`((?:app|bench|docs|sql|tests)/[A-Za-z0-9_./-]+)`")


def tracked(pattern: str) -> list[Path]:
    names = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in names.stdout.split()]


def anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub makes them: lowercase, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(path: Path) -> list[str]:
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # commands in code blocks are not links
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("doc", tracked("*.md"), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    for target in links(doc):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert resolved.exists(), f"{doc.name} links to a missing file: {target}"
        if anchor:
            assert anchor in anchors(resolved.read_text()), f"{doc.name}: no heading for {target}"


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_readme_and_api_reference_link_to_no_other_host(doc: str) -> None:
    local = re.compile(r"https?://[\w.]*localhost\b")
    outside = [t for t in links(ROOT / doc) if re.match(r"[a-z]+:", t) and not local.match(t)]
    assert outside == []


def test_no_tracked_file_reaches_outside_the_repository() -> None:
    needle = "../" + "shared"  # spelled so that this file does not match itself
    files = [p for p in tracked("*") if p.is_file()]
    offenders = [str(p.relative_to(ROOT)) for p in files if needle in p.read_text(errors="ignore")]
    assert offenders == []


def test_paths_the_docs_cite_exist_in_a_clone() -> None:
    ignored = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    for doc in tracked("*.md"):
        for cited in CITED_PATH.findall(doc.read_text()):
            # A path, an ignored one the tools make, or a migration by its number (`sql/0005`).
            found = (ROOT / cited).exists() or cited in ignored or any(ROOT.glob(cited + "_*"))
            assert found, f"{doc.name} cites {cited}, which a clone lacks"


def test_the_reserved_subdomains_are_published_as_the_code_has_them() -> None:
    text = (ROOT / "docs/api.md").read_text()
    paragraph = text.split("**Desk subdomains**", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"`([a-z0-9-]+)`", paragraph.split("(`headoni desk create` refuses them):", 1)[1])
    assert listed == sorted(RESERVED_SUBDOMAINS)
