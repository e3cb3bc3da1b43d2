"""The repository explains itself: cited design sections exist, and --help shows every default."""

import re
from pathlib import Path

import pytest

from fastvae.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"


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
