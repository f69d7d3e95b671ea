"""Comparison operators of rule checks: ``op(actual, expected) -> bool``.

String operators (``regex``, ``not_regex``, ``contains`` on text) apply to a string, or to *each item* of a
list: ``regex`` wants every item to match, ``not_regex`` wants no item to match. A check with ``join = " "``
joins a list into one string first (virtiofsd arguments given as ``["--sandbox", "none"]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Operator = Callable[[Any, Any], bool]


def _items(value: Any) -> list[Any]:
    if isinstance(value, list | tuple | set):
        return list(value)
    return [value]


def _search(pattern: str, value: Any) -> bool:
    return re.search(pattern, str(value)) is not None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    return float(int(text, 16)) if text.lower().startswith("0x") else float(text)


def _contains(actual: Any, expected: Any) -> bool:
    wanted = _items(expected)
    if isinstance(actual, str):
        return all(str(w) in actual for w in wanted)
    return all(w in _items(actual) for w in wanted)


def _not_contains(actual: Any, expected: Any) -> bool:
    unwanted = _items(expected)
    if isinstance(actual, str):
        return not any(str(w) in actual for w in unwanted)
    return not any(w in _items(actual) for w in unwanted)


def _no_pattern_matches(actual: Any, expected: Any) -> bool:
    """Each item of ``actual`` is a regular expression (as Kata treats ``enable_annotations``, unanchored);
    none may match any of the ``expected`` names. ``[".*"]`` therefore fails against everything."""
    for pattern in _items(actual):
        for name in _items(expected):
            try:
                if re.search(str(pattern), str(name)):
                    return False
            except re.error:
                return False  # Kata would reject it too; an unreadable pattern is not evidence of safety
    return True


def _empty(actual: Any, _expected: Any) -> bool:
    return actual in ("", None) or (isinstance(actual, list | tuple | dict | set) and len(actual) == 0)


OPERATORS: dict[str, Operator] = {
    "eq": lambda a, e: a == e,
    "ne": lambda a, e: a != e,
    "in": lambda a, e: a in _items(e),
    "not_in": lambda a, e: a not in _items(e),
    "subset_of": lambda a, e: all(item in _items(e) for item in _items(a)),
    "disjoint_from": lambda a, e: not any(item in _items(e) for item in _items(a)),
    "contains": _contains,
    "not_contains": _not_contains,
    "empty": _empty,
    "not_empty": lambda a, e: not _empty(a, e),
    "regex": lambda a, e: all(_search(e, item) for item in _items(a)),
    "not_regex": lambda a, e: not any(_search(e, item) for item in _items(a)),
    "no_pattern_matches": _no_pattern_matches,
    "bits_clear": lambda a, e: int(a) & int(e) == 0,
    "max_items": lambda a, e: len(_items(a)) <= int(e),
    "gte": lambda a, e: _number(a) >= _number(e),
    "lte": lambda a, e: _number(a) <= _number(e),
    "exists": lambda a, e: True,  # reached only when the key is present
    "absent": lambda a, e: False,  # reached only when the key is present
}

# Operators that take no ``expected`` value.
UNARY = frozenset({"empty", "not_empty", "exists", "absent"})
# Operators whose ``expected`` must be a regular expression.
REGEX = frozenset({"regex", "not_regex"})

DESCRIBE = {
    "eq": "== {e}",
    "ne": "!= {e}",
    "in": "one of {e}",
    "not_in": "none of {e}",
    "subset_of": "only items from {e}",
    "disjoint_from": "no item from {e}",
    "contains": "containing {e}",
    "not_contains": "not containing {e}",
    "empty": "empty",
    "not_empty": "not empty",
    "regex": "matching /{e}/",
    "not_regex": "not matching /{e}/",
    "no_pattern_matches": "no pattern matching any of {e}",
    "bits_clear": "with bits {e} clear",
    "max_items": "at most {e} item(s)",
    "gte": ">= {e}",
    "lte": "<= {e}",
    "exists": "set",
    "absent": "not set",
}


def describe(op: str, expected: Any) -> str:
    """``expected`` as a reader sees it in a report: ``== false``, ``not containing 'kernel_params'``."""
    shown = str(expected) if op in REGEX else _show(expected)
    return DESCRIBE[op].format(e=shown)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
