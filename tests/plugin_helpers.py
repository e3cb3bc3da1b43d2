"""Installing plugin distributions into a test's fake site folder, as pip would (no pip, no network)."""

import shutil
import tomllib
from pathlib import Path

from fastvae.models import registry

TOY_PLUGIN = Path(__file__).parent / "plugin_fixture" / "fastvae_toy_plugin"


def install(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str],
            groups: dict[str, dict[str, str]] | None = None) -> None:
    """Write modules and a dist-info for `dist` so importlib.metadata finds it: entry_points in the
    architectures group, and groups {group: {name: value}} for the others."""
    for relative, source in modules.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = []
    for group, entries in {registry.ENTRY_POINT_GROUP: entry_points, **(groups or {})}.items():
        lines += [f"[{group}]"] + [f"{name} = {value}" for name, value in entries.items()] + [""]
    info.joinpath("entry_points.txt").write_text("\n".join(lines))


def install_toy_plugin(site: Path) -> None:
    """Install tests/plugin_fixture/fastvae_toy_plugin with the entry points its pyproject declares."""
    project = tomllib.loads((TOY_PLUGIN / "pyproject.toml").read_text())["project"]
    shutil.copytree(TOY_PLUGIN / "src", site, dirs_exist_ok=True)
    declared = dict(project["entry-points"])
    install(site, project["name"], declared.pop(registry.ENTRY_POINT_GROUP), {}, groups=declared)
