"""Named configurations: one lookup for every model's ``Config.preset``."""

from __future__ import annotations

import difflib
from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(presets: Mapping[str, T], name) -> T:
    """The configuration called ``name``; an unknown name is a ``ValueError``
    that lists the presets (and the closest one, for a typo)."""
    if isinstance(name, str) and name in presets:
        return presets[name]
    close = difflib.get_close_matches(str(name), list(presets), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"Config.preset: unknown preset {name!r}; choose one of "
                     f"{sorted(presets)}{hint}")
