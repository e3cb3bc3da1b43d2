"""Named tables of declarations (likelihoods, objectives) that third-party packages can extend.

A table holds frozen declaration objects under their `name`. The built-ins register when
their module is imported; plugins are distributions declaring an entry point in the table's
group, discovered lazily on the first lookup or listing (as architectures are, see
fastvae/models/registry.py), so importing fastvae stays cheap and a broken plugin costs one warning
instead of the import. An entry point may name a declaration object (registered as it is), a
module (importing it registers), or a callable taking no arguments (calling it registers).
"""

from __future__ import annotations

import difflib
import importlib
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

BUILTIN = "builtin"

T = TypeVar("T")


class UnknownNameError(LookupError, ValueError):
    """A name that no built-in or plugin registered."""


class DuplicateNameError(ValueError):
    """A second, different declaration registered under a taken name without override=True."""


@dataclass(frozen=True)
class Registered(Generic[T]):
    item: T
    source: str        # "builtin", the plugin's distribution name, or the registering module
    from_plugin: bool  # registered while an entry point loaded, so reload() forgets it


class PluginTable(Generic[T]):
    """The declarations of one kind: built-ins from `builtin_module`, plugins from entry-point `group`.

    kind names the declarations in messages ("likelihood"); item_type is their class; code_of
    gives the function whose module tells a built-in from a user's registration.
    """

    def __init__(self, kind: str, group: str, item_type: type, code_of: Callable[[T], Callable],
                 builtin_module: str):
        self.kind = kind
        self.group = group
        self.item_type = item_type
        self.code_of = code_of
        self.builtin_module = builtin_module
        self._entries: dict[str, Registered[T]] = {}
        self._plugins_loaded = False
        self._loading_source: str | None = None

    # -- registration ---------------------------------------------------
    def register(self, item: T, *, override: bool = False) -> T:
        if not isinstance(item, self.item_type):
            raise TypeError(f"register_{self.kind}() needs a {self.item_type.__module__}.{self.item_type.__name__}, "
                            f"got {item!r}")
        name = item.name
        existing = self._entries.get(name)
        if existing is not None and not override and not _same_declaration(existing.item, item, self.code_of):
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered by {existing.source}; "
                                     "pass override=True to replace it")
        self._entries[name] = Registered(item, self._source_of(item), from_plugin=self._loading_source is not None)
        return item

    def unregister(self, name: str) -> None:
        """Forget a registration (tests and interactive sessions); unknown names raise."""
        self.get(name)
        del self._entries[name]

    def _source_of(self, item: T) -> str:
        if self._loading_source is not None:
            return self._loading_source
        module = getattr(self.code_of(item), "__module__", None) or "unknown"
        return BUILTIN if module.startswith("fastvae.") else module

    # -- lookup ---------------------------------------------------------
    def get(self, name: str) -> T:
        self._ensure_loaded()
        entry = self._entries.get(name)
        if entry is None:
            known = sorted(self._entries)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} Known {self.kind}s: "
                                   f"{', '.join(known) or 'none'} (see `fastvae list`)")
        return entry.item

    def names(self) -> tuple[str, ...]:
        """Every registered name, plugins included, in registration order (built-ins first)."""
        self._ensure_loaded()
        return tuple(self._entries)

    def entries(self) -> list[Registered[T]]:
        self._ensure_loaded()
        return list(self._entries.values())

    # -- plugins --------------------------------------------------------
    def _ensure_loaded(self) -> None:
        importlib.import_module(self.builtin_module)  # the built-ins register on import
        if not self._plugins_loaded:
            self._plugins_loaded = True
            self._scan_plugins()

    def reload(self) -> None:
        """Forget what plugins registered and scan the entry points again (after an install, in tests)."""
        for name in [name for name, entry in self._entries.items() if entry.from_plugin]:
            del self._entries[name]
        self._plugins_loaded = False
        self._ensure_loaded()

    @contextmanager
    def _registering_for(self, source: str):
        self._loading_source = source
        try:
            yield
        finally:
            self._loading_source = None

    def _scan_plugins(self) -> None:
        for ep in entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else ep.value
            try:
                with self._registering_for(dist):
                    self._load_entry_point(ep)
            except Exception as exc:  # a broken plugin must not take the others down
                warnings.warn(f"fastvae: skipped {self.kind} plugin {ep.name!r} = {ep.value!r} from distribution "
                              f"{dist!r}: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=4)

    def _load_entry_point(self, ep) -> None:
        imported_before = ep.module in sys.modules
        obj = ep.load()
        if isinstance(obj, self.item_type):
            self.register(obj)
        elif not ep.attr:  # a module: its register calls ran on import, or run again now
            if imported_before:
                importlib.reload(obj)
        elif callable(obj):
            obj()
        else:
            raise TypeError(f"entry point names {type(obj).__name__}, not a {self.item_type.__name__}, "
                            "a module or a callable")


def _same_declaration(a, b, code_of) -> bool:
    # A re-executed module (reload, importlib.reload) makes new objects for the same definition;
    # that is a refresh, not a clash.
    fa, fb = code_of(a), code_of(b)
    return (getattr(fa, "__module__", None), getattr(fa, "__qualname__", None)) == \
        (getattr(fb, "__module__", None), getattr(fb, "__qualname__", None))


def format_rows(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)
