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

__all__ = ["nested_in", "tree_order", "crossing_notes", "arrange_terms"]


def nested_in(codes_i: np.ndarray, codes_j: np.ndarray) -> bool:
    """Whether every group of ``codes_i`` lies inside a single group of ``codes_j``: each
    row's j-code equals that of its i-group's first row (O(n), no sorting)."""
    n = codes_i.shape[0]
    first = np.empty(int(codes_i.max()) + 1, dtype=np.intp)
    first[codes_i[::-1]] = np.arange(n - 1, -1, -1)
    return bool(np.array_equal(codes_j[first][codes_i], codes_j))


def tree_order(codes: list, q: list, exclude=()) -> tuple[list[int], int, list[int | None]]:
    """(order, n_tree, parent): the terms reordered as the tree's chain (outermost
    first) followed by the crossed terms in formula order; ``n_tree`` the length of the
    chain; ``parent[k]`` the term (original index) that term ``k`` is nested in inside
    the chain, None for the chain's top and for crossed terms.

    When each term is nested in the one before it (the usual multilevel model), the
    order is unchanged and every term is in the tree. Terms in ``exclude`` (indices:
    levels whose groups are correlated, e.g. by a known correlation matrix) are kept out
    of the tree; a ValueError says so when no term is left for it."""
    L = len(codes)
    G = [int(c.max()) + 1 for c in codes]
    exclude = set(exclude)
    if not exclude and all(nested_in(codes[i], codes[i - 1]) for i in range(1, L)):
        return list(range(L)), L, [None] + list(range(L - 1))
    nest = [[i != j and nested_in(codes[i], codes[j]) and (G[i] > G[j] or j < i)
             for j in range(L)] for i in range(L)]
    if len(exclude) >= L:
        raise ValueError("a term whose groups are correlated (a known correlation matrix R or a "
                         "spatial structure) needs another random term, e.g. (1 | study), for "
                         "the groups to be nested in")
    weight = [0 if i in exclude else G[i] * q[i] for i in range(L)]
    # longest weighted chain, outermost (fewest groups) first
    by_size = sorted(range(L), key=lambda i: (G[i], i))
    best = {i: (weight[i], [i]) for i in range(L) if i not in exclude}
    for i in by_size:
        for j in by_size:
            if i in best and j in best and nest[i][j] and best[j][0] + weight[i] > best[i][0]:
                best[i] = (best[j][0] + weight[i], best[j][1] + [i])
    top = max(best, key=lambda i: (best[i][0], -i))
    chain = best[top][1]
    rest = [i for i in range(L) if i not in chain]
    parent = [None] * L
    for a, b in zip(chain[:-1], chain[1:]):
        parent[b] = a
    return chain + rest, len(chain), parent


def crossing_notes(names: list[str], codes: list, order: list[int], n_tree: int,
                   exclude=()) -> list[str]:
    """A note for each crossed term that looks like the classic trap of ids repeating
    across outer groups (school 1 in every district), which Stata's order-based nesting
    would read as nested: the term is listed right after a term it is crossed with, and
    their combinations hold several rows each (in a designed crossing such as subjects
    x items or plates x samples each combination is usually one row). Terms in
    ``exclude`` (a known correlation across groups) are crossed on purpose."""
    notes = []
    for i in sorted(set(order[n_tree:]) - set(exclude)):
        j = i - 1
        if j < 0 or nested_in(codes[i], codes[j]) or nested_in(codes[j], codes[i]):
            continue
        gj = int(codes[j].max()) + 1
        combos = np.unique(codes[i].astype(np.int64) * gj + codes[j]).size
        if codes[i].shape[0] <= combos:
            continue
        notes.append(f"{names[i]} is crossed with {names[j]}: {names[i]} ids span several "
                     f"{names[j]} groups. If they are local to each {names[j]} (as school 1 in "
                     f"every district), write the term with | {names[j]}:{names[i]} to nest it.")
    return notes


def arrange_terms(terms, codes: list, q: list, crossed=()):
    """For random terms (with ``.group``) and their group codes: (order, n_tree, nesting,
    notes): the terms' new order (:func:`tree_order`; terms grouped by a name in
    ``crossed`` are kept out of the tree), per reordered term the group it is nested in
    (None for the top of the tree, "crossed" for the border) and the crossing notes."""
    names = [t.group for t in terms]
    unknown = set(crossed) - set(names)
    if unknown:
        raise ValueError(f"no random term is grouped by {', '.join(sorted(map(repr, unknown)))}; "
                         f"the terms are grouped by {', '.join(map(repr, names))}")
    exclude = [i for i, g in enumerate(names) if g in crossed]
    order, n_tree, parent = tree_order(codes, q, exclude=exclude)
    nesting = [None if parent[i] is None else names[parent[i]] for i in order]
    nesting = [("crossed" if k >= n_tree else nest) for k, nest in enumerate(nesting)]
    notes = crossing_notes(names, codes, order, n_tree, exclude) if n_tree < len(terms) else []
    return order, n_tree, nesting, notes
