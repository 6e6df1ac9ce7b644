"""The small registry every kind that grows uses (OOD scores, image formats, selection strategies, gateway
result writers): a name -> instance table, filled by a class decorator, in registration order.

Example:
    >>> SCORES = Registry("OOD method")
    >>> @SCORES.register
    ... class Energy:
    ...     name = "energy"
    >>> SCORES.lookup("energy"), SCORES.names()
"""

from __future__ import annotations

from typing import Any


class Registry(dict):
    """name -> one instance of each registered class; `kind` names the kind in errors."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: type) -> type:
        """Class decorator: register one instance of `cls` under `cls.name`."""
        if cls.name in self:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
        self[cls.name] = cls()
        return cls

    def lookup(self, name: str) -> Any:
        """The instance registered as `name`; ValueError names the registered ones."""
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"{self.kind} {name!r} is unknown (choose one of {', '.join(self)})") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self)
