"""Class refinement, the one piece of class vocabulary every layer shares.

A model that adds a class refining an old one (`fu_merchant` refines `fu`: a merchant's own 福 that
the old model calls `fu`) carries `refines = {child: parent}`. The gate, the release comparison and
the serving app's canary all compare two models on the classes both know by walking that map; the
serving app imports no `tasks`, so the walk lives here, beside the settings.

The same map decides at the serving threshold: where the top class alone is not sure enough but
it and the classes refining the same root together are, the answer is that root
(`refined_decision`; evaluation and the serving app both use it, so the gate judges what ships).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence


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


def refinement_roots(classes: Sequence[str], refines: Mapping[str, str]) -> list[int]:
    """For each class (by index), the index of the highest class up its refinement chain that is in `classes`.

    `fu_merchant` refines `fu`: both have the root `fu`; a class refining nothing is its own root.
    """
    index = {c: i for i, c in enumerate(classes)}
    roots = []
    for cls in classes:
        seen, root = {cls}, cls
        while refines.get(root) in index and refines[root] not in seen:
            root = refines[root]
            seen.add(root)
        roots.append(index[root])
    return roots


def refined_decision(probs: Sequence[float], threshold: float, roots: Sequence[int]) -> tuple[int, float] | None:
    """The decision for one image's probabilities when its top class alone is under `threshold`.

    A class and the classes refining it form a group (`fu` with `fu_merchant`: a merchant's 福 is
    a 福). When the top class's own probability is short of the threshold but its group's summed
    probability reaches it, the model is sure of the group but not of which member: the answer is
    the group's root, the general class (`fu`), with the group's probability as its score. A model
    with no refinements never gets here (every group has one member).

    Returns:
        (class index, score), or None when not even the group is sure (the caller falls back).
    """
    top = max(range(len(probs)), key=probs.__getitem__)
    if probs[top] >= threshold:
        return top, float(probs[top])
    group = sum(p for i, p in enumerate(probs) if roots[i] == roots[top])
    return (roots[top], float(group)) if group >= threshold else None
