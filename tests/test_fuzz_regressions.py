"""Designs the random-design harness found failing, stored as data
(tests/reference/make_fuzz_regressions.py): each now fits without an exception or a
stray warning, its postestimation runs, and its log-likelihood is the dense one at the
estimates and reaches the dense optimum; those marked ``invariant`` give the same
answer (to 1e-8) with their rows in another order."""

import warnings

import numpy as np
import pytest

import mlmeta
from dense import DenseDeviance
from references import REFERENCE, load, read_exact

CASES = load("fuzz_regressions")


def _cases(api_batch):
    """The names of the stored cases of the batch API (or of the others)."""
    return sorted(n for n in CASES if (CASES[n]["api"] == "batch") == api_batch)


def _fit(spec, perm=None):
    """The stored case's fit (its rows in the order ``perm`` when given)."""
    data = read_exact(REFERENCE.parent.parent / spec["data"])
    perm = np.arange(len(data)) if perm is None else perm
    data = data.iloc[perm].reset_index(drop=True)
    kw = dict(method=spec["method"], covariance=spec["covariance"])
    if "V" in spec:
        kw["V"] = np.loadtxt(REFERENCE.parent.parent / spec["V"], delimiter=",")[np.ix_(perm, perm)]
    else:
        kw.update(spec["sampling"])
    if spec["api"] == "mixed":
        return mlmeta.mixed(spec["formula"], data, **kw)
    if spec["api"] in ("model", "batch"):
        return mlmeta.Model(spec["formula"], data, **kw)
    return mlmeta.meregress(spec["formula"], data, **kw)


def _dense(model, y=None):
    d = model.design
    Lam = None if model.residual == "profiled" else (d.Lambda.toarray() if d.Lambda is not None
                                                     else d.variance)
    return DenseDeviance(d.y if y is None else y, d.X, d.Z, d.groups, Lam, model.method,
                         cluster=d.groups[0])


@pytest.mark.parametrize("name", _cases(api_batch=False))
def test_stored_case_fits_to_the_dense_optimum(name):
    spec = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # none may leak
        warnings.simplefilter("ignore", mlmeta.BoundaryWarning)
        warnings.simplefilter("ignore", mlmeta.ConvergenceWarning)
        res = _fit(spec)
        if spec["api"] == "model":
            res = res.fit()
        str(res.summary())
        res.re_params()
        res.random_effects()
    m = res.model
    assert res.llf == pytest.approx(-0.5 * _dense(m)(m.T_list(res.theta))[0], abs=1e-4)
    assert res.llf >= spec["dense_llf"] - 1e-4
    if spec.get("invariant"):
        assert res.converged
        perm = np.random.default_rng(5).permutation(len(res.model.design.y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mlmeta.BoundaryWarning)
            again = _fit(spec, perm)
            again = again.fit() if spec["api"] == "model" else again
        assert again.converged and again.llf == pytest.approx(res.llf, abs=1e-8)


@pytest.mark.parametrize("name", _cases(api_batch=True))
def test_stored_batch_fits_reach_the_dense_optima(name):
    spec = CASES[name]
    model = _fit(spec)
    Y = np.loadtxt(REFERENCE.parent.parent / spec["Y"], delimiter=",")
    out = mlmeta.fit_batch(model, Y, n_jobs=2, safeguard=spec.get("safeguard", False))
    perm = model.model.design.perm
    for j, ref in enumerate(spec["dense_llf"]):
        m = model.model
        ll = -0.5 * _dense(m, Y[perm, j])(m.T_list(out.theta[j]))[0]
        assert out.llf[j] == pytest.approx(ll, abs=1e-4)      # the harness's tolerance
        assert out.llf[j] >= ref - 1e-4
