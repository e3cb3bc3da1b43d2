"""The module names fastvae had before its sub-packages, kept importable.

Plugins and user code written against the flat layout import, for example,
`fastvae.registry` or `fastvae.likelihoods`; those names now live in fastvae.models,
fastvae.training and fastvae.io. An import of an old name returns the new module itself
(the same object, so registrations and monkeypatches made through either name agree).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

# old name (under fastvae.) -> the module it now is
MOVED = {
    "reference": "fastvae.ops.reference",
    "model": "fastvae.models.vae",
    "likelihoods": "fastvae.models.likelihoods",
    "objectives": "fastvae.models.objectives",
    "registry": "fastvae.models.registry",
    "plugins": "fastvae.models.plugins",
    "architectures": "fastvae.models.architectures",
    "train": "fastvae.training.trainer",
    "config": "fastvae.training.config",
    "checkpoint": "fastvae.training.checkpoint",
    "schedule": "fastvae.training.schedule",
    "optim": "fastvae.training.optim",
    "callbacks": "fastvae.training.callbacks",
    "metrics": "fastvae.training.metrics",
    "distributed": "fastvae.training.distributed",
    "evaluate": "fastvae.training.evaluate",
    "data": "fastvae.io.data",
    "images": "fastvae.io.images",
    "export": "fastvae.io.export",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module):
        # Already executed under its new name; importlib set __spec__ to the alias's, put the real one back
        # (importlib.reload and pickling read it).
        module.__spec__ = self.real_spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds `fastvae.<old>` and `fastvae.<old>.<sub>` (e.g. fastvae.architectures.mlp)."""

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != "fastvae" or parts[1] not in MOVED:
            return None
        new_name = ".".join([MOVED[parts[1]], *parts[2:]])
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new_name))


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # before PathFinder, which would load a second copy


def moved_module(name: str):
    """fastvae.<name> for an old top-level name (module __getattr__ of fastvae), else None."""
    return importlib.import_module(MOVED[name]) if name in MOVED else None
