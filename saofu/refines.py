"""Class refinement, the one piece of class vocabulary every layer shares.

A model that adds a class refining an old one (`fu_merchant` refines `fu`: a merchant's own 福 that
the old model calls `fu`) carries `refines = {child: parent}`. The gate, the release comparison and
the serving app's canary all compare two models on the classes both know by walking that map; the
serving app imports no `tasks`, so the walk lives here, beside the settings.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping


def known_ancestor(cls: str, known: Collection[str], refines: Mapping[str, str]) -> str | None:
    """`cls` itself when it is in `known`, else the nearest class up its refinement chain that is.

    Returns:
        That class, or None when the chain ends (or loops) before reaching a known class.
    """
    seen: set[str] = set()
    while cls not in known:
        if cls in seen or cls not in refines:
            return None
        seen.add(cls)
        cls = refines[cls]
    return cls
