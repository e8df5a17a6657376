"""Which grouping terms are nested in which, and the chain of nested terms fitted as
the engine's tree (the other terms are crossed with it), as lme4 and metafor decide:
by the ids, not by the order of the terms.

Term ``i`` is nested in term ``j`` when every group of ``i`` lies inside one group of
``j`` (the map from i's codes to j's codes is a function) and ``i`` has more groups.
The tree is the chain ``t_1 > t_2 > ...`` (each nested in the one before) holding the
most random effects (sum of groups x effects per group), so the dense border of
crossed effects is as small as possible; ties keep the formula's order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["nested_in", "tree_order", "crossing_notes"]


def nested_in(codes_i: np.ndarray, codes_j: np.ndarray) -> bool:
    """Whether every group of ``codes_i`` lies inside a single group of ``codes_j``."""
    gi = int(codes_i.max()) + 1
    gj = int(codes_j.max()) + 1
    if gi < gj:
        return False
    pairs = np.unique(codes_i.astype(np.int64) * gj + codes_j)
    return pairs.size == gi


def tree_order(codes: list, q: list) -> tuple[list[int], int, list[int | None]]:
    """(order, n_tree, parent): the terms reordered as the tree's chain (outermost
    first) followed by the crossed terms in formula order; ``n_tree`` the length of the
    chain; ``parent[k]`` the term (original index) that term ``k`` is nested in inside
    the chain, None for the chain's top and for crossed terms.

    When each term is nested in the one before it (the usual multilevel model), the
    order is unchanged and every term is in the tree."""
    L = len(codes)
    G = [int(c.max()) + 1 for c in codes]
    nest = [[i != j and nested_in(codes[i], codes[j]) and (G[i] > G[j] or j < i)
             for j in range(L)] for i in range(L)]
    if all(nest[i][i - 1] for i in range(1, L)):
        return list(range(L)), L, [None] + list(range(L - 1))
    weight = [G[i] * q[i] for i in range(L)]
    # longest weighted chain, outermost (fewest groups) first
    by_size = sorted(range(L), key=lambda i: (G[i], i))
    best = {i: (weight[i], [i]) for i in range(L)}
    for i in by_size:
        for j in by_size:
            if nest[i][j] and best[j][0] + weight[i] > best[i][0]:
                best[i] = (best[j][0] + weight[i], best[j][1] + [i])
    top = max(range(L), key=lambda i: (best[i][0], -i))
    chain = best[top][1]
    rest = [i for i in range(L) if i not in chain]
    parent = [None] * L
    for a, b in zip(chain[:-1], chain[1:]):
        parent[b] = a
    return chain + rest, len(chain), parent


def crossing_notes(names: list[str], codes: list, order: list[int], n_tree: int) -> list[str]:
    """A note for each crossed term listed after a term it is not nested in: the classic
    trap of ids that repeat across outer groups (school 1 in every district), which
    Stata's order-based nesting would read as nested."""
    crossed = set(order[n_tree:])
    notes = []
    for i in sorted(crossed):
        outer = [j for j in range(i) if not nested_in(codes[i], codes[j])
                 and not nested_in(codes[j], codes[i])]
        if not outer:
            continue
        j = outer[-1]
        notes.append(f"{names[i]} is crossed with {names[j]}: {names[i]} ids span several "
                     f"{names[j]} groups. If they are local to each {names[j]} (as school 1 in "
                     f"every district), write the term with | {names[j]}:{names[i]} to nest it.")
    return notes
