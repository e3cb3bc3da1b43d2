"""The README's Python examples run as written (in a temporary folder)."""

import re
from pathlib import Path

import pytest

from fastvae.models import registry

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, tmp_path, monkeypatch, scratch_registries):
    monkeypatch.chdir(tmp_path)
    before = {(info.kind, info.name) for info in registry.available()}
    try:
        exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})
    finally:  # what a block registers must not leak into other tests (scratch_registries: likelihoods, objectives)
        for kind, name in {(info.kind, info.name) for info in registry.available()} - before:
            registry.unregister(kind, name)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2
