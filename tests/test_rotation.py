"""V rotated away (mlmeta.rotation): the rotated model's likelihood is the model's, the
fits through it equal the fits without it, and it stands aside where it does not apply."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import mlmeta
import mlmeta.optimize as opt
from dense import dense_loglik, dense_V
from mlmeta.api import build_model as _build
from mlmeta.rotation import MAX_COND, rotated_twin


def _studies(n_studies=30, seed=0, rho=0.6, slope=False):
    """Effects within studies (1 to 6 per study), V with correlation rho within a study."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, n_studies)
    study = np.repeat(np.arange(n_studies), sizes)
    n = study.size
    x = rng.normal(size=n)
    v = rng.uniform(0.02, 0.3, n)
    blocks = []
    for s in range(n_studies):
        sd = np.sqrt(v[study == s])
        B = rho * np.outer(sd, sd)
        np.fill_diagonal(B, sd ** 2)
        blocks.append(B)
    u = np.repeat(rng.normal(scale=0.4, size=n_studies), sizes)
    y = 0.3 + 0.2 * x + u + rng.normal(scale=0.2, size=n) + rng.normal(size=n) * np.sqrt(v)
    order = rng.permutation(n)          # rows in any order
    df = pd.DataFrame({"y": y, "x": x, "study": study, "es": np.arange(n)}).iloc[order]
    df = df.reset_index(drop=True)
    return df, blocks


def build_model(formula, df, **kwargs):
    return _build(formula, df, **kwargs)[0]


FORMULAS = ["y ~ x + (1 | study) + (1 | study:es)",
            "y ~ 1 + (1 + x | study) + (1 | study:es)",
            "y ~ x + (1 | study/es)"]


@pytest.mark.parametrize("formula", FORMULAS)
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_rotated_model_has_the_models_likelihood(formula, method):
    df, blocks = _studies(seed=1)
    model = build_model(formula, df, V=blocks, method=method)
    twin = rotated_twin(model)
    assert twin is not None and twin.design.Lambda is None
    assert twin._fold_level() == 1                # one effect per lower group, folded
    assert twin.scale == model.scale
    rng = np.random.default_rng(3)
    d = model.design
    for _ in range(4):
        theta = np.clip(rng.uniform(0.05, 0.8, model.n_theta), model.lower, model.upper)
        a, b = model.evaluate(theta, gradient=True), twin.evaluate(theta, gradient=True)
        assert b.deviance == pytest.approx(a.deviance, rel=1e-11)
        np.testing.assert_allclose(b.beta, a.beta, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(b.cov_beta, a.cov_beta, rtol=1e-9)
        np.testing.assert_allclose(b.grad, a.grad, rtol=1e-7, atol=1e-8)
        # and both are the dense likelihood
        Vfull = dense_V(d.Z, d.groups, model.Sigma_list(theta), d.Lambda.toarray())
        ll = dense_loglik(d.y, d.X, Vfull, method)[0]
        assert -0.5 * b.deviance == pytest.approx(ll, rel=1e-10)


@pytest.mark.parametrize("formula", FORMULAS[:2])
@pytest.mark.parametrize("safeguard", ["auto", False])
def test_fit_through_the_rotated_model_equals_the_fit_without(formula, safeguard, monkeypatch):
    df, blocks = _studies(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        used = []
        monkeypatch.setattr(opt, "rotated_twin", lambda m: used.append(rotated_twin(m)) or used[-1])
        fast = mlmeta.meregress(formula, df, V=blocks, safeguard=safeguard)
        assert used and used[0] is not None             # fitted through the rotated model
        calls = []
        monkeypatch.setattr(opt, "rotated_twin", lambda m: calls.append(m) or None)
        slow = mlmeta.meregress(formula, df, V=blocks, safeguard=safeguard)
    assert calls and fast.converged and slow.converged
    assert fast.llf == pytest.approx(slow.llf, rel=1e-10, abs=1e-9)
    np.testing.assert_allclose(fast.params, slow.params, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fast.bse, slow.bse, rtol=1e-5)
    np.testing.assert_allclose(fast.theta, slow.theta, rtol=1e-5, atol=1e-6)


def test_rotation_stands_aside_where_it_does_not_apply():
    df, blocks = _studies(seed=4)
    assert rotated_twin(build_model(FORMULAS[0], df, V=blocks)) is not None
    # sampling variances only; V diagonal; a three-level model; a lower level with a slope
    assert rotated_twin(build_model(FORMULAS[0], df.assign(v=0.1), variance="v")) is None
    diag = [np.diag(np.diag(B)) for B in blocks]
    assert rotated_twin(build_model(FORMULAS[0], df, V=diag)) is None
    three = df.assign(arm=df.es % 2)
    assert rotated_twin(build_model("y ~ x + (1 | study) + (1 | study:arm) + (1 | study:arm:es)",
                                    three, V=blocks)) is None
    assert rotated_twin(build_model("y ~ 1 + (1 | study) + (0 + x | study:es)", df, V=blocks)) is None
    # one badly conditioned block keeps the Cholesky whitening
    worst = next(i for i, B in enumerate(blocks) if B.shape[0] >= 2)
    sd = np.sqrt(np.diag(blocks[worst]))
    bad = list(blocks)
    bad[worst] = (1 - 1e-7) * np.outer(sd, sd) + 1e-7 * np.diag(sd ** 2)
    assert np.linalg.cond(bad[worst]) > MAX_COND
    assert rotated_twin(build_model(FORMULAS[0], df, V=bad)) is None


def test_sparse_V_in_data_order_is_rotated_alike():
    df, blocks = _studies(seed=5)
    rows = [np.flatnonzero(df.study.to_numpy() == s) for s in range(len(blocks))]
    V = sparse.lil_matrix((len(df), len(df)))
    for r, B in zip(rows, blocks):
        V[np.ix_(r, r)] = B
    a = build_model(FORMULAS[0], df, V=blocks)
    b = build_model(FORMULAS[0], df, V=V.tocsr())
    theta = np.array([0.3, 0.2])
    assert rotated_twin(b).deviance(theta) == pytest.approx(rotated_twin(a).deviance(theta), rel=1e-12)
    assert rotated_twin(b).deviance(theta) == pytest.approx(a.deviance(theta), rel=1e-11)


@pytest.mark.parametrize("safeguard", [False, True])
def test_fit_batch_with_V_fits_the_rotated_outcomes_as_single_fits(safeguard):
    """fit_batch of a model whose V rotates away takes the engine's batch path (the
    rotated outcomes on the rotated model) and gives each column's single fit."""
    df, blocks = _studies(seed=6, n_studies=25)
    formula = FORMULAS[0]
    model = mlmeta.Model(formula, df, V=blocks)
    assert mlmeta.batch._batchable(model) is None
    Y = model.simulate(6, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = mlmeta.fit_batch(model, Y, safeguard=safeguard)
        for j in range(Y.shape[1]):
            one = mlmeta.meregress(formula, df.assign(y=Y[:, j]), V=blocks, safeguard=safeguard)
            assert batch.llf[j] == pytest.approx(one.llf, rel=1e-9, abs=1e-8)
            np.testing.assert_allclose(batch.params.values[j], one.params.values, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(batch.bse.values[j], one.bse.values, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(batch.theta[j], one.theta, rtol=1e-4, atol=1e-6)
            assert bool(batch.converged[j]) == one.converged


def _schools(seed=7):
    """Effects within schools within districts, V correlated (0.5) within a school."""
    rng = np.random.default_rng(seed)
    rows = []
    for dist in range(12):
        for school in range(int(rng.integers(1, 4))):
            rows += [(dist, school)] * int(rng.integers(1, 5))
    codes = np.array(rows)
    n = len(codes)
    v = rng.uniform(0.05, 0.3, n)
    key = codes[:, 0] * 10 + codes[:, 1]
    blocks = []
    for k in np.unique(key):
        sd = np.sqrt(v[key == k])
        B = 0.5 * np.outer(sd, sd)
        np.fill_diagonal(B, sd ** 2)
        blocks.append(B)
    x = rng.normal(size=n)
    y = (0.2 * x + np.repeat(rng.normal(scale=0.4, size=12), np.bincount(codes[:, 0]))
         + rng.normal(scale=0.3, size=n) + rng.normal(size=n) * np.sqrt(v))
    df = pd.DataFrame({"y": y, "x": x, "district": codes[:, 0], "school": codes[:, 1],
                       "es": np.arange(n), "ds": key})
    return df, blocks


def test_three_levels_with_V_within_the_middle_groups():
    """V coupling the effects of a school (the level above the lowest) rotates away too:
    the same likelihood, the same fit; V coupling schools of a district does not."""
    df, blocks = _schools()
    f = "y ~ x + (1 | district) + (1 | district:school) + (1 | district:school:es)"
    # V as a sparse matrix over the data rows (blocks by school)
    V = sparse.block_diag(blocks).tocsr()
    order = np.argsort(df.ds.to_numpy(), kind="stable")
    assert np.array_equal(order, np.arange(len(df)))     # rows already by school
    model = build_model(f, df, V=V)
    twin = rotated_twin(model)
    assert twin is not None and twin._fold_level() == 2
    d = model.design
    for theta in ([0.3, 0.2, 0.1], [0.0, 0.5, 0.05], [1.0, 0.0, 0.0]):
        theta = np.array(theta)
        a, b = model.evaluate(theta, gradient=True), twin.evaluate(theta, gradient=True)
        assert b.deviance == pytest.approx(a.deviance, rel=1e-11)
        np.testing.assert_allclose(b.grad, a.grad, rtol=1e-7, atol=1e-8)
        ll = dense_loglik(d.y, d.X, dense_V(d.Z, d.groups, model.Sigma_list(theta),
                                            d.Lambda.toarray()), "reml")[0]
        assert -0.5 * b.deviance == pytest.approx(ll, rel=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mlmeta.meregress(f, df, V=V)
        import mlmeta.optimize as o
        keep = o.rotated_twin
        o.rotated_twin = lambda m: None
        try:
            slow = mlmeta.meregress(f, df, V=V)
        finally:
            o.rotated_twin = keep
    assert fast.llf == pytest.approx(slow.llf, rel=1e-10)
    np.testing.assert_allclose(fast.theta, slow.theta, rtol=1e-5, atol=1e-6)
    # sampling errors correlated across the schools of a district: the Cholesky whitening
    dist = df.district.to_numpy()
    Vd = np.zeros((len(df), len(df)))
    for k in np.unique(dist):
        r = np.flatnonzero(dist == k)
        sd = np.sqrt(np.diag(V.toarray())[r])
        Vd[np.ix_(r, r)] = 0.3 * np.outer(sd, sd) + np.diag(0.7 * sd ** 2)
    assert rotated_twin(build_model(f, df, V=Vd)) is None


def _random_design(seed):
    """Random effects within studies (two levels) or within schools within districts
    (three), V correlated within a study / school (rho up to 0.99), variances at zero or
    not, sampling variances over four orders of magnitude."""
    rng = np.random.default_rng(seed)
    three = bool(seed % 2)
    rows = []
    for a in range(int(rng.integers(3, 25))):
        for b in range(int(rng.integers(1, 4)) if three else 1):
            rows += [(a, b)] * int(rng.integers(1, 6))
    codes = np.array(rows)
    n = len(codes)
    v = rng.uniform(0.01, 1.0, n) * 10 ** rng.uniform(-2, 2)
    key = codes[:, 0] * 10 + codes[:, 1]
    rho = rng.choice([0.3, 0.6, 0.9, 0.99])
    V = np.diag(v)
    for k in np.unique(key):
        r = np.flatnonzero(key == k)
        sd = np.sqrt(v[r])
        V[np.ix_(r, r)] = rho * np.outer(sd, sd) + np.diag((1 - rho) * sd ** 2)
    t = rng.choice([0.0, 0.3, 1.0, 3.0], 3) * np.sqrt(np.median(v))
    x = rng.normal(size=n)
    y = (0.3 * x + rng.normal(scale=t[0] + 1e-12, size=codes[:, 0].max() + 1)[codes[:, 0]]
         + rng.normal(scale=t[1] + 1e-12, size=key.max() + 1)[key]
         + rng.normal(scale=t[2] + 1e-12, size=n) + np.linalg.cholesky(V) @ rng.normal(size=n))
    df = pd.DataFrame({"y": y, "x": x, "a": codes[:, 0], "b": codes[:, 1], "es": np.arange(n)})
    f = ("y ~ x + (1 | a) + (1 | a:b) + (1 | a:b:es)" if three else
         ["y ~ x + (1 | a) + (1 | a:es)", "y ~ 1 + (1 + x | a) + (1 | a:es)"][seed % 4 // 2])
    return df, V, f, ["reml", "ml"][seed % 3 == 0]


@pytest.mark.parametrize("seed", range(16))
def test_random_designs_fit_alike_with_and_without_the_rotation(seed, monkeypatch):
    df, V, f, method = _random_design(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        used = []
        monkeypatch.setattr(opt, "rotated_twin", lambda m: used.append(rotated_twin(m)) or used[-1])
        try:
            fast = mlmeta.meregress(f, df, V=V, method=method)
        except ValueError as exc:
            fast = str(exc)
        assert used and used[0] is not None          # fitted through the rotated model
        monkeypatch.setattr(opt, "rotated_twin", lambda m: None)
        try:
            slow = mlmeta.meregress(f, df, V=V, method=method)
        except ValueError as exc:
            slow = str(exc)
    assert type(fast) is type(slow)
    if isinstance(fast, str):
        return
    assert fast.llf == pytest.approx(slow.llf, rel=1e-9, abs=1e-8)
    assert fast.converged == slow.converged
