"""Estimated marginal means and pairwise comparisons against R's emmeans (lmer fits with
Kenward-Roger or Satterthwaite df; a metafor meta-regression through emmeans' qdrg),
references made by tests/reference/make_anova.R."""

import functools
import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from references import case_data, load

REF = load("anova_reference")
RTOL = 1e-4
# R's ptukey computes 1 - P(Q <= q): its tail p values below ~1e-13 are rounding noise
P_ATOL = 1e-12


@functools.cache
def fit(name):
    c = REF["mixed"][name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlmeta.mixed(c["formula"], case_data(c["data"]))


@functools.cache
def fit_meta(name):
    c = REF["meta"][name]
    kw = {"test": "t", "dfs": "residual"} if c["test"] == "t" else {}
    return mlmeta.meregress(c["formula"], case_data(c["data"]), variance="vi", **kw)


def _num(v):
    return np.inf if v is None or isinstance(v, str) else v


def _list(v):
    return v if isinstance(v, list) else [v]


def check(em, ref):
    t = ref["table"]
    n_fac = len(_list(t["factors"]))
    for i in range(len(_list(t["emmean"]))):
        key = tuple(t["levels"][f][i] for f in range(n_fac))
        row = em.table.loc[key[0] if n_fac == 1 else key]
        for col in ("emmean", "se", "df", "lower", "upper"):
            np.testing.assert_allclose(row[col], _num(_list(t[col])[i]), rtol=RTOL, err_msg=f"{key} {col}")
    for pr in ref["pairs"]:
        p = em.pairs(pr["adjust"])
        assert list(p.index) == _list(pr["contrast"])
        for col in ("estimate", "se", "df", "t"):
            np.testing.assert_allclose(p[col], [_num(v) for v in _list(pr[col])], rtol=RTOL,
                                       err_msg=f"{pr['adjust']} {col}")
        np.testing.assert_allclose(p["pvalue"], _list(pr["pvalue"]), rtol=RTOL, atol=P_ATOL,
                                   err_msg=f"{pr['adjust']} pvalue")


MIXED = [(name, k) for name in sorted(REF["mixed"]) for k in range(len(REF["mixed"][name]["emmeans"]))]


@pytest.mark.parametrize("name,k", MIXED)
def test_mixed_emmeans_match_R(name, k):
    ref = REF["mixed"][name]["emmeans"][k]
    check(mlmeta.emmeans(fit(name), ref["specs"], ddf=ref["ddf"], at=ref.get("at")), ref)


@pytest.mark.parametrize("name", sorted(REF["meta"]))
def test_meta_emmeans_match_R(name):
    ref = REF["meta"][name]["emmeans"][0]
    check(mlmeta.emmeans(fit_meta(name), ref["specs"]), ref)


def test_grid_and_weights():
    """Equal weights over the other factor, the covariate at its mean, specs order."""
    res = fit("splitplot")
    data = case_data(REF["mixed"]["splitplot"]["data"])
    em = mlmeta.emmeans(res, "A")
    assert list(em.grid.columns) == ["A", "B", "x"] and len(em.grid) == 6
    np.testing.assert_allclose(em.grid["x"], data["x"].mean())
    both = mlmeta.emmeans(res, ["A", "B"])
    np.testing.assert_allclose(em.table["emmean"].to_numpy(),
                               both.table["emmean"].unstack("B").mean(axis=1).loc[em.table.index])
    assert list(both.table.index[:3]) == [("hi", "ctl"), ("lo", "ctl"), ("mid", "ctl")]
    at = mlmeta.emmeans(res, "A", at={"x": [2.0, 4.0], "B": "trt"})
    assert set(at.grid["B"]) == {"trt"} and len(at.grid) == 6
    np.testing.assert_allclose(at.L.to_numpy() @ res.params.to_numpy(), at.table["emmean"])
    assert "Confidence level used: 95" in repr(em)


def test_default_ddf_is_the_fits():
    res = fit("orthodont_ri")
    np.testing.assert_allclose(mlmeta.emmeans(res, "Sex").table["df"],
                               mlmeta.emmeans(res, "Sex", ddf="satterthwaite").table["df"])
    assert np.isinf(mlmeta.emmeans(res, "Sex", ddf="z").table["df"]).all()
    two = mlmeta.emmeans(res, "Sex", ddf="kenward-roger").pairs("tukey")
    np.testing.assert_allclose(two["pvalue"], mlmeta.emmeans(res, "Sex", ddf="kr").pairs("none")["pvalue"])


def test_holm_and_scheffe():
    em = mlmeta.emmeans(fit("splitplot"), "A", ddf="kenward-roger")
    raw = em.pairs("none")["pvalue"].to_numpy()
    holm = em.pairs("holm")["pvalue"].to_numpy()
    order = np.argsort(raw)
    np.testing.assert_allclose(holm[order], np.maximum.accumulate(raw[order] * [3, 2, 1]))
    sch = em.pairs("scheffe")
    from scipy import stats
    np.testing.assert_allclose(sch["pvalue"], stats.f.sf(sch["t"] ** 2 / 2, 2, sch["df"]))


def test_bad_arguments():
    res = fit("splitplot")
    with pytest.raises(ValueError, match="not a variable of the fixed part"):
        mlmeta.emmeans(res, "block")
    with pytest.raises(ValueError, match="levels"):
        mlmeta.emmeans(res, "A", at={"B": "placebo"})
    with pytest.raises(ValueError, match="adjust must be"):
        mlmeta.emmeans(res, "A").pairs("mvt")
    with pytest.raises(ValueError, match="at least two means"):
        mlmeta.emmeans(res, "A", at={"A": "hi"}).pairs()
    with pytest.raises(ValueError, match="ddf= applies to mixed models"):
        mlmeta.emmeans(fit_meta("bcg_z"), "alloc", ddf="kenward-roger")
    bare = res.with_ddf("z")
    bare.data = None
    with pytest.raises(ValueError, match="pass data="):
        mlmeta.emmeans(bare, "A")
    assert isinstance(mlmeta.emmeans(bare, "A", data=case_data(REF["mixed"]["splitplot"]["data"])).table,
                      pd.DataFrame)
