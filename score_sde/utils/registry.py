"""The one registry class behind every name lookup (SDEs, models, samplers, estimators, configs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class Registry:
    """A named table of classes or functions, filled by decorators at their definition site.

    Example::

        PREDICTORS = Registry("predictor")

        @PREDICTORS.register("euler_maruyama")
        class EulerMaruyamaPredictor: ...

        PREDICTORS.get("euler_maruyama")  # the class
        PREDICTORS.get("foo")  # ValueError: Unknown predictor 'foo'; valid: euler_maruyama

    Args:
        kind: what the entries are, used in error messages ("predictor", "SDE", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str | None = None, *, aliases: tuple[str, ...] = ()) -> Callable:
        """Return a decorator that registers its argument under ``name`` (default: ``__name__``)."""

        def decorator(obj: Any) -> Any:
            key = name if name is not None else obj.__name__
            for k in (key, *aliases):
                if k in self._entries and self._entries[k] is not obj:
                    raise ValueError(f"{self.kind} {k!r} is already registered")
                self._entries[k] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        """Look up ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}: {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"Unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
