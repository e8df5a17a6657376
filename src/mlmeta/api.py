"""Public entry points: :func:`meregress` and :func:`multilevel`.

The pipeline is staged (as lme4's ``lmer``): parse the formula -> build the model
frame (missing rows dropped and reported) -> sort rows and precompute the nested
design -> build the objective -> optimise -> results.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from scipy import sparse

from mlmeta._errors import BoundaryWarning, ConvergenceWarning, warn
from mlmeta._threads import one_blas_thread
from mlmeta.constraints import parse_constraints
from mlmeta.covspatial import Spatial, spatial_levels, spatial_terms
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
        sizes = np.bincount(codes, minlength=len(labels))
        blocks = [B if type(B) is np.ndarray and B.ndim == 2 and B.dtype == np.float64
                  else np.atleast_2d(np.asarray(B, dtype=float)) for B in V]
        shapes = np.fromiter((k for B in blocks for k in B.shape), dtype=np.intp,
                             count=2 * len(blocks)).reshape(-1, 2)
        for g in np.flatnonzero((shapes[:, 0] != sizes) | (shapes[:, 1] != sizes))[:1]:
            label = labels[g].item() if isinstance(labels[g], np.generic) else labels[g]
            raise ValueError(f"V block {g} (group {label!r}) is {shapes[g, 0]} x {shapes[g, 1]} "
                             f"but the group has {sizes[g]} rows")
        # entry (i, j) of block g sits at the group's i-th and j-th rows (data order)
        rows_of = np.argsort(codes, kind="stable")
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        sq = sizes * sizes
        block = np.repeat(np.arange(len(labels)), sq)
        at = np.arange(int(sq.sum())) - np.repeat(np.cumsum(sq) - sq, sq)
        width = sizes[block]
        ri = rows_of[first[block] + at // width]
        ci = rows_of[first[block] + at % width]
        M = sparse.csr_matrix((np.concatenate([B.ravel() for B in blocks]), (ri, ci)),
                              shape=(n_data, n_data))
    elif sparse.issparse(V):
        M = sparse.csr_matrix(V, dtype=float, copy=True)      # never the caller's arrays
    else:
        M = np.asarray(V, dtype=float)
        if M.ndim != 2:
            raise ValueError("V must be a square matrix, a scipy.sparse matrix or a list of blocks")
        M = sparse.csr_matrix(M)
    if M.shape != (n_data, n_data):
        raise ValueError(f"V is {M.shape[0]} x {M.shape[1]} but the data have {n_data} rows")
    M = M[rows][:, rows].tocsr() if rows.size < n_data else M
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


#: a sampling variance this many times smaller than the median sampling variance is
#: below what the engine's whitening resolves: its row would outweigh the others by more
#: than double precision carries through the random effects' factorisation
TINY_VARIANCE_RATIO = 1e10


def _check_tiny_variances(v, frame, data):
    """ValueError naming the rows whose sampling variance v_i is below
    median(v) / :data:`TINY_VARIANCE_RATIO`."""
    v = np.asarray(v, dtype=float)
    if not v.size or v.min() >= v.max() / TINY_VARIANCE_RATIO:
        return          # (the median is at most the largest variance)
    spread = float(np.median(v))
    tiny = np.flatnonzero(v < spread / TINY_VARIANCE_RATIO)
    if tiny.size:
        labels = list(getattr(data, "index", pd.RangeIndex(len(frame.sample)))[frame.sample][tiny])
        shown = ", ".join(f"{lab!r} ({v[i]:.1e})" for lab, i in zip(labels[:5], tiny[:5]))
        more = f" and {tiny.size - 5} more" if tiny.size > 5 else ""
        raise ValueError(
            f"{tiny.size} row(s) have sampling variances more than {TINY_VARIANCE_RATIO:.0e} times "
            f"smaller than the median sampling variance ({spread:.2e}): rows {shown}{more}. Such an estimate "
            f"counts as known exactly, beyond what double precision carries through the fit next "
            f"to the other rows; check these variances (a unit error?), or drop or fix the rows.")


def _structures(frame, covariance, known=None, spatial=None):
    """One structure per level; a level with a known correlation matrix across its groups
    (``known``: {level: R}) is sigma^2 R, an identity structure over its one effect; a
    spatial level (``spatial``: {level: (structure, D)}) is sigma^2 R(rho)
    (:class:`mlmeta.covspatial.Spatial`)."""
    spatial = spatial or {}
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
    structs = []
    for i, t in enumerate(frame.terms):
        if i in spatial:
            structs.append(Spatial(frame.re_names[i], *spatial[i], term=t.group))
            continue
        if i in (known or {}):
            if covariance.get(t.group) not in (None, "identity"):
                raise ValueError(f"term {t.group!r} has a known correlation matrix R; its covariance "
                                 f"is sigma^2 R, so covariance={covariance[t.group]!r} cannot apply")
            s = make_structure("identity", frame.re_names[i])
            s.title = "Known correlation R"
        else:
            s = make_structure(covariance.get(t.group), frame.re_names[i], t.correlated, term=t.group)
        structs.append(s)
    return structs


def constrained_design(frame, constraints):
    """(y*, X*, constraints) with ``y* = y - X beta_0``, ``X* = X N`` (see
    :mod:`mlmeta.constraints`); the frame's y and X when there are no constraints."""
    if constraints is None or (isinstance(constraints, (list, tuple)) and len(constraints) == 0):
        return frame.y, frame.X, None
    fc = parse_constraints(constraints, frame.fe_names)
    return frame.y - frame.X @ fc.beta0, np.asfortranarray(frame.X @ fc.N), fc


def known_correlations(frame, R) -> dict:
    """{level: R_l} from ``R={term: matrix}`` (metafor's ``R=``): a known correlation matrix
    across the groups of a term with a random intercept only, Sigma = sigma^2 R_l. A
    DataFrame is matched on the group labels (rows and columns; extra labels are dropped),
    an array must list the term's groups in sorted label order. R_l is returned in the
    level's code order (the frame's group labels)."""
    out = {}
    for term, M in (R or {}).items():
        lvl = next((i for i, t in enumerate(frame.terms) if t.group == term), None)
        if lvl is None:
            raise ValueError(f"R: no random term is grouped by {term!r}; the terms are grouped by "
                             f"{', '.join(repr(t.group) for t in frame.terms)}")
        if frame.Z[lvl].shape[1] != 1 or frame.re_names[lvl] != ["_cons"]:
            raise ValueError(f"R[{term!r}]: a known correlation matrix applies to a random intercept "
                             f"(1 | {term}), not to ({frame.terms[lvl].rhs} | {term})")
        labels = list(frame.group_labels[lvl])
        if isinstance(M, pd.DataFrame):
            missing = [g for g in labels if g not in M.index or g not in M.columns]
            if missing:
                raise ValueError(f"R[{term!r}] has no row/column for {len(missing)} group(s) of "
                                 f"{term}: {', '.join(map(repr, missing[:5]))}"
                                 f"{' ...' if len(missing) > 5 else ''}")
            A = M.loc[labels, labels].to_numpy(dtype=float)
        else:
            A = np.asarray(M, dtype=float)
            if A.shape != (len(labels), len(labels)):
                raise ValueError(f"R[{term!r}] must be {len(labels)} x {len(labels)} (one row and "
                                 f"column per group of {term}, in sorted label order); got {A.shape}. "
                                 f"A labelled DataFrame may hold more groups.")
        if not np.isfinite(A).all():
            raise ValueError(f"R[{term!r}] has non-finite entries")
        if np.abs(A - A.T).max() > 1e-8 * max(1.0, np.abs(A).max()):
            raise ValueError(f"R[{term!r}] is not symmetric")
        if np.abs(np.diag(A) - 1.0).max() > 1e-8:
            raise ValueError(f"R[{term!r}] is not a correlation matrix (its diagonal is not 1); "
                             f"rescale a covariance matrix C by D^-1/2 C D^-1/2, D = diag(C)")
        try:
            np.linalg.cholesky(0.5 * (A + A.T))
        except np.linalg.LinAlgError:
            raise ValueError(f"R[{term!r}] is not positive definite") from None
        out[lvl] = 0.5 * (A + A.T)
    return out


@one_blas_thread
def build_model(formula, data, *, se=None, variance=None, V=None, method="reml",
                covariance=None, constraints=None, collinear=False, R=None, dist=None):
    """Parse, build the frame and the nested model; return (model, frame, parsed).

    With ``constraints`` the model is fitted on the constrained design
    (see :mod:`mlmeta.constraints`); ``model.fe_constraints`` maps back."""
    parsed = parse_formula(formula)
    if not parsed.random:
        raise ValueError("the formula has no random-effects term such as (1 | study); "
                         "meregress needs at least one level")
    extra = {"se": se, "variance": variance}
    spatial = spatial_terms([t.group for t in parsed.random], covariance, dist, R)
    frame = build_model_frame(parsed, data, extra={k: v for k, v in extra.items() if v is not None},
                              collinear_random=bool(collinear), crossed=tuple(R or ()) + tuple(spatial))
    if V is not None:
        if se is not None or variance is not None:
            raise ValueError("give exactly one of se= (sampling standard errors), variance= "
                             "(sampling variances) or V= (sampling covariance matrix)")
        Vm, v = _sampling_covariance(frame, data, V), None
    else:
        Vm, v = None, _sampling_variance(frame, se, variance)
    _check_tiny_variances(Vm.diagonal() if v is None else v, frame, data)
    known = known_correlations(frame, R)
    structs = _structures(frame, covariance, known, spatial_levels(frame, spatial, dist))
    y, X, fc = constrained_design(frame, constraints)
    if frame.y.shape[0] <= X.shape[1]:
        raise ValueError(f"{frame.y.shape[0]} observations for {X.shape[1]} fixed effects: at "
                         f"least one more observation than fixed effects is needed")
    design = build_design(y, X, frame.Z, frame.groups, v, V=Vm, n_tree=frame.n_tree, known_R=known,
                          cluster_labels=(frame.terms[0].group, frame.group_labels[0]))
    model = NestedModel(design, structs, method, fe_constraints=fc,
                        cluster_labels=(frame.terms[0].group, frame.group_labels[0]))
    return model, frame, parsed


@one_blas_thread
def meregress(formula, data, *, se=None, variance=None, V=None, method="reml", covariance=None,
              constraints=None, collinear=False, test="z", dfs="contain", em_iter=20,
              em_tol=1e-10, em_only=False, maxiter=1000, tol=1e-6, safeguard="auto",
              verbose=False, R=None, dist=None) -> MeregressResults:
    r"""Multilevel meta-regression (Stata's ``meta meregress``, metafor's ``rma.mv``).

    Fits, for effect sizes in top-level clusters j,

    .. math::

        y_j = X_j \beta + \sum_l Z_j^{(l)} u^{(l)} + e_j, \qquad
        u^{(l)}_g \sim N(0, \Sigma^{(l)}), \qquad e_j \sim N(0, \Lambda_j)

    with the sampling covariance :math:`\Lambda_j` known (diagonal from ``se=`` or
    ``variance=``, or blocks of ``V=``). With :math:`V_j = \Lambda_j + Z_j G_j Z_j'`
    and :math:`r = y - X\hat\beta` (:math:`\hat\beta` by GLS), the (restricted)
    log-likelihood maximised is, in Stata's and metafor's convention,

    .. math::

        \ell_{ML} &= -\tfrac12 \bigl[n \log 2\pi + \textstyle\sum_j \log|V_j|
                    + \sum_j r_j' V_j^{-1} r_j\bigr] \\
        \ell_{REML} &= -\tfrac12 \bigl[(n-p) \log 2\pi + \textstyle\sum_j \log|V_j|
                    + \sum_j r_j' V_j^{-1} r_j + \log|\sum_j X_j' V_j^{-1} X_j|
                    - \log|X'X|\bigr]

    Parameters
    ----------
    formula : str
        ``"y ~ x1 + x2 + (1 + x1 || district) + (1 | district:school)"``. Fixed part
        in formulaic syntax (factors, interactions, ``0 +``); random terms as lme4
        bars: ``|`` correlated (unstructured), ``||`` independent, ``0 +`` no random
        intercept, ``(1 | a/b)`` = ``(1 | a) + (1 | a:b)``. Grouping terms are nested
        when their ids say so (every group of one lies inside a group of another) and
        crossed otherwise, as in lme4 and metafor: ``(1 | study/esid) + (1 | species)``
        nests effect sizes in studies and crosses species with both; the summary's
        "Crossed:" line names the crossed terms. Ids that repeat across outer groups
        (school 1 in every district) must be nested explicitly
        (``(1 | district/school)``), or they are read as one crossed group. The
        intercept is reported as ``_cons``, after the moderators.
    data : pandas.DataFrame or dict of columns
        The data, one row per effect size.
    se, variance : str or array-like, optional
        Sampling standard errors or sampling variances (a column name or one value per
        row). Give exactly one of ``se``, ``variance`` and ``V``.
    V : array-like, scipy.sparse matrix or list of arrays, optional
        Known sampling covariance instead: a dense n x n array, a scipy.sparse matrix
        (rows as the data), or a list of per-cluster blocks (one per group of the
        outermost level, in sorted label order, rows in data order). It must be
        block-diagonal within the outermost grouping; see :func:`mlmeta.vcalc`.
    method : {"reml", "ml"}
        Restricted (default) or full maximum likelihood.
    covariance : dict or str, optional
        Grouping term -> ``"independent"``, ``"exchangeable"``, ``"identity"`` or
        ``"unstructured"`` (or metafor's ``"DIAG"``, ``"CS"``, ``"ID"``, ``"UN"``);
        metafor's ``"AR"``, ``"HAR"``, ``"CAR"`` or ``"HCS"`` for a factor term such as
        ``(0 + C(time) | study)`` (AR and HAR over the levels in order, CAR over their
        numeric values; see :mod:`mlmeta.covfactor`; names are case-insensitive); or a
        custom square pattern over the term's effects
        (Stata's ``covariance(custom matname)``): diagonal = SDs, off-diagonal =
        correlations; a number fixes the value, None/NaN is free, a string label used
        at two or more places constrains those elements equal, e.g.
        ``[["a", .5], [.5, "a"]]``. A string applies to the only grouping term.
        metafor's spatial ``"SPEXP"``, ``"SPGAU"``, ``"SPLIN"``, ``"SPRAT"``, ``"SPSPH"``
        for a random intercept with ``dist=``.
    constraints : list of str or (R, r), optional
        Exact linear constraints on the fixed effects, ``["x1 = x2", "x3 = 0.5"]``
        (formulaic's syntax) or a pair ``(R, r)`` meaning ``R beta = r``.
    collinear : bool
        Keep collinear random-effect columns (Stata's ``collinear``); by default they
        are an error. Collinear moderators are omitted with a note (Stata's rule).
    test : {"z", "t"}
        Normal inference (Stata's default) or t tests and intervals (F tests for
        ``wald_test(test="t")``) on the degrees of freedom chosen by ``dfs``.
    dfs : {"contain", "residual"}
        The df rule of the t references, as metafor's ``dfs=``: containment df
        (default) or k - p.
    em_iter, em_tol, em_only : int, float, bool
        EM iterations before the gradient-based optimiser and their tolerance; EM
        only (Stata's ``emiterate(20)``, ``emtolerance(1e-10)``, ``emonly``).
    maxiter, tol : int, float
        Limits of the Newton optimiser; ``tol`` bounds the largest free gradient
        component relative to max(1, \|deviance\|).
    safeguard : {"auto", True, False}
        Extra starts that guard against local optima (:mod:`mlmeta.starts`). "auto": on
        up to 50,000 effect sizes, and those away from the EM path (every variance at
        half its natural size, pseudo-random points) only where the fit ends on the
        boundary of the parameter space, did not converge, or a start near the EM path
        found a higher optimum; True: every start; False: none.
    verbose : bool
        Print the EM and iteration log.
    R : dict, optional
        Grouping term -> known correlation matrix across that term's groups (metafor's
        ``R=``, e.g. a phylogenetic correlation over species): a DataFrame labelled by
        group on both axes (extra groups are ignored) or an array in sorted label order.
        The term must be a random intercept, ``(1 | phylogeny)``; its covariance is
        :math:`\sigma^2 R` and it is fitted as crossed with the other terms.
    dist : dict, optional
        Grouping term -> distances between its groups for a spatial structure
        (``covariance={"site": "SPEXP"}``, metafor's ``dist=``; :mod:`mlmeta.covspatial`):
        a square DataFrame labelled by group on both axes, a square array in sorted label
        order, or a DataFrame of coordinate columns indexed by group (Euclidean
        distances). The term's covariance is :math:`\sigma^2 R(\rho)` across all its
        groups; it needs another random term for the nested part, e.g. ``(1 | study)``.

    Returns
    -------
    MeregressResults
        Estimates, standard errors, variance components and postestimation methods.

    Raises
    ------
    ValueError
        For a formula without a random-effects term, unknown columns, non-positive
        or infinite sampling variances, a ``V`` that is not symmetric or not
        block-diagonal within the outermost level, a covariance structure for an
        unknown term, or too few observations.

    Warns
    -----
    MissingDataWarning
        Rows with a missing value in a variable the model uses are dropped and
        counted (``res.n_dropped``).
    ConvergenceWarning, BoundaryWarning
        The optimiser did not converge; a variance is zero or a correlation +-1.

    See Also
    --------
    multilevel : random intercepts at every level, Stata's ``meta multilevel``.
    mixed : the same model on raw data, with the residual variance estimated.
    Model : one specification fitted to many outcomes.

    Examples
    --------
    The three-level model of Stata's manual, example 2 (schools within districts):

    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                        data=df, variance="var")
    >>> print(f"{res.params['_cons']:.4f} (SE {res.bse['_cons']:.4f}), llf {res.llf:.4f}")
    0.1847 (SE 0.0846), llf -7.9587
    >>> {g: round(float(S.iloc[0, 0]) ** 0.5, 4) for g, S in res.re_cov.items()}
    {'district': 0.2551, 'district:school': 0.1809}

    A moderator, ML, and t tests on containment df:

    >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
    ...                        data=df, variance="var", method="ml", test="t")
    >>> res.params.round(4)
    year_c    0.0051
    _cons     0.1803
    Name: coef, dtype: float64
    >>> res.df
    year_c    54.0
    _cons      9.0
    Name: df, dtype: float64
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
                                       constraints=constraints, collinear=collinear, R=R,
                                       dist=dist)
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
    each is nested in the ones before it, so ids may repeat across outer groups. The
    model is :func:`meregress` with the formula
    ``"y ~ x + (1 | district) + (1 | district:school)"``: for effect size i of school
    s in district d, ``y = x'beta + u_d + w_ds + e_i`` with ``u_d ~ N(0, tau_1^2)``,
    ``w_ds ~ N(0, tau_2^2)`` and ``e_i ~ N(0, v_i)``.

    Parameters
    ----------
    formula : str
        Fixed part only, e.g. ``"stdmdiff ~ year_c"`` or ``"stdmdiff ~ 1"``.
    data : pandas.DataFrame
        The data, one row per effect size.
    levels : str or list of str
        Grouping variables, outermost first.
    se, variance : str or array-like, optional
        Sampling standard errors or variances (exactly one).
    method : {"reml", "ml"}
        Estimation method.
    **kwargs
        Any other option of :func:`meregress`.

    Returns
    -------
    MeregressResults

    Raises
    ------
    ValueError
        If the formula has random-effects bars, ``levels`` is empty, repeats a
        variable or holds something other than column names.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.multilevel("stdmdiff ~ 1", df, levels=["district", "school"],
    ...                         variance="var")
    >>> res.group_names
    ['district', 'district:school']
    >>> print(f"{res.llf:.4f}")
    -7.9587
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
    """Fit the same model once per covariance pattern of one grouping term.

    Stata's example 7: a list of custom matrices with fixed correlations, to see how
    the estimates move with an assumption the data cannot settle.

    Parameters
    ----------
    formula : str
        Model formula, as :func:`meregress`.
    data : pandas.DataFrame
        The data.
    term : str
        The grouping term whose covariance pattern changes.
    covariances : list
        One ``covariance=`` specification of ``term`` per fit (a structure name or a
        custom pattern, see :func:`meregress`).
    **kwargs
        Other options of :func:`meregress` (``variance=``, ``method=``, a
        ``covariance=`` dict for the other terms, ...).

    Returns
    -------
    list of MeregressResults
        One fit per pattern, in order; compare them with :func:`estimates_table`.

    Raises
    ------
    ValueError
        If ``covariances`` is empty or not a list.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> fits = mlmeta.sensitivity(
    ...     "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)", df,
    ...     term="district", variance="var",
    ...     covariances=[[[None, r], [r, None]] for r in (0.0, 0.5)])
    >>> [round(float(f.params["year_c"]), 4) for f in fits]
    [0.006, 0.0073]
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
