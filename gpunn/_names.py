"""Resolving user-given names (activations, losses, ...) with helpful errors."""

from __future__ import annotations

import difflib


def unknown_name_error(argument: str, what: str, got, valid) -> ValueError:
    """A ValueError naming the argument, the valid names and the closest one."""
    valid = sorted(valid)
    msg = f"{argument}: unknown {what} {got!r}; expected one of: {', '.join(valid)}"
    if isinstance(got, str):
        close = difflib.get_close_matches(got.lower(), valid, n=1, cutoff=0.5)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    return ValueError(msg)


def lookup(argument: str, what: str, name, table: dict):
    """``table[name.lower()]`` or a ValueError listing the valid names."""
    if not isinstance(name, str):
        article = "an" if what[:1] in "aeiou" else "a"
        raise TypeError(f"{argument}: expected {article} {what} name (str), got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key not in table:
        raise unknown_name_error(argument, what, name, table.keys())
    return table[key]
