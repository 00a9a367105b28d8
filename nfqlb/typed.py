"""Typed reads of one table of user input: the getters config and policy options share.

A reader holds a mapping (a TOML table: ``[daemon]``, one ``[[service]]``, a service's
``[service.policy_options]``) and reads a value by name with its type, default and bounds.
The problems are worded here, once; what they are raised as is the subclass's business:
``fail(name, problem)`` returns the exception. The configuration's checker makes it a
``ConfigError`` naming the file and the full key; ``policies.Options`` a ``PolicyOptionError``
naming the option, which the configuration reports under ``policy_options.<name>``.
"""

from __future__ import annotations

import abc
import enum
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from nfqlb.values import IPAddress

__all__ = ["TableReader"]

E = TypeVar("E", bound=enum.Enum)


class TableReader(abc.ABC):
    """Typed getters over ``table``; every problem is raised as ``self.fail(name, problem)``."""

    def __init__(self, table: Mapping[str, Any]) -> None:
        self.table = table

    @abc.abstractmethod
    def fail(self, name: str, problem: str) -> Exception:
        """The exception that reports ``problem`` with the value named ``name``."""

    def has(self, name: str) -> bool:
        return name in self.table

    def get(self, name: str, default: Any = None) -> Any:
        """The raw value, unchecked."""
        return self.table.get(name, default)

    def text(self, name: str, default: str | None = None) -> str:
        value = self.table.get(name, default)
        if value is None:
            raise self.fail(name, "is required")
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"must be a non-empty string, not {value!r}")
        return value

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int:
        value = self.table.get(name, default)
        if value is None:
            raise self.fail(name, "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, not {value!r}")
        if not lo <= value <= hi:
            raise self.fail(name, f"{value} is out of range {lo}-{hi}")
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"must be a number, not {value!r}")
        if not lo <= value <= hi:
            raise self.fail(name, f"{value} is out of range {lo}-{hi}")
        return float(value)

    def seconds(self, name: str, default: float) -> float:
        value = self.table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.fail(name, f"must be a positive number of seconds, not {value!r}")
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, not {value!r}")
        return value

    def choice(self, name: str, enum_type: type[E], default: str | None) -> E:
        """One of ``enum_type``'s members, by name, case-insensitively."""
        value = self.text(name, default)
        names = {m.name.lower(): m for m in enum_type}
        if value.lower() not in names:
            raise self.fail(name, f"{value!r} is not one of: {', '.join(names)}")
        return names[value.lower()]

    def address(self, name: str, required: bool = True) -> IPAddress | None:
        """A unicast IP address (None if absent and not ``required``)."""
        if name not in self.table:
            if required:
                raise self.fail(name, "is required")
            return None
        value = self.table[name]
        if not isinstance(value, str):
            raise self.fail(name, f"must be an IP address string, not {value!r}")
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise self.fail(name, f"{value!r} is not an IP address") from None
        if addr.is_unspecified or addr.is_multicast:
            raise self.fail(name, f"{value} cannot be used here (unspecified or multicast)")
        return addr

    def subset(self, name: str, default: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
        """A non-empty list of distinct names out of ``allowed``, kept in ``allowed``'s order."""
        value = self.table.get(name, list(default))
        if not isinstance(value, list) or not value \
                or not all(isinstance(v, str) for v in value):
            raise self.fail(name, f"must be a non-empty list of names out of "
                            f"{', '.join(allowed)}; not {value!r}")
        for v in value:
            if v not in allowed:
                raise self.fail(name, f"{v!r} is not one of: {', '.join(allowed)}")
        if len(set(value)) != len(value):
            raise self.fail(name, f"{value!r} names a field twice")
        return tuple(a for a in allowed if a in value)
