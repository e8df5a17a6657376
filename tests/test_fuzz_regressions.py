"""Designs the random-design harness found failing, stored as data
(tests/reference/make_fuzz_regressions.py): each now fits without an exception or a
stray warning, its postestimation runs, and its log-likelihood is the dense one at the
estimates and reaches the dense optimum."""

import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from dense import DenseDeviance
from references import REFERENCE, load

CASES = load("fuzz_regressions")


def _fit(spec):
    data = pd.read_csv(REFERENCE.parent.parent / spec["data"])
    kw = dict(method=spec["method"], covariance=spec["covariance"])
    if "V" in spec:
        kw["V"] = np.loadtxt(REFERENCE.parent.parent / spec["V"], delimiter=",")
    else:
        kw.update(spec["sampling"])
    if spec["api"] == "mixed":
        return mlmeta.mixed(spec["formula"], data, **kw)
    if spec["api"] == "model":
        return mlmeta.Model(spec["formula"], data, **kw).fit()
    return mlmeta.meregress(spec["formula"], data, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_case_fits_to_the_dense_optimum(name):
    spec = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # none may leak
        warnings.simplefilter("ignore", mlmeta.BoundaryWarning)
        res = _fit(spec)
        str(res.summary())
        res.re_params()
        res.random_effects()
    m, d = res.model, res.model.design
    Lam = None if m.residual == "profiled" else (d.Lambda.toarray() if d.Lambda is not None
                                                 else d.variance)
    dense = DenseDeviance(d.y, d.X, d.Z, d.groups, Lam, m.method, cluster=d.groups[0])
    assert res.llf == pytest.approx(-0.5 * dense(m.T_list(res.theta))[0], abs=1e-6)
    assert res.llf >= spec["dense_llf"] - 1e-4
