"""Simulators with known truth: repeated-measures data and multilevel meta-analytic data.

:func:`lmm` draws the repeated-measures design of the simulation study in
``pymer4.simulate.simulate_lmm`` (Jolly's comparison of multilevel models,
cluster-robust OLS and two-stage regression). For group g = 1..J with n rows and
k covariates:

    beta          ~ Uniform(0, 1)^(k+1)                     (unless ``coef`` is given)
    b_g           = beta + u_g,   u_g ~ N(0, diag(group_sd^2))   (group coefficients)
    x_gi          ~ N(x_mean, x_sd^2)^k,  independent
    DV_gi         = [1, x_gi'] b_g + e_gi,   e_gi ~ N(noise_mean, noise_sd^2)

so that ``DV ~ IV1 + ... + IVk + (IV1 + ... + IVk | Group)`` is the true model
(with uncorrelated random effects of equal variance). ``null=True`` sets the true
slopes to zero (the intercept keeps its Uniform(0, 1) draw).

:func:`meta` draws three-level meta-analytic data with known sampling variances:
for cluster j = 1..M (e.g. a district or a lab) and effect size i within it,

    y_ji = beta_0 + beta_1 x_ji + u_j + s_j x_ji + w_ji + e_ji,
    u_j ~ N(0, tau^2),  s_j ~ N(0, slope_sd^2) (optional, corr(u_j, s_j) = rho),
    w_ji ~ N(0, omega^2),  e_ji ~ N(0, v_ji)  with v_ji known,

the model ``y ~ x + (1 + x | cluster) + (1 | cluster:es)`` with ``variance="v"``
(drop the slope from the formula when ``slope_sd=0``).

Seeds: an int, a :class:`numpy.random.SeedSequence` or a
:class:`numpy.random.Generator` (vectorised draws). A legacy
:class:`numpy.random.RandomState` in :func:`lmm` reproduces pymer4's draw order,
so ``lmm(..., seed=np.random.RandomState(s))`` gives the same numbers as
``simulate_lmm(..., seed=s)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["lmm", "meta", "lmm_arrays"]


def _generator(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _per_coef(value, n, what):
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.size == 1:
        return np.full(n, arr[0])
    if arr.size != n:
        raise ValueError(f"{what} must be a scalar or have {n} entries (intercept first)")
    return arr


def lmm_arrays(n_obs_per_group, n_coef, n_groups, *, group_sd=0.25, noise_sd=1.0, coef=None,
               null=False, x_mean=0.0, x_sd=1.0, noise_mean=0.0, seed=None):
    """The arrays behind :func:`lmm`, without building a DataFrame.

    Parameters
    ----------
    n_obs_per_group, n_coef, n_groups : int
        Rows per group, covariates (k), groups (J).
    group_sd, noise_sd, coef, null, x_mean, x_sd, noise_mean, seed
        As in :func:`lmm`.

    Returns
    -------
    y : numpy.ndarray
        (n,) outcomes.
    X : numpy.ndarray
        (n, k) covariates, without the intercept.
    codes : numpy.ndarray
        (n,) group codes 0..J-1, rows sorted by group.
    group_coefs : numpy.ndarray
        (J, k+1) group coefficients, intercept first.
    beta : numpy.ndarray
        (k+1,) population coefficients.

    Raises
    ------
    ValueError
        For sizes below 1, negative SDs, or ``coef`` of the wrong length.

    Examples
    --------
    >>> from mlmeta import simulate
    >>> y, X, codes, B, beta = simulate.lmm_arrays(5, 2, 3, seed=0)
    >>> y.shape, X.shape, B.shape, codes[:7].tolist()
    ((15,), (15, 2), (3, 3), [0, 0, 0, 0, 0, 1, 1])
    """
    n, k, J = int(n_obs_per_group), int(n_coef), int(n_groups)
    if n < 1 or k < 0 or J < 1:
        raise ValueError("n_obs_per_group and n_groups must be >= 1 and n_coef >= 0")
    sd = _per_coef(group_sd, k + 1, "group_sd")
    if (sd < 0).any() or noise_sd < 0:
        raise ValueError("standard deviations must be >= 0")
    legacy = isinstance(seed, np.random.RandomState)
    rng = seed if legacy else _generator(seed)
    if coef is None:
        beta = rng.rand(k + 1) if legacy else rng.random(k + 1)
    else:
        beta = np.asarray(coef, dtype=float).reshape(-1).copy()
        if beta.shape[0] != k + 1:
            raise ValueError(f"coef needs {k + 1} values (intercept first), got {beta.shape[0]}")
    if null:
        beta[1:] = 0.0
    codes = np.repeat(np.arange(J), n)
    if legacy:
        B = np.array([rng.normal(b, s, J) for b, s in zip(beta, sd)]).T
        X = np.empty((J * n, k))
        e = np.empty(J * n)
        for g in range(J):
            X[g * n:(g + 1) * n] = rng.normal(x_mean, x_sd, size=(n, k))
            e[g * n:(g + 1) * n] = rng.normal(noise_mean, noise_sd, size=n)
    else:
        B = beta + sd * rng.standard_normal((J, k + 1))
        X = x_mean + x_sd * rng.standard_normal((J * n, k))
        e = noise_mean + noise_sd * rng.standard_normal(J * n)
    y = B[codes, 0] + np.einsum("ij,ij->i", X, B[codes, 1:]) + e
    return y, X, codes, B, beta


def lmm(n_obs_per_group, n_coef, n_groups, *, group_sd=0.25, noise_sd=1.0, coef=None, null=False,
        x_mean=0.0, x_sd=1.0, noise_mean=0.0, seed=None):
    """Simulate repeated-measures data (module docstring for the distributions).

    ``b_g = beta + u_g`` with ``u_g ~ N(0, diag(group_sd^2))``, covariates
    ``x ~ N(x_mean, x_sd^2)`` and ``DV = [1, x'] b_g + e``, ``e ~ N(noise_mean,
    noise_sd^2)``, so ``DV ~ IV1 + ... + IVk + (IV1 + ... + IVk | Group)`` is the true
    model.

    Parameters
    ----------
    n_obs_per_group, n_coef, n_groups : int
        Rows per group, covariates (k), groups (J).
    group_sd : float or array-like
        SD of the group coefficients around beta; a scalar or k+1 values.
    noise_sd, noise_mean : float
        Residual distribution (the essay's ``noise_params``).
    coef : array-like, optional
        True beta (k+1 values, intercept first); default Uniform(0, 1) draws.
    null : bool
        Set the true slopes to 0.
    x_mean, x_sd : float
        Distribution of the covariates.
    seed : int, SeedSequence, Generator or RandomState, optional
        Seed; a RandomState reproduces pymer4's draw order.

    Returns
    -------
    data : DataFrame with columns DV, IV1..IVk, Group (1..J), rows sorted by group.
    group_coefs : DataFrame (J, k+1), index Grp1..GrpJ, columns Intercept, IV1..IVk.
    beta : ndarray (k+1,), the population coefficients (intercept first).

    Raises
    ------
    ValueError
        For sizes below 1, negative SDs, or ``coef`` of the wrong length.

    Examples
    --------
    >>> import mlmeta
    >>> data, group_coefs, beta = mlmeta.simulate.lmm(20, 2, 10, group_sd=0.5, seed=1)
    >>> data.shape, list(data.columns)
    ((200, 4), ['DV', 'IV1', 'IV2', 'Group'])
    >>> group_coefs.shape, beta.shape
    ((10, 3), (3,))
    """
    y, X, codes, B, beta = lmm_arrays(n_obs_per_group, n_coef, n_groups, group_sd=group_sd,
                                      noise_sd=noise_sd, coef=coef, null=null, x_mean=x_mean,
                                      x_sd=x_sd, noise_mean=noise_mean, seed=seed)
    ivs = [f"IV{i + 1}" for i in range(X.shape[1])]
    data = pd.DataFrame(X, columns=ivs)
    data.insert(0, "DV", y)
    data["Group"] = codes + 1
    coefs = pd.DataFrame(B, columns=["Intercept"] + ivs,
                         index=[f"Grp{g + 1}" for g in range(B.shape[0])])
    return data, coefs, beta


def meta(n_clusters, n_per_cluster=(2, 6), *, beta=(0.2, 0.1), tau=0.2, omega=0.1, slope_sd=0.0,
         rho=0.0, vi=(0.01, 0.1), x_sd=1.0, x_within=True, seed=None):
    """Simulate three-level meta-analytic data with known sampling variances.

    ``y_ji = beta_0 + beta_1 x_ji + u_j + s_j x_ji + w_ji + e_ji`` with
    ``u_j ~ N(0, tau^2)``, ``s_j ~ N(0, slope_sd^2)`` (``corr(u_j, s_j) = rho``),
    ``w_ji ~ N(0, omega^2)`` and ``e_ji ~ N(0, v_ji)``: the model
    ``y ~ x + (1 + x | cluster) + (1 | cluster:es)`` with ``variance="v"``.

    Parameters
    ----------
    n_clusters : int
        Number of top-level clusters M.
    n_per_cluster : int or tuple
        Effect sizes per cluster: an int, or (low, high) for uniform integer sizes
        in [low, high].
    beta : tuple
        (intercept, slope of the moderator x).
    tau, omega : float
        SD of the cluster intercepts u_j and of the within-cluster w_ji.
    slope_sd, rho : float
        SD of the cluster slopes s_j (0: no random slope) and corr(u_j, s_j).
    vi : float or tuple
        Sampling variances: (low, high) for Uniform(low, high) draws, or a scalar.
    x_sd : float
        SD of the moderator.
    x_within : bool
        False makes x constant within a cluster (a cluster-level moderator).
    seed : int, SeedSequence or Generator, optional
        Seed.

    Returns
    -------
    data : DataFrame with columns y, v (sampling variance), se, x, cluster (1..M)
        and es (1..n_j within the cluster), rows sorted by cluster.
    cluster_effects : DataFrame (M, 2): the drawn u_j and s_j.
    truth : dict with beta, tau, omega, slope_sd, rho and the random-effects
        covariance ``Sigma`` of (u_j, s_j) (intercept first).

    Raises
    ------
    ValueError
        For fewer than one cluster or effect size, negative SDs, ``rho`` outside
        [-1, 1] or non-positive sampling variances.

    Examples
    --------
    >>> import mlmeta
    >>> data, effects, truth = mlmeta.simulate.meta(30, omega=0.2, seed=1)
    >>> list(data.columns)
    ['y', 'v', 'se', 'x', 'cluster', 'es']
    >>> res = mlmeta.meregress("y ~ x + (1 | cluster) + (1 | cluster:es)", data, variance="v")
    >>> res.group_names
    ['cluster', 'cluster:es']
    >>> res.params.round(2)                   # truth: x 0.1, _cons 0.2
    x        0.13
    _cons    0.20
    Name: coef, dtype: float64
    """
    rng = _generator(seed)
    M = int(n_clusters)
    if M < 1:
        raise ValueError("n_clusters must be >= 1")
    if np.ndim(n_per_cluster) == 0:
        sizes = np.full(M, int(n_per_cluster))
    else:
        lo, hi = (int(v) for v in n_per_cluster)
        sizes = rng.integers(lo, hi + 1, size=M)
    if (sizes < 1).any():
        raise ValueError("every cluster needs at least one effect size")
    b = np.asarray(beta, dtype=float)
    if b.shape != (2,):
        raise ValueError("beta must be (intercept, slope)")
    if min(tau, omega, slope_sd) < 0 or not -1 <= rho <= 1:
        raise ValueError("tau, omega and slope_sd must be >= 0 and rho in [-1, 1]")
    Sigma = np.array([[tau * tau, rho * tau * slope_sd], [rho * tau * slope_sd, slope_sd * slope_sd]])
    L = np.array([[tau, 0.0], [rho * slope_sd, np.sqrt(max(1.0 - rho * rho, 0.0)) * slope_sd]])
    U = rng.standard_normal((M, 2)) @ L.T
    n = int(sizes.sum())
    cl = np.repeat(np.arange(M), sizes)
    es = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    x = (rng.standard_normal(n) if x_within else rng.standard_normal(M)[cl]) * x_sd
    if np.ndim(vi) == 0:
        v = np.full(n, float(vi))
    else:
        v = rng.uniform(float(vi[0]), float(vi[1]), size=n)
    if (v <= 0).any():
        raise ValueError("sampling variances must be positive")
    y = (b[0] + U[cl, 0] + (b[1] + U[cl, 1]) * x + omega * rng.standard_normal(n)
         + np.sqrt(v) * rng.standard_normal(n))
    data = pd.DataFrame({"y": y, "v": v, "se": np.sqrt(v), "x": x, "cluster": cl + 1, "es": es + 1})
    effects = pd.DataFrame(U, columns=["u", "s"], index=pd.RangeIndex(1, M + 1, name="cluster"))
    truth = {"beta": b, "tau": float(tau), "omega": float(omega), "slope_sd": float(slope_sd),
             "rho": float(rho), "Sigma": Sigma}
    return data, effects, truth
