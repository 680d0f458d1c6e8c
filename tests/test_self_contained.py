"""The repository stands on its own: no text of it, no `--help` and no message points to documents a
clone does not have (a specification file and its numbered sections, seed documents, issue numbers),
and every relative link of the README and of docs/ leads to a file and heading that exist. Each check
also runs on made-up text that breaks it, so a pattern that stopped matching would fail here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()

#: What a reference to a text outside the repository looks like. "SPEC" is matched in capitals only, so
#: a variable called ``SPEC`` or ``spec`` is not one.
OUTSIDE_REFERENCES = [
    re.compile(r"\bSPEC(\.md\b|'s\b|\s+(section\s+)?\d|\s+(default|convention|section)\b|\s*[:;)])"),
    re.compile(r"\b(the|per|of|in|by|see|as|or|and) SPEC\b|\(SPEC[\s)]"),
    re.compile(r"(?i)\bseeds?[\s_-]*0\d\d\b|\bseeds/"),
    re.compile(r"(?i)\bissues?\s*#?\d+"),
    re.compile(r"\(2\.[1-8]([-/]2\.[1-8])?(\)|,\s*[A-Za-z])|#\s+2\.[1-8]\s"),
    re.compile(r"(?i)\b(the|project's) specification\b"),  # a bare section number: "(2.8)", "# 2.3 ..."
]
SKIP_DIRS = {".git", ".venv", "__pycache__", "data", "results", ".dagster_home", "out"}
TEXT_SUFFIXES = {".py", ".md", ".sql", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ini", ".json", ""}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def repository_texts() -> list[Path]:
    """The repository's text files: git's list (tracked and new) when there is one, else a walk."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.split("\n")
        paths = [REPO / p for p in listed if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if not SKIP_DIRS & set(p.relative_to(REPO).parts)]
    return sorted(p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES and p.resolve() != THIS_FILE
                  and not any(part.endswith(".egg-info") for part in p.parts))


def outside_references(text: str) -> list[str]:
    """Each line of `text` that refers to a text outside the repository, as ``line N: ...``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if any(p.search(line) for p in OUTSIDE_REFERENCES):
            found.append(f"line {number}: {line.strip()[:120]}")
    return found


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown` (lower case, punctuation dropped, spaces as
    dashes, ``-1``, ``-2`` ... for repeats); code blocks are not headings."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in _outside_code(markdown):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _outside_code(markdown: str) -> list[str]:
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """Relative links of one markdown file whose file or heading does not exist (named from `root`)."""
    problems = []
    for line in _outside_code(path.read_text(encoding="utf-8")):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{path.relative_to(root)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
                problems.append(f"{path.relative_to(root)}: {target} (no such heading)")
    return problems


def test_no_text_refers_to_documents_outside_the_repository():
    texts = repository_texts()
    assert REPO / "README.md" in texts and REPO / "docs" / "method.md" in texts
    found = {str(p.relative_to(REPO)): refs for p in texts if (refs := outside_references(p.read_text("utf-8")))}
    assert found == {}


def _help_texts() -> list[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    texts = [parser.format_help()]
    for name, sub in commands.items():
        texts.append(sub.format_help())
        inner = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        texts += [s.format_help() for a in inner for s in a.choices.values()]
    return texts


def test_no_help_refers_to_documents_outside_the_repository():
    texts = _help_texts()
    assert len(texts) >= 8 and any("validate" in t for t in texts)
    assert [refs for t in texts if (refs := outside_references(t))] == []


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_relative_links_lead_somewhere(doc):
    assert broken_links(REPO / doc) == []


def test_the_checks_see_what_they_look_for(tmp_path):
    for bad in ("as SPEC 2.8 says", "(SPEC 4)", "SPEC.md", "see SPEC", "SPEC's default", "seed 004", "seeds 003/004",
                "seed-003", "issue 14", "Issue #5", "(issue 13.2)", "the SPEC default", "Subsample (2.1).",
                "rotated pass (2.4-2.6, covariances)", "    # 2.3 position regression",
                "the specification's defaults", "what the README or SPEC promises"):
        assert outside_references(bad), bad
    for fine in ("SPEC = SyntheticSpec(model='m')", "write(tmp, SPEC, with_truth=False)", "range(SPEC.num_layers)",
                 "spec 2", "seed 0", "the seed of the subsample", "an issue with the cache",
                 "scales = (0.5, 2.7)", "linewidth=2.6,", 'python("-c", code, "2.5")', "load 2.6)", "for x in (2.2, 2.65, 9.0):"):
        assert not outside_references(fine), fine
    assert heading_anchors("# A b\n## Standard errors (`ap_se`, x)\n```\n# not a heading\n```\n## A b\n") == {
        "a-b", "standard-errors-ap_se-x", "a-b-1"}
    (tmp_path / "other.md").write_text("# Other\n## Part two\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#part-two) [ok](#here) [web](https://example.org/x)\n# Here\n"
                    "[gone](missing.md) [no heading](other.md#part-three) `[code](nowhere.md)`\n")
    assert broken_links(page, tmp_path) == ["page.md: missing.md (no such file)",
                                            "page.md: other.md#part-three (no such heading)"]
