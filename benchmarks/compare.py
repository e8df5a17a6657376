"""mlmeta against metafor's ``rma.mv`` (and statsmodels' MixedLM), measured in one run.

Prints one side-by-side table: for each data set and tool, the median wall time
of one fit over several runs, its ratio to mlmeta's time on the same data, the
log (restricted) likelihood and the variance components, so that the timings are
seen to be for the same estimates.

* mlmeta: ``mlmeta.meregress`` end to end (formula to results), timed in Python;
  a second row with ``safeguard=False`` (no extra starts against local optima,
  which metafor does not try either).
* metafor: ``rma.mv(yi, vi, mods, random = ~ 1 | a/b, method = "REML")`` with
  the default dense algebra and with ``sparse = TRUE``, run through ``Rscript``
  and timed inside R with ``system.time`` (R start-up and package loading are
  not counted). The data go to R through a temporary CSV file.
* statsmodels: ``MixedLM`` with nested variance components, if installed. It
  cannot take known sampling variances, so it fits a *different* model (one
  residual variance estimated); its row is a rough cost reference only.
* mixed models (``mlmeta.mixed``, REML) on the essay's design (50 x 50, three
  correlated random slopes) and on lme4's sleepstudy: lme4's ``lmer`` (timed in R),
  statsmodels' ``MixedLM`` and the Python packages that fit lme4 formulas, where
  installed: ``mixedlm`` (Rust) and ``lme_python`` (Rust, polars input). Their rows
  show the intercept and residual variances; a lower llf than lme4's is a worse optimum.
  mlmeta and the Python peers are timed twice: one call after a full garbage collection
  (as every row) and "back to back" (loops of calls with the collector paused, as
  ``timeit`` does), where the fixed cost of a call weighs more.

Data: schoolcal (56 effects, ``stdmdiff ~ 1``, schools in districts), the
synthetic three-level data of ``synthetic.py`` (``y ~ x``) with n = 1000, the same
shape with one effect per lowest group and 5 per study ("5 per study", n = 1000), the
same with sampling errors correlated 0.6 within a study ("5 per study, V": ``V=`` blocks,
metafor's ``vcalc``; metafor sparse only), berkey
with its known 2 x 2 sampling covariance blocks (``V=``, unstructured trial level) and,
unless ``--quick``, n = 10000 (metafor sparse only; a dense 10^4 x 10^4 fit is
not attempted; the metafor runs stop being repeated once one takes > 60 s).

    python benchmarks/compare.py --quick
    python benchmarks/compare.py --repeat 7
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import load_schoolcal, make_three_level  # noqa: E402
from timing import fmt_time, median_time  # noqa: E402

import mlmeta  # noqa: E402

#: the opening of the metafor scripts that read a data set from the CSV file args[1]
METAFOR_CSV = r"""
suppressPackageStartupMessages(library(metafor))
args <- commandArgs(trailingOnly = TRUE)
dat <- read.csv(args[1])"""

R_SCRIPT = METAFOR_CSV + r"""
mods <- as.formula(args[2])
random <- as.formula(args[3])
reps <- as.integer(args[4])
variants <- strsplit(args[5], ",")[[1]]
budget <- as.numeric(args[6])
fit <- function(sparse) rma.mv(yi, vi, mods = mods, random = random, data = dat,
                               method = "REML", sparse = sparse)
for (v in variants) {
  sparse <- v == "sparse"
  times <- c()
  res <- NULL
  for (i in seq_len(reps)) {
    invisible(gc())
    tt <- system.time(res <- tryCatch(fit(sparse), error = function(e) e))["elapsed"]
    if (inherits(res, "error")) break
    times <- c(times, tt)
    if (sum(times) > budget) break
  }
  if (inherits(res, "error")) {
    cat(sprintf('{"variant": "%s", "error": %s}\n', v,
                deparse(gsub('"', "'", conditionMessage(res)))))
  } else {
    cat(sprintf(paste0('{"variant": "%s", "seconds": %.9g, "reps": %d, "llf": %.10g, ',
                       '"sigma2": [%s], "beta": [%s]}\n'),
                v, median(times), length(times), as.numeric(logLik(res)),
                paste(sprintf("%.10g", res$sigma2), collapse = ", "),
                paste(sprintf("%.10g", as.numeric(res$b)), collapse = ", ")))
  }
}
"""


# --------------------------------------------------------------------------- #
# the data sets

def cases(quick: bool, seed: int):
    sc = load_schoolcal()
    yield {"name": "schoolcal", "data": sc, "y": "stdmdiff", "v": "var", "mods": "~ 1",
           "a": "district", "b": "school", "r_variants": ["dense", "sparse"]}
    d = make_three_level(1000, seed=seed)
    yield {"name": "synthetic", "data": d, "y": "y", "v": "v", "mods": "~ x",
           "a": "a", "b": "b", "r_variants": ["dense", "sparse"]}
    d = make_three_level(1000, seed=seed, per_b=1, per_a=5)
    yield {"name": "5 per study", "data": d, "y": "y", "v": "v", "mods": "~ x",
           "a": "a", "b": "b", "r_variants": ["dense", "sparse"]}
    if not quick:
        d = make_three_level(10000, seed=seed)
        yield {"name": "synthetic", "data": d, "y": "y", "v": "v", "mods": "~ x",
               "a": "a", "b": "b", "r_variants": ["sparse"]}


# --------------------------------------------------------------------------- #
# the tools

def run_mlmeta(case, repeat, safeguard):
    rhs = case["mods"].replace("~", "").strip()
    f = f"{case['y']} ~ {rhs} + (1 | {case['a']}) + (1 | {case['a']}:{case['b']})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmeta.meregress(f, case["data"], variance=case["v"], safeguard=safeguard)  # warm-up
        t, res = median_time(
            lambda: mlmeta.meregress(f, case["data"], variance=case["v"], safeguard=safeguard),
            repeat)
    s2 = [float(S.values[0, 0]) for S in res.re_cov.values()]
    return {"seconds": t, "reps": repeat, "llf": res.llf, "sigma2": s2,
            "beta": [float(b) for b in res.params.values[::-1]]}


def run_metafor(case, repeat, budget, workdir):
    d = case["data"]
    csv = Path(workdir) / f"{case['name']}_{len(d)}.csv"
    out = d.rename(columns={case["y"]: "yi", case["v"]: "vi"})
    out.to_csv(csv, index=False)
    script = Path(workdir) / "fit.R"
    script.write_text(R_SCRIPT)
    random = f"~ 1 | {case['a']}/{case['b']}"
    cmd = ["Rscript", "--vanilla", str(script), str(csv), case["mods"], random, str(repeat),
           ",".join(case["r_variants"]), str(budget)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {v: {"error": "timed out after 30 min"} for v in case["r_variants"]}
    rows = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            rows[r.pop("variant")] = r
    if not rows:
        msg = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {v: {"error": msg} for v in case["r_variants"]}
    return rows


def metafor_available():
    if shutil.which("Rscript") is None:
        return False, "Rscript not found"
    p = subprocess.run(["Rscript", "--vanilla", "-e",
                        "suppressPackageStartupMessages(library(metafor));"
                        "cat(as.character(packageVersion('metafor')))"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return False, "R package metafor not installed"
    return True, p.stdout.strip()


def run_statsmodels(case, repeat):
    import statsmodels.formula.api as smf

    d = case["data"].copy()
    rhs = case["mods"].replace("~", "").strip()
    a, b = case["a"], case["b"]
    d["_inner"] = d[a].astype(str) + ":" + d[b].astype(str)
    model = smf.mixedlm(f"{case['y']} ~ {rhs}", d, groups=d[a], re_formula="1",
                        vc_formula={"inner": "0 + C(_inner)"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, res = median_time(lambda: model.fit(reml=True), repeat)
    s2 = [float(np.asarray(res.cov_re)[0, 0]), float(res.vcomp[0])]
    return {"seconds": t, "reps": repeat, "llf": float(res.llf), "sigma2": s2,
            "beta": [float(x) for x in np.asarray(res.fe_params)[::-1]]}


LME4_SCRIPT = r"""
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1]); reps <- as.integer(args[2]); f <- as.formula(args[3])
m <- lmer(f, data = d)
t <- numeric(reps)
for (i in seq_len(reps)) t[i] <- system.time(m <- lmer(f, data = d))[["elapsed"]]
vc <- as.data.frame(VarCorr(m))
cat(sprintf('{"seconds": %.6f, "reps": %d, "llf": %.10f, "sigma2": [%.8f, %.8f]}\n',
            median(t), reps, as.numeric(logLik(m)), vc$vcov[1], vc$vcov[nrow(vc)]))
"""

#: lme4's sleepstudy, as the references store it
SLEEPSTUDY = Path(__file__).resolve().parent.parent / "tests" / "reference" / "data" / "sleepstudy.csv"


def essay_data(seed):
    """The essay's design: 50 groups x 50 observations, three predictors with
    correlated random slopes (mlmeta.simulate.lmm)."""
    from mlmeta.simulate import lmm

    data, _, _ = lmm(50, 3, 50, seed=seed)
    return data


def mixed_designs(seed):
    """The essay's design and lme4's sleepstudy (``Reaction ~ Days + (Days | Subject)``)."""
    import pandas as pd

    yield "essay lmm", essay_data(seed), "DV ~ IV1 + IV2 + IV3 + (IV1 + IV2 + IV3 | Group)", "Group"
    if SLEEPSTUDY.exists():
        yield ("sleepstudy", pd.read_csv(SLEEPSTUDY), "Reaction ~ Days + (Days | Subject)",
               "Subject")


def _python_peers():
    """The installed Python packages that fit lme4's model from its formula: (label,
    fit(formula, data) -> (llf, [first variance, residual variance]))."""
    peers = []
    try:
        import mixedlm

        def fit_mixedlm(f, d):
            r = mixedlm.lmer(f, d)
            group = next(iter(r.VarCorr().groups.values()))
            return (float(r.logLik().value),
                    [float(group.variance["(Intercept)"]), float(r.sigma) ** 2])

        peers.append((f"mixedlm {getattr(mixedlm, '__version__', '')} lmer", fit_mixedlm))
    except ImportError:
        pass
    try:
        import lme_python
        import polars as pl

        def fit_lme_python(f, d):
            r = lme_python.lmer(f, pl.DataFrame({c: d[c].to_numpy() for c in d.columns}))
            s00 = next(v for g, a, b, v, _ in r.var_corr if a == b == "(Intercept)")
            return float(r.log_likelihood), [float(s00), float(r.sigma2)]

        peers.append(("lme_python lmer", fit_lme_python))
    except ImportError:
        pass
    return peers


def run_mixed_tools(repeat, seed, has_r, workdir):
    """mlmeta.mixed vs lme4::lmer, statsmodels MixedLM and the installed Python peers
    (``mixedlm``, ``lme_python``) on the essay's model and on sleepstudy."""
    rows = []
    for name, d, f, group in mixed_designs(seed):
        rows.extend(_mixed_rows(name, d, f, group, repeat, has_r, workdir))
    return rows


def _mixed_rows(name, d, f, group, repeat, has_r, workdir):
    """mlmeta and the Python peers timed one call after a full collection, then back to
    back (loops of calls lasting 0.3 s, the collector paused; rows after the others); lme4
    and statsmodels."""
    rows, loops = [], []
    tag = {"data": name, "n": len(d)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, sg in (("mlmeta", "auto"), ("mlmeta (safeguard=False)", False)):
            def fit_mlmeta(sg=sg):
                res = mlmeta.mixed(f, d, safeguard=sg)
                return res.llf_lme4, [float(res.re_cov[group].loc["_cons", "_cons"]), res.scale]

            fit_mlmeta()
            t, (llf, s2) = median_time(fit_mlmeta, repeat)
            rows.append({**tag, "tool": label, "seconds": t, "reps": repeat, "llf": llf,
                         "sigma2": s2})
            loops.append((label, fit_mlmeta))
        for label, fit in _python_peers():
            try:
                fit(f, d)
                t, (llf, s2) = median_time(lambda fit=fit: fit(f, d), repeat)
                rows.append({**tag, "tool": label, "seconds": t, "reps": repeat, "llf": llf,
                             "sigma2": s2})
                loops.append((label, lambda fit=fit: fit(f, d)))
            except Exception as exc:     # noqa: BLE001 - report and go on
                rows.append({**tag, "tool": label, "error": f"{type(exc).__name__}: {exc}"[:200]})
        back = []
        for label, fn in loops:
            t, (llf, s2) = median_time(fn, repeat, batch=0.3, pause_gc=True)
            back.append({**tag, "tool": f"{label}, back to back", "seconds": t, "reps": repeat,
                         "llf": llf, "sigma2": s2})
    if has_r:
        csv = Path(workdir) / f"{name.split()[0]}.csv"
        d.to_csv(csv, index=False)
        script = Path(workdir) / "lme4.R"
        script.write_text(LME4_SCRIPT)
        p = subprocess.run(["Rscript", "--vanilla", str(script), str(csv), str(repeat), f],
                           capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("{")]
        rows.append({**tag, "tool": "lme4 lmer", **(json.loads(line[0]) if line else
                                                   {"error": (p.stderr.strip() or "no output")[-200:]})})
    try:
        import statsmodels.formula.api as smf

        fixed, random = f.split("(", 1)
        slopes = random.split("|")[0].strip()
        model = smf.mixedlm(fixed.strip().rstrip("+").strip(), d, groups=d[group],
                            re_formula="~ " + slopes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, res = median_time(lambda: model.fit(reml=True), max(1, min(repeat, 3)))
        rows.append({**tag, "tool": "statsmodels MixedLM", "seconds": t,
                     "reps": max(1, min(repeat, 3)), "llf": float(res.llf),
                     "sigma2": [float(np.asarray(res.cov_re)[0, 0]), float(res.scale)]})
    except ImportError:
        pass
    return rows + back


def _r_timed(variances):
    """R lines timing ``fit()`` ``reps`` times (a garbage collection before each) and
    printing one JSON line: the median seconds, the log-likelihood and ``res$<variances>``."""
    return f"""times <- c()
for (i in seq_len(reps)) {{
  invisible(gc())
  times <- c(times, system.time(res <- fit())["elapsed"])
}}
cat(sprintf('{{"seconds": %.9g, "reps": %d, "llf": %.10g, "sigma2": [%s]}}\\n', median(times),
            length(times), as.numeric(logLik(res)), paste(sprintf("%.10g", res${variances}),
            collapse = ", ")))
"""


BERKEY_R = r"""
suppressPackageStartupMessages(library(metafor))
reps <- as.integer(commandArgs(trailingOnly = TRUE)[1])
dat <- dat.berkey1998
V <- bldiag(lapply(split(dat[, c("v1i", "v2i")], dat$trial), as.matrix))
fit <- function() rma.mv(yi, V, mods = ~ outcome - 1, random = ~ outcome | trial,
                         struct = "UN", data = dat, method = "REML")
""" + _r_timed("tau2")


def _mlmeta_v_rows(tag, f, data, blocks, repeat, sigma2):
    """The rows of mlmeta's fits with ``V=blocks`` (default and ``safeguard=False``);
    ``sigma2(res)``: the variances to show."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, sg in (("mlmeta", "auto"), ("mlmeta (safeguard=False)", False)):
            mlmeta.meregress(f, data, V=blocks, safeguard=sg)
            t, res = median_time(lambda sg=sg: mlmeta.meregress(f, data, V=blocks, safeguard=sg),
                                 repeat)
            rows.append({**tag, "tool": label, "seconds": t, "reps": repeat, "llf": res.llf,
                         "sigma2": sigma2(res)})
    return rows


def _r_json(script_text, name, args, workdir):
    """Run an R script (written to ``workdir``/name) with ``args``; its JSON line as a dict,
    or {"error": the last line of its messages}."""
    script = Path(workdir) / name
    script.write_text(script_text)
    p = subprocess.run(["Rscript", "--vanilla", str(script), *map(str, args)],
                       capture_output=True, text=True, timeout=1800)
    line = [x for x in p.stdout.splitlines() if x.startswith("{")]
    return json.loads(line[0]) if line else {"error": (p.stderr.strip().splitlines()
                                                       or ["no output"])[-1]}


def run_berkey(repeat, has_r, workdir):
    """berkey (two correlated outcomes per trial, the known 2 x 2 sampling covariance
    blocks as V, an unstructured trial-level covariance): mlmeta vs metafor."""
    from mlmeta import datasets

    dat = datasets.load("berkey")
    blocks = [g[["v1i", "v2i"]].to_numpy() for _, g in dat.groupby("trial", sort=False)]
    f = "yi ~ 0 + outcome + (0 + outcome | trial)"
    tag = {"data": "berkey V", "n": len(dat)}
    rows = _mlmeta_v_rows(tag, f, dat, blocks, repeat,
                          lambda res: [float(v) for v in np.diag(res.re_cov["trial"].values)])
    if has_r:
        r = _r_json(BERKEY_R, "berkey.R", [max(repeat, 5)], workdir)
        rows.append({**tag, "tool": "metafor rma.mv (dense)", **r})
    return rows


V_MULTILEVEL_R = METAFOR_CSV + r"""
reps <- as.integer(args[2])
rho <- as.numeric(args[3])
V <- vcalc(v, cluster = a, obs = b, rho = rho, data = dat, sparse = TRUE)
fit <- function() rma.mv(y, V, mods = ~ x, random = ~ 1 | a/b, data = dat, method = "REML",
                         sparse = TRUE)
""" + _r_timed("sigma2")

#: the sampling errors' correlation within a study in the "5 per study, V" data
V_RHO = 0.6


def run_v_multilevel(repeat, seed, has_r, workdir, n=1000):
    """Effects within studies (5 per study) whose sampling errors correlate (rho = V_RHO
    within a study: ``V``, metafor's ``vcalc``), a random intercept per study and per
    effect: mlmeta vs metafor ``sparse=TRUE``."""
    d = make_three_level(n, seed=seed, per_b=1, per_a=5)
    blocks = []
    for _, g in d.groupby("a", sort=True):
        sd = np.sqrt(g["v"].to_numpy())
        B = V_RHO * np.outer(sd, sd)
        np.fill_diagonal(B, sd ** 2)
        blocks.append(B)
    f = "y ~ x + (1 | a) + (1 | a:b)"
    tag = {"data": "5 per study, V", "n": len(d)}
    rows = _mlmeta_v_rows(tag, f, d, blocks, repeat,
                          lambda res: [float(S.values[0, 0]) for S in res.re_cov.values()])
    if has_r:
        csv = Path(workdir) / "v_multilevel.csv"
        d.to_csv(csv, index=False)
        r = _r_json(V_MULTILEVEL_R, "v_multilevel.R", [csv, repeat, V_RHO], workdir)
        rows.append({**tag, "tool": "metafor rma.mv sparse=TRUE", **r})
    return rows


def run_batch(repeat):
    """fit_batch on schoolcal: per-fit time for 1000 simulated outcome vectors, each call
    timed after a full garbage collection (as the other rows) and back to back (the
    collector paused and not run between calls, as ``timeit`` does: a loop of batches)."""
    M = mlmeta.Model("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
                     load_schoolcal(), variance="var")
    Y = M.simulate(1000, seed=1)
    rows = []
    mlmeta.fit_batch(M, Y, n_jobs=2)      # warm-up (thread pool, caches)
    times = {(t, how): [] for how in ("", ", back to back") for t in (1, 2)}
    for _ in range(max(3, repeat)):       # 1 and 2 threads alternate, so drift hits both
        for threads in (1, 2):
            gc.collect()
            t0 = time.perf_counter()
            br = mlmeta.fit_batch(M, Y, n_jobs=threads)
            times[threads, ""].append(time.perf_counter() - t0)
            gc.disable()
            try:
                for _ in range(3):
                    t0 = time.perf_counter()
                    mlmeta.fit_batch(M, Y, n_jobs=threads)
                    times[threads, ", back to back"].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    for (threads, how), ts in times.items():
        rows.append({"data": "schoolcal x1000", "n": 56,
                     "tool": f"fit_batch, {threads} thread(s){how}, per fit",
                     "seconds": statistics.median(ts) / 1000, "reps": len(ts),
                     "llf": float(br.llf[0]),
                     "sigma2": [float(br.re_cov["district"][0, 0, 0]),
                                float(br.re_cov["district:school"][0, 0, 0])]})
    return rows


# --------------------------------------------------------------------------- #

def print_table(rows):
    head = (f"{'data':<16}{'n':>7}  {'tool':<48}{'time':>10}{'reps':>6}{'ratio':>10}  "
            f"{'llf':>13}  {'sigma2 (outer, inner)'}")
    print(head)
    print("-" * len(head))
    def group(r):      # the rows a ratio compares: a data set, and fit_batch's timing
        return r["data"], r["n"], "back to back" in r["tool"]

    base = {}
    for r in rows:
        if r["tool"].startswith(("mlmeta", "fit_batch, 1 thread(s)")) and "seconds" in r:
            base.setdefault(group(r), r["seconds"])
    last = None
    for r in rows:
        key = group(r)
        if last is not None and key[:2] != last[:2]:
            print()
        last = key
        if "error" in r:
            print(f"{r['data']:<16}{r['n']:>7}  {r['tool']:<48}  {r['error']}")
            continue
        ratio = r["seconds"] / base[key] if key in base else float("nan")
        s2 = ", ".join(f"{s:.6f}" for s in r["sigma2"])
        rs = f"{ratio:.2f}x" if ratio < 100 else f"{ratio:.0f}x"
        print(f"{r['data']:<16}{r['n']:>7}  {r['tool']:<48}{fmt_time(r['seconds']):>10}"
              f"{r['reps']:>6}{rs:>10}  {r['llf']:>13.6f}  {s2}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the n = 10000 data set")
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs per tool for the median (default 5)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--r-budget", type=float, default=60.0,
                    help="stop repeating a metafor fit once its runs took this many seconds")
    args = ap.parse_args(argv)

    has_r, r_info = metafor_available()
    try:
        import statsmodels
        sm_info = statsmodels.__version__
    except ImportError:
        statsmodels = None
        sm_info = "not installed"
    print(f"mlmeta {mlmeta.__version__} | metafor {r_info if has_r else '(' + r_info + ')'} | "
          f"statsmodels {sm_info}")
    print("time = median wall time of one fit (REML); "
          "ratio = time / mlmeta's time on the same data\n")

    rows = []
    with tempfile.TemporaryDirectory(prefix="mlmeta-compare-") as tmp:
        for case in cases(args.quick, args.seed):
            n = len(case["data"])
            tag = {"data": case["name"], "n": n}
            print(f"  {case['name']} n={n}: mlmeta", file=sys.stderr, flush=True)
            rows.append({**tag, "tool": "mlmeta", **run_mlmeta(case, args.repeat, "auto")})
            rows.append({**tag, "tool": "mlmeta (safeguard=False)",
                         **run_mlmeta(case, args.repeat, False)})
            if has_r:
                print(f"  {case['name']} n={n}: metafor", file=sys.stderr, flush=True)
                res = run_metafor(case, args.repeat, args.r_budget, tmp)
                for v in case["r_variants"]:
                    label = "metafor rma.mv" + (" sparse=TRUE" if v == "sparse" else " (dense)")
                    rows.append({**tag, "tool": label, **res.get(v, {"error": "no result"})})
            if statsmodels is not None and n <= 10000:
                print(f"  {case['name']} n={n}: statsmodels", file=sys.stderr, flush=True)
                try:
                    r = run_statsmodels(case, max(1, min(args.repeat, 3)))
                    rows.append({**tag, "tool": "statsmodels MixedLM (*)", **r})
                except Exception as exc:     # noqa: BLE001 - report and go on
                    rows.append({**tag, "tool": "statsmodels MixedLM (*)",
                                 "error": f"{type(exc).__name__}: {exc}"})
        print("  berkey V: mlmeta / metafor", file=sys.stderr, flush=True)
        rows.extend(run_berkey(args.repeat, has_r, tmp))
        print("  5 per study, V: mlmeta / metafor", file=sys.stderr, flush=True)
        rows.extend(run_v_multilevel(args.repeat, args.seed, has_r, tmp))
        print("  essay lmm, sleepstudy: mlmeta.mixed / lme4 / statsmodels / Python peers",
              file=sys.stderr, flush=True)
        rows.extend(run_mixed_tools(args.repeat, args.seed, has_r, tmp))
    print("  fit_batch", file=sys.stderr, flush=True)
    rows.extend(run_batch(args.repeat))
    print()
    print_table(rows)
    if statsmodels is not None:
        print("\n(*) MixedLM estimates one residual variance instead of using the known "
              "sampling variances: a different model, timing reference only.")
    tools = (("metafor", has_r), ("statsmodels", statsmodels is not None))
    skipped = [t for t, ok in tools if not ok]
    if skipped:
        print(f"\nskipped (not installed): {', '.join(skipped)}")
    if not args.quick:
        print("\nmetafor dense is not run at n = 10000 (a dense 10^4 x 10^4 marginal covariance).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
