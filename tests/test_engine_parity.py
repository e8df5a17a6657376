"""The engine parity suite: for every structure x ML/REML x known variances / full V /
profiled residual, the one compiled EM + Newton loop reaches the dense-likelihood
optimum stored in reference/dense_optima.json (reference/make_dense_optima.py), and
its objective equals the dense log-likelihood at the point it reports."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from dense import dense_loglik, dense_V
from engine_cases import case_data, case_ids
from mlmeta.covstruct import make_structure
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from mlmeta.optimize import fit_nested

OPTIMA = json.loads((Path(__file__).parent / "reference" / "dense_optima.json").read_text())


def _model(case_id):
    y, X, Z, groups, variance, V, spec, method, residual = case_data(case_id)
    d = build_design(y, X, Z, groups, variance, V=None if V is None else sparse.csr_matrix(V))
    structs = [make_structure(spec, ["x", "_cons"]), make_structure(None, ["_cons"])]
    m = NestedModel(d, structs, method, residual="profiled" if residual == "profiled" else "known")
    return m, (y, X, Z, groups, variance, V, method, residual)


def test_every_case_has_a_stored_optimum():
    assert sorted(OPTIMA) == sorted(case_ids())


@pytest.mark.parametrize("case_id", case_ids())
def test_engine_reaches_dense_optimum(case_id):
    m, (y, X, Z, groups, variance, V, method, residual) = _model(case_id)
    rec = fit_nested(m)
    assert rec.converged, rec.messages
    llf = -0.5 * rec.deviance
    ref = OPTIMA[case_id]["llf"]
    assert llf >= ref - 1e-7 * max(1.0, abs(ref))
    assert llf == pytest.approx(ref, abs=1e-8)
    # the engine's objective is the dense log-likelihood at the reported point
    ev = m.evaluate(rec.theta)
    Lam = np.diag(variance) if variance is not None else (V if V is not None else np.eye(y.size))
    Vd = ev.sigma2 * dense_V(Z, groups, m.Sigma_list(rec.theta), Lam)
    ll, beta, cov = dense_loglik(y, X, Vd, method)
    assert llf == pytest.approx(ll, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(ev.beta, beta, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ev.cov_beta, cov, rtol=1e-8, atol=1e-12)
