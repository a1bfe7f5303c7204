"""The documentation stays true: the generated configuration reference matches lit_hsa/config.py, the README stays
short, and every relative link in README.md and docs/*.md points to a file that exists."""
from __future__ import annotations

import re
from pathlib import Path

from lit_hsa.config_reference import REGENERATE, reference_markdown
from tests.helpers import ROOT

LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # markdown [text](target) or [text](target "title")


def test_configuration_reference_is_current():
    path = ROOT / "docs" / "configuration.md"
    assert path.is_file(), f"docs/configuration.md is missing: generate it with `{REGENERATE}`"
    assert path.read_text(encoding="utf-8") == reference_markdown(), (
        f"docs/configuration.md is stale (lit_hsa/config.py changed): regenerate with `{REGENERATE}`"
    )


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines (at most 220): move detail into docs/"


def relative_links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are code, not links
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^(?:[a-z][a-z0-9+.-]*:|#)", t, flags=re.I)]


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in relative_links(page):
            file = target.split("#", 1)[0]
            if not (page.parent / file).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
