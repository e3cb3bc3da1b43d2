"""The Python examples of the README and the docs pages, as the tests run them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(page: Path) -> list[str]:
    """The page's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def run_python_blocks(page: Path) -> dict:
    """Run the page's blocks as written, in order, in one namespace (a block may continue the one
    before), in the current folder; returns the namespace."""
    namespace = {"__name__": "docs_example"}
    for index, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.relative_to(ROOT)} python block {index}", "exec"), namespace)
    return namespace
