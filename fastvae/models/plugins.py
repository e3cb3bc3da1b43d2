"""Named tables that third-party packages extend: architectures, likelihoods, objectives, priors.

A table holds frozen declaration objects under their `name`. The built-ins register when
their module is imported; plugins are distributions declaring an entry point in the table's
group, discovered lazily on the first lookup or listing, so importing fastvae stays cheap
and a broken plugin costs one warning instead of the import. An entry point may name a
declaration object (registered as it is), a module (importing it registers), or a callable
taking no arguments (calling it registers). Several tables may share one group: an
architecture plugin registers an encoder and a decoder (fastvae/models/registry.py).
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


class PluginGroup:
    """One entry-point group and the tables its plugins register into.

    The group, not each table, loads the entry points: tables sharing a group (encoders and
    decoders) would otherwise run every plugin once per table and repeat its warnings.
    what names the plugins in warnings ("architecture"); importing builtin_module registers
    the built-ins of every table of the group.
    """

    def __init__(self, name: str, what: str, builtin_module: str):
        self.name = name
        self.what = what
        self.builtin_module = builtin_module
        self.tables: list[PluginTable] = []
        self.builtins_imported = False
        self.loaded = False
        self.loading_source: str | None = None  # distribution whose entry point is being loaded

    def ensure_loaded(self) -> None:
        # Lookups run inside VAE.forward, which torch.compile traces; Dynamo cannot trace
        # importlib or the entry-point scan, so after the first lookup this is one flag test.
        if not self.builtins_imported:
            importlib.import_module(self.builtin_module)  # the built-ins register on import
            self.builtins_imported = True
        if not self.loaded:
            self.loaded = True
            self._scan()

    def reload(self) -> None:
        """Forget what plugins registered and scan the entry points again (after an install, in tests)."""
        for table in self.tables:
            table.forget_plugins()
        self.loaded = False
        self.ensure_loaded()

    @contextmanager
    def _registering_for(self, source: str):
        self.loading_source = source
        try:
            yield
        finally:
            self.loading_source = None

    def _scan(self) -> None:
        for ep in entry_points(group=self.name):
            dist = ep.dist.name if ep.dist is not None else ep.value
            try:
                with self._registering_for(dist):
                    self._load_entry_point(ep)
            except Exception as exc:  # a broken plugin must not take the others down
                warnings.warn(f"fastvae: skipped {self.what} plugin {ep.name!r} = {ep.value!r} from distribution "
                              f"{dist!r}: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=4)

    def _load_entry_point(self, ep) -> None:
        imported_before = ep.module in sys.modules
        obj = ep.load()
        table = next((t for t in self.tables if t.item_type is not None and isinstance(obj, t.item_type)), None)
        if table is not None:
            table.register(obj)
        elif not ep.attr:  # a module: its register calls ran on import, or run again now
            if imported_before:
                importlib.reload(obj)
        elif callable(obj):
            obj()
        else:
            declarations = [f"a {t.item_type.__name__}" for t in self.tables if t.item_type is not None]
            raise TypeError(f"entry point names {type(obj).__name__}, not {', '.join(declarations + ['a module'])} "
                            "or a callable")


class PluginTable(Generic[T]):
    """The declarations of one kind: built-ins and plugins from an entry-point `group`.

    kind names the declarations in messages ("likelihood"). item_type is their class, which
    register() checks and entry points may name; None where the caller builds and checks the
    items (the architecture decorators). code_of gives the function or class whose module tells
    a built-in from a user's registration. group is a PluginGroup shared with other tables, or
    the name of this table's own group, whose built-ins builtin_module registers.
    """

    def __init__(self, kind: str, group: str | PluginGroup, item_type: type | None, code_of: Callable[[T], Callable],
                 builtin_module: str | None = None):
        self.kind = kind
        self.group = group if isinstance(group, PluginGroup) else PluginGroup(group, kind, builtin_module)
        self.group.tables.append(self)
        self.item_type = item_type
        self.code_of = code_of
        self._entries: dict[str, Registered[T]] = {}

    # -- registration ---------------------------------------------------
    def register(self, item: T, *, override: bool = False) -> T:
        if self.item_type is not None and not isinstance(item, self.item_type):
            raise TypeError(f"register_{self.kind}() needs a {self.item_type.__module__}.{self.item_type.__name__}, "
                            f"got {item!r}")
        name = item.name
        existing = self._entries.get(name)
        if existing is not None and not override and not _same_declaration(existing.item, item, self.code_of):
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered by {self._registrant(existing)}; "
                                     "pass override=True to replace it")
        loading = self.group.loading_source
        self._entries[name] = Registered(item, self._source_of(item), from_plugin=loading is not None)
        return item

    def unregister(self, name: str) -> None:
        """Forget a registration (tests and interactive sessions); unknown names raise."""
        self.get(name)
        del self._entries[name]

    def forget_plugins(self) -> None:
        """Drop what entry points registered (PluginGroup.reload scans them again)."""
        for name in [name for name, entry in self._entries.items() if entry.from_plugin]:
            del self._entries[name]

    def _source_of(self, item: T) -> str:
        if self.group.loading_source is not None:
            return self.group.loading_source
        module = getattr(self.code_of(item), "__module__", None) or "unknown"
        return BUILTIN if module.startswith("fastvae.") else module

    def _registrant(self, entry: Registered[T]) -> str:
        # A class's name says which registration holds the name; a declaration's function
        # (often a private helper) would not, so only classes are named.
        code = self.code_of(entry.item)
        return f"{entry.source} ({code.__qualname__})" if isinstance(code, type) else entry.source

    # -- lookup ---------------------------------------------------------
    def get(self, name: str) -> T:
        self.group.ensure_loaded()
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
        self.group.ensure_loaded()
        return tuple(self._entries)

    def entries(self) -> list[Registered[T]]:
        self.group.ensure_loaded()
        return list(self._entries.values())

    def reload(self) -> None:
        """Reload the plugins of this table's group (every table sharing it included)."""
        self.group.reload()


def _same_declaration(a, b, code_of) -> bool:
    # A re-executed module (reload, importlib.reload) makes new objects for the same definition;
    # that is a refresh, not a clash.
    fa, fb = code_of(a), code_of(b)
    return (getattr(fa, "__module__", None), getattr(fa, "__qualname__", None)) == \
        (getattr(fb, "__module__", None), getattr(fb, "__qualname__", None))


def column_lines(rows: list[tuple[str, ...]]) -> list[str]:
    """One line per row, in left-aligned columns; the last column is not padded."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def format_rows(rows: list[tuple[str, ...]]) -> str:
    return "\n".join(column_lines(rows))
