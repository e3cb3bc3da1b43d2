"""The repository explains itself: the README's and the docs pages' Python examples run, every
repository path they cite exists, cited design sections exist, and --help shows every default."""

import re
from pathlib import Path

import pytest

from docs_helpers import ROOT, python_blocks, run_python_blocks
from fastvae.cli import build_parser

DESIGN = ROOT / "docs" / "DESIGN.md"
EXECUTED_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # their ```python blocks run
# Pages whose examples a test of their own runs and checks (so they do not run twice).
RUN_BY = {"docs/loops.md": "tests/test_loops.py"}
CITING_PAGES = EXECUTED_PAGES + [ROOT / "benchmarks" / "README.md", ROOT / "fastvae" / "io" / "_data" / "README.md"]
# A backticked span cites a repository path when its first component is one of these (top-level entries).
TOP_LEVEL = ("README.md", "pyproject.toml", "setup.py", ".ci", "benchmarks", "csrc", "docs", "fastvae", "tests")


def page_name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", [page_name(page) for page in EXECUTED_PAGES
                                  if python_blocks(page) and page_name(page) not in RUN_BY])
def test_python_blocks_run(page, tmp_path, monkeypatch, scratch_registries):
    """A page's examples as written, in a temporary folder; what they register does not leak
    (scratch_registries: architectures, likelihoods, objectives)."""
    monkeypatch.chdir(tmp_path)
    run_python_blocks(ROOT / page)


def test_pages_run_elsewhere_are_run_there():
    for page, test in RUN_BY.items():
        assert (ROOT / page).exists() and page in (ROOT / test).read_text(), (page, test)


def test_every_docs_page_has_an_example():
    for page in EXECUTED_PAGES:
        if page != DESIGN:
            assert python_blocks(page), page_name(page)


def link_targets(text: str) -> list[str]:
    """The targets of Markdown links [text](target)."""
    return re.findall(r"\]\(([^)\s]+)\)", text)


def backticked_paths(text: str) -> list[str]:
    """Backticked spans that name a repository path: no spaces, first component a top-level entry
    of TOP_LEVEL. Patterns (`tests/test_<name>_op.py`, globs) and code (`a = b`) are not paths."""
    spans = re.findall(r"`([^`\s]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    return [s for s in spans if s.split("/")[0] in TOP_LEVEL and not re.search(r"[<>*{}()=]|\.\.\.", s)]


def made_by_commands(path: Path) -> bool:
    """Under a git-ignored folder of .gitignore (benchmarks/gpu/data/): a place a command fills, not a
    file of the repository."""
    folders = [line for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.endswith("/") and not re.search(r"[*?\[]", line)]
    return any(path.is_relative_to(ROOT / folder) for folder in folders)


def cited_paths(page: Path) -> list[tuple[str, Path]]:
    """(as written, resolved) for every path the page cites: link targets relative to the page,
    backticked paths relative to the repository root."""
    text = page.read_text()
    cited = [(target, (page.parent / target.split("#")[0]).resolve())
             for target in link_targets(text) if not target.startswith("#")]
    cited += [(span, (ROOT / span.split("#")[0]).resolve()) for span in backticked_paths(text)]
    return [(written, path) for written, path in cited if not made_by_commands(path)]


def test_the_citation_rules_find_paths_and_leave_code_alone():
    text = ("See [the design](DESIGN.md#3-layout), `csrc/ops.cpp`, `tests/test_<name>_op.py`, `fastvae list`,\n"
            "`torch.compile`, `fastvae/ops/`.\n```bash\nfastvae train `csrc/not/cited.h`\n```\n")
    assert link_targets(text) == ["DESIGN.md#3-layout"]
    assert backticked_paths(text) == ["csrc/ops.cpp", "fastvae/ops/"]
    assert sum(len(cited_paths(page)) for page in EXECUTED_PAGES) >= 50  # the manual cites the code


@pytest.mark.parametrize("page", [page_name(page) for page in CITING_PAGES])
def test_every_cited_repository_path_exists(page):
    cited = cited_paths(ROOT / page)
    outside = [written for written, path in cited if not path.is_relative_to(ROOT)]
    missing = [written for written, path in cited if path.is_relative_to(ROOT) and not path.exists()]
    assert not outside, f"{page} cites paths outside the repository: {outside}"
    assert not missing, f"{page} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("page", [page_name(page) for page in CITING_PAGES])
def test_no_page_points_outside_the_repository(page):
    """No link leaves the repository (no URL, no ../ above the root), and no text climbs out with ../."""
    text = (ROOT / page).read_text()
    assert not [t for t in link_targets(text) if re.match(r"[a-z]+:", t)], page
    prose = re.sub(r"\]\([^)\s]+\)", "]", text)  # link targets are checked above
    assert "../" not in prose, page


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", [page_name(page) for page in CITING_PAGES])
def test_every_linked_heading_exists(page):
    source = ROOT / page
    missing = []
    for target in link_targets(source.read_text()):
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        if anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            missing.append(target)
    assert not missing, f"{page} links headings that do not exist: {missing}"


def test_the_layout_drawing_names_real_paths():
    """docs/DESIGN.md draws the package once; each entry's first path exists."""
    section = DESIGN.read_text().split("## 3. Layout")[1].split("\n## ")[0]
    entries = re.findall(r"^    (\S+?),?\s", section, flags=re.M)
    assert len(entries) >= 15
    missing = [entry for entry in entries if not (ROOT / entry).exists()]
    assert not missing, missing


def cited_sections():
    """(file, section number) for every "DESIGN.md section N" / "sections N and M" in the repository."""
    found = []
    for folder in ("csrc", "fastvae", ".ci", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".h", ".cpp", ".cu", ".py", ".sh", ".md") or not path.is_file():
                continue
            for match in re.finditer(r"DESIGN\.md sections? ([0-9]+(?: and [0-9]+)*)", path.read_text()):
                found += [(path.relative_to(ROOT), int(n)) for n in match.group(1).split(" and ")]
    return found


def test_every_cited_design_section_exists():
    headings = {int(n) for n in re.findall(r"^## ([0-9]+)\. ", DESIGN.read_text(), flags=re.M)}
    citations = cited_sections()
    assert len(citations) >= 11
    missing = [(str(path), n) for path, n in citations if n not in headings]
    assert not missing, missing


@pytest.mark.parametrize("command", ["train", "eval", "sample", "reconstruct", "interpolate", "traverse", "bench"])
def test_help_shows_every_default(command):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices[command]
    help_text = " ".join(parser.format_help().split())  # argparse wraps lines
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False) and action.dest != "help":
            assert f"(default: {action.default})" in help_text, (command, action.dest)
