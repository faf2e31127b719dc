"""A named set of implementations (data sources, compressors, attention backends, scaling policies).

Each registry is defined once, in the package that implements its entries; `config.py` validates a
config field against the registry's names, and the code that dispatches looks the name up here instead
of an if-chain, so a new entry touches one file."""

from __future__ import annotations

from typing import Generic, TypeVar

from dalle_ds.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, field: str, what: str, *, off: str | None = None):
        """`off`: a name the field also accepts, meaning "none of them" (get returns None)."""
        self.field, self.what = field, what  # e.g. "data.dataset", "dataset"
        self._entries: dict[str, T | None] = {} if off is None else {off: None}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def check(self, name: str) -> None:
        """A ConfigError naming the field and the choices for an unknown name."""
        if name not in self._entries:
            raise ConfigError(f"{self.field}: unknown {self.what} {name!r}; choose one of {', '.join(self._entries)}")

    def get(self, name: str) -> T | None:
        self.check(name)
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries
