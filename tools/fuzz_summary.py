"""Summary of a random-design harness run (tools/fuzz.py --out RUN.jsonl): counts per
status and flag, cost (fit seconds, evaluations per fit), the commonest refusals, the
largest gaps to the dense likelihood and the cases of each failure class.

    python tools/fuzz_summary.py RUN.jsonl [RUN2.jsonl ...]
"""

from __future__ import annotations

import collections
import json
import re
import sys

import numpy as np

from fuzz import FAILURES


def _pct(v, q):
    return float(np.percentile(v, q)) if len(v) else float("nan")


def summarise(rows) -> str:
    """The summary of the harness's JSON lines ``rows`` as text."""
    out = []
    ids = [r["case"] for r in rows]
    out.append(f"cases {len(rows)} (unique {len(set(ids))})")
    status = collections.Counter(r["status"] for r in rows)
    flags = collections.Counter(f for r in rows for f in r["flags"])
    out.append(f"ok {status['ok']}, refused {status['refused']}, "
               + ", ".join(f"{k} {flags[k]}" for k in FAILURES))
    out.append(f"by api {dict(collections.Counter(r.get('api') for r in rows))}")
    sec = np.array([r["seconds"] for r in rows if "seconds" in r])
    out.append(f"fit seconds: median {_pct(sec, 50):.3f} p99 {_pct(sec, 99):.2f} max "
               f"{sec.max() if sec.size else float('nan'):.2f}")
    ev = np.array([r["n_evals"] for r in rows if "n_evals" in r])
    if ev.size:
        out.append(f"evaluations per fit: median {_pct(ev, 50):.0f} p99 {_pct(ev, 99):.0f} "
                   f"max {ev.max()}")
    refusals = collections.Counter(re.sub(r"[-+]?[0-9][0-9.e+-]*", "#", r.get("refused", ""))[:75]
                                   for r in rows if r["status"] == "refused")
    out.append("refusals:")
    out += [f"  {v:5d}  {k}" for k, v in refusals.most_common(12)]
    single = [r["oracle"] for r in rows if isinstance(r.get("oracle"), dict)]
    batch = [o for r in rows if isinstance(r.get("oracle"), list) for o in r["oracle"]]
    out.append(f"single fits checked against the oracle: {len(single)}, converged: "
               f"{sum(o['converged'] for o in single)}; batch columns checked: {len(batch)}")
    gaps = [max(o.get("dense_best", o["dense_local"]), o["dense_local"]) - o["llf"]
            for o in single + batch if "dense_local" in o]
    diff_at = [abs(o["dense_at"] - o["llf"]) for o in single + batch
               if o.get("dense_at") is not None and np.isfinite(o["dense_at"])]
    if gaps and diff_at:
        out.append(f"max |llf - dense at estimates| {max(diff_at):.2e}; "
                   f"max (dense optimum - llf) {max(gaps):.2e}")
    for k in FAILURES:
        ex = [r for r in rows if k in r["flags"]]
        if ex:
            out.append(k)
            out += [f"    {r['case']} {r.get('api')} {r.get('detail', '')[:200]}" for r in ex[:20]]
    warn = collections.Counter(w.split(":")[0] for r in rows for w in r.get("warnings", []))
    out.append(f"warnings by category {dict(warn)}")
    return "\n".join(out)


def main(paths) -> int:
    rows = [json.loads(ln) for p in paths for ln in open(p) if ln.startswith("{")]
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
