"""Public entry points: :func:`meregress` and :func:`multilevel`.

The pipeline is staged (as lme4's ``lmer``): parse the formula -> build the model
frame (missing rows dropped and reported) -> sort rows and precompute the nested
design -> build the objective -> optimise -> results.
"""

from __future__ import annotations

import re

import numpy as np
from scipy import sparse

from mlmeta._errors import BoundaryWarning, ConvergenceWarning, warn
from mlmeta.constraints import parse_constraints
from mlmeta.covstruct import make_structure
from mlmeta.design import build_design
from mlmeta.formula import build_model_frame, parse_formula
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_model
from mlmeta.results import MeregressResults

__all__ = ["meregress", "multilevel", "build_model", "sensitivity"]


def _sampling_covariance(frame, data, V):
    """V (dense, sparse, or per-cluster blocks over the data rows) -> CSR over the used rows."""
    n_data = frame.sample.shape[0]
    rows = np.flatnonzero(frame.sample)
    if isinstance(V, (list, tuple)):
        import pandas as pd

        term = frame.terms[0]
        df = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        key = df[list(term.group_vars)].apply(tuple, axis=1) if len(term.group_vars) > 1 \
            else df[term.group_vars[0]]
        codes, labels = pd.factorize(key, sort=True)
        if len(V) != len(labels):
            raise ValueError(f"V has {len(V)} blocks but {term.group!r} has {len(labels)} groups "
                             f"in the data; give one block per group, in sorted label order")
        blocks_rows = [np.flatnonzero(codes == g) for g in range(len(labels))]
        ri, ci, vals = [], [], []
        for g, (B, r) in enumerate(zip(V, blocks_rows)):
            B = np.atleast_2d(np.asarray(B, dtype=float))
            if B.shape != (r.size, r.size):
                raise ValueError(f"V block {g} (group {labels[g]!r}) is {B.shape[0]} x {B.shape[1]} "
                                 f"but the group has {r.size} rows")
            ri.append(np.repeat(r, r.size))
            ci.append(np.tile(r, r.size))
            vals.append(B.ravel())
        M = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(ri), np.concatenate(ci))),
                              shape=(n_data, n_data))
    elif sparse.issparse(V):
        M = sparse.csr_matrix(V, dtype=float)
    else:
        M = np.asarray(V, dtype=float)
        if M.ndim != 2:
            raise ValueError("V must be a square matrix, a scipy.sparse matrix or a list of blocks")
        M = sparse.csr_matrix(M)
    if M.shape != (n_data, n_data):
        raise ValueError(f"V is {M.shape[0]} x {M.shape[1]} but the data have {n_data} rows")
    M = M[rows][:, rows].tocsr()
    if not np.all(np.isfinite(M.data)):
        raise ValueError("V has missing or infinite values in rows used by the model")
    asym = abs(M - M.T)
    scale = max(float(abs(M).max()), 1e-300)
    if asym.nnz and asym.max() > 1e-10 * scale:
        raise ValueError("V is not symmetric")
    d = M.diagonal()
    bad = ~(d > 0)
    if bad.any():
        raise ValueError(f"V must have positive sampling variances on its diagonal: "
                         f"{int(bad.sum())} are <= 0 (first at used row {int(np.flatnonzero(bad)[0])})")
    return M


def _sampling_variance(frame, se, variance):
    if (se is None) == (variance is None):
        raise ValueError("give exactly one of se= (sampling standard errors), variance= "
                         "(sampling variances) or V= (sampling covariance matrix)")
    if variance is not None:
        v = np.asarray(frame.extra["variance"], dtype=float)
        what = "variance"
    else:
        s = np.asarray(frame.extra["se"], dtype=float)
        what = "se"
        v = s * s
        bad = ~(s > 0)
        if bad.any():
            raise ValueError(f"sampling standard errors must be positive: {int(bad.sum())} "
                             f"value(s) are <= 0 (first at used row {int(np.flatnonzero(bad)[0])})")
    bad = ~(v > 0)
    if bad.any():
        raise ValueError(f"sampling variances must be positive: {int(bad.sum())} value(s) of "
                         f"{what!r} are <= 0 (first at used row {int(np.flatnonzero(bad)[0])})")
    return v


def _structures(frame, covariance):
    names = [t.group for t in frame.terms]
    if isinstance(covariance, str):
        if len(names) != 1:
            raise ValueError(f"covariance={covariance!r} does not say which grouping term it is "
                             f"for; give a dict such as {{{names[0]!r}: {covariance!r}}} "
                             f"(grouping terms: {names})")
        covariance = {names[0]: covariance}
    try:
        covariance = dict(covariance or {})
    except (TypeError, ValueError):
        raise ValueError(f"covariance= must map grouping terms to structures, e.g. "
                         f"{{{names[0]!r}: 'unstructured'}}; got {covariance!r}") from None
    for key in covariance:
        if key not in names:
            raise ValueError(f"covariance= names grouping term {key!r}, which is not in the "
                             f"formula; grouping terms are {names}")
    return [make_structure(covariance.get(t.group), frame.re_names[i], t.correlated)
            for i, t in enumerate(frame.terms)]


def constrained_design(frame, constraints):
    """(y*, X*, constraints) with ``y* = y - X beta_0``, ``X* = X N`` (see
    :mod:`mlmeta.constraints`); the frame's y and X when there are no constraints."""
    if constraints is None or (isinstance(constraints, (list, tuple)) and len(constraints) == 0):
        return frame.y, frame.X, None
    fc = parse_constraints(constraints, frame.fe_names)
    return frame.y - frame.X @ fc.beta0, np.asfortranarray(frame.X @ fc.N), fc


def build_model(formula, data, *, se=None, variance=None, V=None, method="reml",
                covariance=None, constraints=None, collinear=False):
    """Parse, build the frame and the nested model; return (model, frame, parsed).

    With ``constraints`` the model is fitted on the constrained design
    (see :mod:`mlmeta.constraints`); ``model.fe_constraints`` maps back."""
    parsed = parse_formula(formula)
    if not parsed.random:
        raise ValueError("the formula has no random-effects term such as (1 | study); "
                         "meregress needs at least one level")
    extra = {"se": se, "variance": variance}
    frame = build_model_frame(parsed, data, extra={k: v for k, v in extra.items() if v is not None},
                              collinear_random=bool(collinear))
    if V is not None:
        if se is not None or variance is not None:
            raise ValueError("give exactly one of se= (sampling standard errors), variance= "
                             "(sampling variances) or V= (sampling covariance matrix)")
        Vm, v = _sampling_covariance(frame, data, V), None
    else:
        Vm, v = None, _sampling_variance(frame, se, variance)
    structs = _structures(frame, covariance)
    y, X, fc = constrained_design(frame, constraints)
    if frame.y.shape[0] <= X.shape[1]:
        raise ValueError(f"{frame.y.shape[0]} observations for {X.shape[1]} fixed effects: at "
                         f"least one more observation than fixed effects is needed")
    design = build_design(y, X, frame.Z, frame.groups, v, V=Vm, n_tree=frame.n_tree,
                          cluster_labels=(frame.terms[0].group, frame.group_labels[0]))
    model = NestedModel(design, structs, method, fe_constraints=fc,
                        cluster_labels=(frame.terms[0].group, frame.group_labels[0]))
    return model, frame, parsed


def meregress(formula, data, *, se=None, variance=None, V=None, method="reml", covariance=None,
              constraints=None, collinear=False, test="z", dfs="contain", em_iter=20,
              em_tol=1e-10, em_only=False, maxiter=1000, tol=1e-6, safeguard="auto",
              verbose=False) -> MeregressResults:
    """Multilevel meta-regression (Stata's ``meta meregress``, metafor's ``rma.mv``).

    Parameters
    ----------
    formula : ``"y ~ x1 + x2 + (1 + x1 || district) + (1 | district:school)"``.
        Fixed part in formulaic syntax; random terms as lme4 bars, outermost level
        first: ``|`` correlated (unstructured), ``||`` independent, ``0 +`` no
        random intercept, ``(1 | a/b)`` = ``(1 | a) + (1 | a:b)``.
    data : DataFrame (or dict of columns).
    se, variance : sampling standard errors or variances (column name or array).
    V : known sampling covariance instead: a dense n x n array, a scipy.sparse matrix
        (rows as the data), or a list of per-cluster blocks (one per group of the
        outermost level, in sorted label order, rows in data order). It must be
        block-diagonal within the outermost grouping. Give exactly one of se, variance, V.
    method : "reml" (default) or "ml".
    covariance : dict grouping term -> "independent" | "exchangeable" | "identity" |
        "unstructured", or a custom square pattern over the term's effects (Stata's
        ``custom matname``): diagonal = SDs, off-diagonal = correlations; a number
        fixes the value, None/NaN is free, a string label used at two or more places
        constrains those elements equal, e.g. ``[["a", .5], [.5, "a"]]``.
    constraints : linear constraints on the fixed effects, ``["x1 = x2", "x3 = 0.5"]``
        (formulaic's syntax) or an ``(R, r)`` pair meaning ``R beta = r``; fitted exactly.
    test : "z" (normal inference, Stata's default) or "t": t tests and intervals (F
        tests for ``wald_test(test="t")``) on the degrees of freedom chosen by ``dfs``.
    dfs : the df rule of the t references (``test="t"``, ``t_test()``,
        ``wald_test(test="t")``), as metafor's ``dfs=``: "contain" (containment df,
        the default) or "residual" (k - p).
    collinear : keep collinear random-effect columns (Stata's ``collinear``); by default
        they are an error. Collinear moderators are omitted with a note (Stata's rule).
    em_iter, em_tol, em_only : EM iterations before the gradient-based optimiser (Stata's
        emiterate(20), emtolerance(1e-10), emonly).
    maxiter, tol : limits of the gradient-based optimiser; ``tol`` bounds the largest
        free gradient component relative to max(1, |deviance|).
    safeguard : extra starts that guard against local optima (True, False, "auto").
    verbose : print the EM and iteration log.

    Rows with a missing value in any variable the model uses are dropped, counted
    (``res.n_dropped``) and reported with a :class:`mlmeta.MissingDataWarning`.
    """
    for name, val in (("em_iter", em_iter), ("maxiter", maxiter)):
        if not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {val!r}")
    if not (tol > 0 and em_tol > 0):
        raise ValueError("tol and em_tol must be positive")
    if test not in ("z", "t"):
        raise ValueError(f"test must be 'z' or 't', got {test!r}")
    if dfs not in ("contain", "residual"):
        raise ValueError(f"dfs must be 'contain' or 'residual', got {dfs!r}")
    model, frame, parsed = build_model(formula, data, se=se, variance=variance, V=V,
                                       method=method, covariance=covariance,
                                       constraints=constraints, collinear=collinear)
    for note in frame.notes:
        warn(note, UserWarning)
    record = fit_model(model, em_iter=em_iter, em_tol=em_tol, em_only=em_only,
                        maxiter=maxiter, tol=tol, safeguard=safeguard, verbose=verbose)
    res = MeregressResults(model, frame, record, depvar=parsed.response,
                           sampling="se" if se is not None else ("V" if V is not None else "variance"),
                           options={"formula": formula, "em_iter": em_iter, "tol": tol,
                                    "test": test, "dfs": dfs}, data=data)
    if not res.converged:
        warn("the optimiser did not converge; see res.fit_record.messages", ConvergenceWarning)
    if res.boundary:
        warn("estimates on the boundary of the parameter space: " + "; ".join(res.boundary),
             BoundaryWarning)
    return res


_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")


def multilevel(formula, data, *, levels, se=None, variance=None, method="reml", **kwargs):
    """Random-intercepts multilevel meta-regression (Stata's ``meta multilevel``).

    ``levels=["district", "school"]`` lists the grouping variables from the top down;
    each is nested in the ones before it, so ids may repeat across outer groups.
    Equivalent to ``meregress("y ~ x + (1 | district) + (1 | district:school)", ...)``.
    """
    if "|" in formula:
        raise ValueError("multilevel() takes a formula without random-effects terms; "
                         "give the grouping variables in levels=")
    if isinstance(levels, str):
        levels = [levels]
    levels = list(levels)
    if not levels:
        raise ValueError("levels= needs at least one grouping variable")
    for lv in levels:
        if not isinstance(lv, str) or not _NAME.match(lv):
            raise ValueError(f"levels= must be column names, got {lv!r}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels= repeats a variable: {levels}")
    terms = [f"(1 | {':'.join(levels[: i + 1])})" for i in range(len(levels))]
    full = formula.strip()
    if "~" not in full:
        raise ValueError(f"formula needs a '~': {formula!r}")
    lhs, rhs = full.split("~", 1)
    rhs = rhs.strip() or "1"
    full = f"{lhs.strip()} ~ {rhs} + " + " + ".join(terms)
    return meregress(full, data, se=se, variance=variance, method=method, **kwargs)


def sensitivity(formula, data, *, term, covariances, **kwargs):
    """Fit the same model once per covariance pattern of grouping ``term`` (Stata's
    example 7: a list of custom matrices with fixed correlations); returns the fits.

    ``mlmeta.sensitivity(f, df, term="district", covariances=[S1, S2, S3], variance="var")``
    """
    if isinstance(covariances, (str, bytes)) or not hasattr(covariances, "__iter__"):
        raise ValueError("covariances= must be a list of covariance specifications")
    base = dict(kwargs.pop("covariance", None) or {})
    fits = []
    for spec in covariances:
        cov = dict(base)
        cov[term] = spec
        fits.append(meregress(formula, data, covariance=cov, **kwargs))
    if not fits:
        raise ValueError("covariances= is empty")
    return fits
