"""ANOVA tables: lmerTest's Type III / Type I F tests with Satterthwaite and Kenward-Roger
df for mixed models, metafor's Wald tests for a meta-regression (references made by
tests/reference/make_anova.R)."""

import functools
import warnings

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta.anova import type1_contrasts, type3_contrasts, zapsmall
from references import case_data, load

REF = load("anova_reference")
RTOL = 1e-4


@functools.cache
def fit(name):
    c = REF["mixed"][name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlmeta.mixed(c["formula"], case_data(c["data"]))


@functools.cache
def fit_meta(name):
    c = REF["meta"][name]
    kw = {"test": "t", "dfs": "residual"} if c["test"] == "t" else {}   # metafor's rma.mv default
    return mlmeta.meregress(c["formula"], case_data(c["data"]), variance="vi", **kw)


def assert_table(table, ref, cols):
    assert list(table.index) == list(ref)
    for term, row in ref.items():
        for col in cols:
            np.testing.assert_allclose(table.loc[term, col], row[col], rtol=RTOL, err_msg=f"{term} {col}")


TABLES = [("anova3_satterthwaite", 3, "satterthwaite"), ("anova3_kr", 3, "kenward-roger"),
          ("anova1_satterthwaite", 1, "satterthwaite"), ("anova1_kr", 1, "kenward-roger")]


@pytest.mark.parametrize("name", sorted(REF["mixed"]))
@pytest.mark.parametrize("key,type_,ddf", TABLES)
def test_mixed_anova_matches_lmerTest(name, key, type_, ddf):
    table = fit(name).anova(type=type_, ddf=ddf)
    assert list(table.columns) == ["F", "df_num", "df_den", "pvalue"]
    assert table.index.name == "term"
    assert_table(table, REF["mixed"][name][key], ["F", "df_num", "df_den", "pvalue"])


def test_type_spellings_and_default_ddf():
    res = fit("splitplot")
    pd.testing.assert_frame_equal(res.anova(), res.anova(type="III", ddf="Satterthwaite"))
    pd.testing.assert_frame_equal(res.anova(type="I"), res.anova(type=1))
    kr = res.with_ddf("kenward-roger")
    pd.testing.assert_frame_equal(kr.anova(), res.anova(ddf="kenward-roger"))
    assert "Kenward-Roger" in kr.anova().attrs["heading"]


@pytest.mark.parametrize("name", sorted(REF["meta"]))
def test_meta_anova_matches_metafor(name):
    c = REF["meta"][name]
    table = fit_meta(name).anova()
    cols = ["F", "df_num", "df_den", "pvalue"] if c["test"] == "t" else ["chi2", "df_num", "pvalue"]
    assert list(table.columns) == cols
    assert_table(table, c["anova"], cols)


def test_type3_contrast_of_a_contained_covariate():
    """agec in agec * Sex: the slope averaged over the two sexes (beta_agec + beta_int / 2);
    Sex (its variables are not in agec:Sex with the same numerics) keeps its own column."""
    res = fit("orthodont_ri")
    L = type3_contrasts(res)
    names = res.fe_names
    expected = dict.fromkeys(names, 0.0)
    expected.update({"agec": 1.0, "agec:Sex[T.Male]": 0.5})
    np.testing.assert_array_equal(L["agec"], [[expected[n] for n in names]])
    np.testing.assert_array_equal(L["Sex"], [[1.0 if n == "Sex[T.Male]" else 0.0 for n in names]])
    # Type I: lower-triangular sequential contrasts, the last term's row is its own column
    L1 = type1_contrasts(res)
    assert L1["agec:Sex"][0, names.index("agec:Sex[T.Male]")] == 1.0


def test_tables_do_not_depend_on_row_order():
    c = REF["mixed"]["splitplot"]
    data = case_data(c["data"])
    shuffled = data.sample(frac=1.0, random_state=3)
    res = mlmeta.mixed(c["formula"], shuffled)
    for key, type_, ddf in TABLES:
        assert_table(res.anova(type=type_, ddf=ddf), c[key], ["F", "df_den", "pvalue"])


def test_zapsmall_as_R():
    np.testing.assert_array_equal(zapsmall([1.0, 1e-12, -0.3333333333]), [1.0, 0.0, -0.3333333])
    # R: round(x, 7 - ceiling(log10(250)))
    np.testing.assert_array_equal(zapsmall([250.0, 1.23456789]), [250.0, 1.2346])


def test_type3_needs_the_data():
    res = fit("orthodont_ri")
    bare = res.with_ddf("z")
    bare.data = None
    with pytest.raises(ValueError, match="pass data="):
        bare.anova()
    assert_table(bare.anova(data=case_data(REF["mixed"]["orthodont_ri"]["data"]), ddf="satterthwaite"),
                 REF["mixed"]["orthodont_ri"]["anova3_satterthwaite"], ["F", "df_den"])


def test_bad_arguments():
    res = fit("orthodont_ri")
    with pytest.raises(ValueError, match="type must be"):
        res.anova(type=2)
    with pytest.raises(ValueError, match="ddf must be"):
        res.anova(ddf="containment")
    with pytest.raises(ValueError, match="ddf= applies to mixed models"):
        fit_meta("bcg_z").anova(ddf="satterthwaite")
    data = case_data(REF["mixed"]["orthodont_ri"]["data"])
    summed = mlmeta.mixed("distance ~ agec * C(Sex, contr.sum) + (1 | Subject)", data)
    with pytest.raises(ValueError, match="treatment coding"):
        summed.anova()
    ml = mlmeta.mixed(REF["mixed"]["orthodont_ri"]["formula"], data, method="ml")
    with pytest.raises(ValueError, match="REML"):
        ml.anova(ddf="kenward-roger")
