"""Build a block-diagonal sampling covariance from variances and assumed correlations.

For effect sizes i and j of the same cluster (and subgroup), with sampling
variances v_i, v_j, type (construct) labels, observation labels and times:

    V_ii = v_i,        V_ij = r_ij sqrt(v_i v_j),        r_ij = c_ij * phi^|t_i - t_j|

    c_ij = 1                          same type and same observation
         = rho_obs(obs_i, obs_j)      same type, different observations  (within-construct)
         = rho_type(type_i, type_j)   different types                    (between-construct)

and ``V_ij = 0`` across clusters or subgroups. Without ``time`` the factor
``phi^|t_i - t_j|`` is 1. This is metafor's ``vcalc()`` parameterisation
(``rho`` for concurrent estimates, ``phi`` the autocorrelation per unit of time);
clubSandwich's ``impute_covariance_matrix(vi, cluster, r)`` is the constant case.

Defaults: without ``obs`` every row of a cluster is its own observation, so
``vcalc(v, cluster, rho=0.6)`` has correlation 0.6 between any two rows of a
cluster (metafor needs ``obs=`` row ids for this). Rows of the same type with
no ``obs`` given are the same observation unless ``rho=(within, between)`` is
given (metafor's convention for ``type=`` alone). With ``time`` and no ``rho``
the correlation is ``phi^|lag|`` (metafor's ``time1=`` alone).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

__all__ = ["vcalc"]


def _column(x, data, name, n=None):
    if x is None:
        return None
    if isinstance(x, str):
        if data is None:
            raise ValueError(f"{name}={x!r} is a column name but no data= was given")
        if x not in data:
            raise ValueError(f"unknown column {x!r} for {name}=")
        x = data[x]
    x = np.asarray(x)
    if x.ndim == 0 and name == "variance" and n is not None:
        x = np.full(n, float(x))
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has length {x.shape[0]} but there are {n} rows")
    if pd.isna(x).any():
        raise ValueError(f"{name} has missing values (first at row {int(np.flatnonzero(pd.isna(x))[0])})")
    return x


def _codes(x):
    try:
        codes, labels = pd.factorize(pd.Series(x), sort=True)
    except TypeError:
        codes, labels = pd.factorize(pd.Series(x), sort=False)
    return codes.astype(np.intp), list(labels)


def _check_r(r, what):
    r = np.atleast_1d(np.asarray(r, dtype=float))
    bad = ~np.isfinite(r) | (np.abs(r) >= 1)
    if bad.any():
        raise ValueError(f"{what}: correlations must lie in (-1, 1), got {r[bad][:3].tolist()}")


def _pair_matrix(spec, labels, what):
    """Correlation matrix over ``labels`` from a scalar, a DataFrame (labelled), a dict
    keyed by label pairs, or an array ordered like the sorted labels."""
    k = len(labels)
    if np.isscalar(spec):
        _check_r(spec, what)
        R = np.full((k, k), float(spec))
    elif isinstance(spec, pd.DataFrame):
        missing = [lab for lab in labels if lab not in spec.index or lab not in spec.columns]
        if missing:
            raise ValueError(f"{what}: no row/column for {missing}")
        R = np.array(spec.loc[labels, labels], dtype=float)
    elif isinstance(spec, dict):
        R = np.full((k, k), np.nan)
        pos = {lab: i for i, lab in enumerate(labels)}
        for key, val in spec.items():
            a, b = key
            if a in pos and b in pos:
                R[pos[a], pos[b]] = R[pos[b], pos[a]] = float(val)
        np.fill_diagonal(R, 1.0)
        if np.isnan(R).any():
            i, j = np.argwhere(np.isnan(R))[0]
            raise ValueError(f"{what}: no correlation given for the pair ({labels[i]!r}, {labels[j]!r})")
    else:
        R = np.array(spec, dtype=float)
        if R.shape != (k, k):
            raise ValueError(f"{what}: a matrix must be {k} x {k} (labels {labels}), got shape {R.shape}")
    if not np.allclose(R, R.T):
        raise ValueError(f"{what}: the correlation matrix is not symmetric")
    off = ~np.eye(k, dtype=bool)
    _check_r(R[off], what)
    np.fill_diagonal(R, 1.0)
    return R


def vcalc(variance, cluster, rho=None, obs=None, type=None, time=None, phi=None, data=None, *,
          subgroup=None, blocks=False, check_pd=True):
    """Block-diagonal sampling covariance with assumed within-cluster correlations.

    Within a cluster, ``V_ij = r_ij sqrt(v_i v_j)`` with ``r_ij = c_ij phi^|t_i - t_j|``
    and c_ij 1 for the same type and observation, ``rho_obs`` for different
    observations of the same type, ``rho_type`` across types (module
    :mod:`mlmeta.vcalc`); metafor's ``vcalc()`` and clubSandwich's
    ``impute_covariance_matrix()`` (the constant case).

    Parameters
    ----------
    variance : str, float or array-like
        Sampling variances (array, column name, or a scalar for all rows).
    cluster : str or array-like
        Cluster labels (e.g. study); rows of different clusters are independent.
    rho : float, tuple, dict, array-like or DataFrame, optional
        Correlation of concurrent estimates (formula in the module docstring):

        * without ``type``: a scalar, or per observation pair (see below);
        * with ``type``: the between-type correlation (scalar or per type pair),
          or ``(within, between)`` -- a pair of such specs, as metafor's
          ``rho = c(within, between)`` with ``type=`` and ``obs=``.

        Per-pair specs: a labelled DataFrame, a dict ``{("PD", "AL"): 0.4}``, or
        a square array ordered like the sorted labels. Values in (-1, 1).
    obs, type, time, subgroup : str or array-like, optional
        Labels per row (arrays or column names); ``time`` numeric. Rows of different
        subgroups of a cluster are independent.
    phi : float, optional
        Autocorrelation per unit of time (needs ``time``), in [-1, 1].
    data : pandas.DataFrame, optional
        The data the column names refer to.
    blocks : bool
        Return a list of dense per-cluster blocks (clusters in sorted label order,
        rows in data order) instead of a CSR matrix.
    check_pd : bool
        Raise if a block is not positive definite, naming the clusters.

    Returns
    -------
    scipy.sparse.csr_matrix or list of numpy.ndarray
        (n, n) with rows and columns in the data's order (block-diagonal after
        sorting by cluster), or the list of blocks. Pass it as ``V=`` to
        :func:`meregress`.

    Raises
    ------
    ValueError
        For missing or non-positive variances, unknown columns, labels of the wrong
        length or with missing values, correlations outside (-1, 1), ``obs=``,
        ``type=`` or ``time=`` without the correlation they need, or a block that
        is not positive definite.

    Examples
    --------
    The berkey trials report two outcomes measured on the same patients; with an
    assumed correlation of 0.6 between them:

    >>> import mlmeta
    >>> dat = mlmeta.datasets.load("berkey")
    >>> V = mlmeta.vcalc("vi", "trial", rho=0.6, data=dat)
    >>> V.shape, V.nnz
    ((10, 10), 20)
    >>> V.toarray()[:2, :2].round(5)              # trial 1: PD and AL
    array([[0.0075 , 0.00456],
           [0.00456, 0.0077 ]])
    >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, V=V)
    >>> res.params.round(4)
    outcome[AL]   -0.3490
    outcome[PD]    0.3607
    Name: coef, dtype: float64
    """
    cl = _column(cluster, data, "cluster")
    n = cl.shape[0]
    v = _column(variance, data, "variance", n).astype(float)
    if not (np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError(f"variances must be positive and finite (first bad at row "
                         f"{int(np.flatnonzero(~(np.isfinite(v) & (v > 0)))[0])})")
    obs_v, type_v = _column(obs, data, "obs", n), _column(type, data, "type", n)
    time_v, sub_v = _column(time, data, "time", n), _column(subgroup, data, "subgroup", n)
    if time_v is not None:
        time_v = time_v.astype(float)
        if phi is None:
            raise ValueError("time= needs phi= (the autocorrelation per unit of time)")
    elif phi is not None:
        raise ValueError("phi= needs time=")
    if phi is not None and not (np.isfinite(phi) and -1 <= phi <= 1):
        raise ValueError(f"phi must lie in [-1, 1], got {phi}")
    if obs_v is not None and rho is None:
        raise ValueError("obs= needs rho= (the correlation between different observations)")
    if type_v is not None and rho is None:
        raise ValueError("type= needs rho= (the correlation between different types)")
    if rho is None and time_v is None:
        raise ValueError("give rho= (and/or time= with phi=)")
    if phi is not None and phi < 0 and np.any(time_v != np.round(time_v)):
        raise ValueError("a negative phi needs integer times")
    ocodes, olabels = _codes(obs_v if obs_v is not None else np.arange(n))
    if type_v is None:
        tcodes, R_type = np.zeros(n, np.intp), np.ones((1, 1))
        within, given = (1.0, False) if rho is None else (rho, True)
    else:
        tcodes, tlabels = _codes(type_v)
        pair = isinstance(rho, (tuple, list)) and len(rho) == 2
        if obs_v is not None and not pair:
            raise ValueError("with both type= and obs=, give rho=(within, between) correlations")
        (within, between), given = (rho if pair else (1.0, rho)), pair
        R_type = _pair_matrix(between, tlabels, "rho (between types)")
    R_obs = None
    if not np.isscalar(within):
        if obs_v is None:
            raise ValueError("correlations per observation pair need obs=")
        R_obs = _pair_matrix(within, olabels, "rho (within type)")
    elif given:
        _check_r(within, "rho")
    ccodes, clabels = _codes(cl)
    key = ccodes if sub_v is None else ccodes * (int(_codes(sub_v)[0].max()) + 1) + _codes(sub_v)[0]
    order = np.argsort(ccodes, kind="stable")
    sizes = np.bincount(ccodes)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out_blocks = [None] * len(clabels)
    rows_all, cols_all, vals_all, bad = [], [], [], []
    sd = np.sqrt(v)
    for s in np.unique(sizes):
        cls = np.flatnonzero(sizes == s)
        idx = order[starts[cls][:, None] + np.arange(s)]                  # (J_s, s)
        ti, oi = tcodes[idx], ocodes[idx]
        same_type = ti[:, :, None] == ti[:, None, :]
        if R_obs is not None:
            c_within = R_obs[oi[:, :, None], oi[:, None, :]]
        else:
            c_within = np.where(oi[:, :, None] == oi[:, None, :], 1.0, float(within))
        c = np.where(same_type, c_within, R_type[ti[:, :, None], ti[:, None, :]])
        if time_v is not None:
            lag = np.abs(time_v[idx][:, :, None] - time_v[idx][:, None, :])
            c = c * np.where(lag == 0, 1.0, float(phi) ** lag)
        c = c * (key[idx][:, :, None] == key[idx][:, None, :])
        i_s = np.arange(s)
        c[:, i_s, i_s] = 1.0
        V = c * sd[idx][:, :, None] * sd[idx][:, None, :]
        if check_pd and s > 1:
            ev = np.linalg.eigvalsh(V)
            bad.extend(cls[ev[:, 0] <= 1e-10 * ev[:, -1]].tolist())
        if blocks:
            for j, c_ in enumerate(cls):
                out_blocks[c_] = V[j]
        else:
            rows_all.append(np.repeat(idx, s, axis=1).ravel())
            cols_all.append(np.tile(idx, (1, s)).ravel())
            vals_all.append(V.ravel())
    if bad:
        names = [clabels[b] for b in sorted(bad)]
        shown = ", ".join(repr(x) for x in names[:10])
        shown += f" and {len(names) - 10} more" if len(names) > 10 else ""
        raise ValueError(f"the sampling covariance is not positive definite in cluster"
                         f"{'s' if len(names) > 1 else ''} {shown}; check rho/phi (e.g. rows of the "
                         f"same type and time without obs= are perfectly correlated)")
    if blocks:
        return out_blocks
    M = sparse.csr_matrix((np.concatenate(vals_all), (np.concatenate(rows_all), np.concatenate(cols_all))),
                          shape=(n, n))
    M.eliminate_zeros()
    return M
