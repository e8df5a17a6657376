"""Checks on the package's module graph, run in CI beside the import contract:
no import cycle among mlmeta's modules (function-level imports included) and no
source file over 800 lines.

    PYTHONPATH=src python tools/check_modules.py
"""

import sys
from pathlib import Path

import grimp

MAX_LINES = 800
ROOT = Path(__file__).resolve().parent.parent / "src" / "mlmeta"


def import_cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    mods = sorted(graph.modules)
    edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i != m) for m in mods}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, 10 * len(mods)))
    for m in mods:
        if m not in index:
            visit(m)
    return out


def long_files():
    out = []
    for path in sorted(ROOT.rglob("*")):
        if path.suffix in (".py", ".pyx", ".pxd"):
            n = sum(1 for _ in path.open(encoding="utf-8"))
            if n > MAX_LINES:
                out.append(f"{path.relative_to(ROOT.parent.parent)}: {n} lines")
    return out


def main():
    problems = [f"import cycle: {' -> '.join(c)}" for c in import_cycles(grimp.build_graph("mlmeta"))]
    problems += [f"over {MAX_LINES} lines: {f}" for f in long_files()]
    for p in problems:
        print(p)
    print(f"module checks: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
