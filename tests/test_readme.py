"""The README is the front door: short, install and first run as lines a person can copy, the test
command CI runs, and a link to every page of the manual. (Its Python examples run in test_docs.py,
with the docs pages' examples.)"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINES = README.read_text().splitlines()


def test_readme_is_short():
    assert len(LINES) <= 200


def test_install_and_first_run_are_lines_of_their_own_near_the_top():
    top = [line.strip() for line in LINES[:60]]
    assert any(re.fullmatch(r"(\S*/)?pip install torch==\S+( \S+)*", line) for line in top), top
    assert any(re.fullmatch(r"(\S*/)?pip install --no-build-isolation \.", line) for line in top), top
    assert any(re.fullmatch(r"(\S*/)?fastvae train --out runs/digits", line) for line in top), top
    install = next(i for i, line in enumerate(top) if line.endswith("pip install --no-build-isolation ."))
    first_run = next(i for i, line in enumerate(top) if line.endswith("fastvae train --out runs/digits"))
    assert install < first_run


def test_the_ci_test_command_is_where_ci_reads_it():
    """.ci/run takes the line after "Install the test requirements" and its ```bash fence."""
    script = ROOT / ".ci" / "run"
    awk = re.search(r"awk '([^']*)' README\.md", script.read_text()).group(1)
    command = subprocess.run(["awk", awk, str(README)], capture_output=True, text=True, check=True).stdout.strip()
    assert "pip install --no-build-isolation -e \".[test]\"" in command
    assert command.endswith("-m pytest tests")


def test_readme_links_every_page_of_the_manual():
    text = README.read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in text, page.name


def test_readme_has_python_examples():
    assert len(re.findall(r"^```python$", README.read_text(), flags=re.M)) >= 2
