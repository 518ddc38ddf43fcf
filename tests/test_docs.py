"""The documentation holds together: every relative link in README.md and docs/*.md resolves, and the
package never points readers to documents outside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
OUTSIDE = re.compile(r"\bMISSION\b|\bDESIGN\.md\b|(?i:\b(the|a) mission\b|\bmission document|\bthe seeds\b)")


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def test_the_patterns_find_what_they_look_for():
    assert OUTSIDE.search("see MISSION.md section 2") and OUTSIDE.search("step 5 of the mission")
    assert OUTSIDE.search("as DESIGN.md says") and OUTSIDE.search("the seeds' DPOTrainerWithLoRA")
    assert not OUTSIDE.search("one submission per item") and not OUTSIDE.search("with fixed seeds")
    text = "see [the guide](docs/ARCHITECTURE.md) and ![plot](docs/images/a.png \"title\"), [web](https://x.org)"
    assert LINK.findall(text) == ["docs/ARCHITECTURE.md", "docs/images/a.png", "https://x.org"]
    assert anchor("The built-in experiment (`make demo`)") == "the-built-in-experiment-make-demo"


def test_the_architecture_document_exists_and_readme_links_it():
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()
    assert "docs/ARCHITECTURE.md" in relative_links(ROOT / "README.md")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for target in relative_links(document):
        file_part, _, fragment = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(target)
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(target)
    assert broken == []


def test_no_module_points_to_a_document_outside_the_repository():
    files = [*ROOT.joinpath("preftune").rglob("*.py"), *ROOT.joinpath("preftune").rglob("*.html"), *DOCUMENTS]
    mentions = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                for path in files
                for number, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert mentions == []


def test_every_make_target_the_documents_name_exists():
    makefile = (ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    named = {m for path in DOCUMENTS for m in re.findall(r"`make ([a-z][\w-]*)", path.read_text())}
    assert {"demo", "demo-chat", "demo-chat-seeds", "test"} <= named
    assert named - defined == set() and phony - defined == set()
