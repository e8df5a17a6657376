"""Profile-likelihood intervals of mixed-model variance parameters against lme4's
confint(fit, method="profile") (the dense profile of tests/reference/make_anova.R)."""

import functools
import warnings

import numpy as np
import pytest
from scipy import stats

import mlmeta
from mlmeta.mixed_profile import MixedProfile
from references import case_data, load

REF = load("anova_reference")
CASES = sorted(n for n, c in REF["mixed"].items() if "profile_fine" in c)


@functools.cache
def fit(name):
    c = REF["mixed"][name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlmeta.mixed(c["formula"], case_data(c["data"]))


def ours(table, lme4_name, groups):
    """The row of our table for lme4's ``sd_(Intercept)|Subject``, ``cor_a.b|g``, ``sigma``."""
    if lme4_name == "sigma":
        return table[table.group == "Residual"].iloc[0]
    what, group = lme4_name.split("|")
    group = next(g for g in groups if set(g.split(":")) == set(group.split(":")))
    kind, effects = what.split("_", 1)
    parts = effects.replace(".(Intercept)", " (Intercept)").split() if kind == "cor" else [effects]
    effects = {"_cons" if e == "(Intercept)" else e for e in parts}
    for _, row in table[table.group == group].iterrows():
        inside = set(row.param[row.param.index("(") + 1:-1].replace(",", " ").split())
        if row.param.startswith("sd" if kind == "sd" else "corr") and inside == effects:
            return row
    raise KeyError(lme4_name)


@pytest.mark.parametrize("name", CASES)
def test_profile_ci_matches_lme4(name):
    res = fit(name)
    table = res.profile_ci()
    assert list(table.columns) == ["group", "param", "estimate", "lower", "upper"]
    ref = REF["mixed"][name]["profile_fine"]
    assert len(table) == len(ref)
    for lme4_name, (lo, hi) in ref.items():
        row = ours(table, lme4_name, res.group_names)
        np.testing.assert_allclose([row.lower, row.upper], [lo, hi], rtol=1e-3, atol=1e-8, err_msg=lme4_name)
        assert row.lower <= row.estimate <= row.upper


def test_reml_profile_brackets_the_reml_estimates():
    res = fit("sleepstudy")
    table = res.profile_ci(ml=False, level=90)
    prof = MixedProfile(res, ml=False)
    cut = stats.chi2.ppf(0.90, 1)
    sd = np.sqrt(np.diag(res.re_cov["Subject"].to_numpy()))
    np.testing.assert_allclose(sorted(table.estimate[:2]), sorted(sd), rtol=1e-6)
    np.testing.assert_allclose(table.estimate.iloc[-1], np.sqrt(res.scale), rtol=1e-8)
    for k, row in table.iterrows():
        for limit in (row.lower, row.upper):
            np.testing.assert_allclose(prof.deviance(k, limit) - prof.dev_min, cut, rtol=1e-6)


def test_boundary_limits():
    """A singular fit (sd(agec) at its ML estimate is small, the correlation undetermined):
    the SD's lower limit is 0 and the correlation's interval is [-1, 1], as lme4."""
    table = fit("orthodont_slope").profile_ci()
    corr = table[table.param.str.startswith("corr")].iloc[0]
    assert (corr.lower, corr.upper) == (-1.0, 1.0)
    assert table[table.param == "sd(agec)"].lower.iloc[0] == 0.0
