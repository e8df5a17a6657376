"""What users see at the REPL and in notebooks: every printed result shows its text table
(not a dataclass dump), renders HTML, Markdown and LaTeX; factor coefficients are shown
as Stata does (the factor's name above its levels, labels never abbreviated to
ambiguity); statsmodels' names (tvalues, fittedvalues, resid, t_test) on meregress and
mixed results; warnings point at the user's line.

Snapshot files in tests/snapshots/; set MLMETA_UPDATE_SNAPSHOTS=1 to rewrite them.
"""

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlmeta
from mlmeta.summary import CoefTable, FixedRow, GroupRow, RandomBlock, RandomRow, Summary, factor_level
from references import data_path, load

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("MLMETA_UPDATE_SNAPSHOTS", "") not in ("", "0")
BERKEY = "yi ~ 0 + outcome + (0 + outcome | trial)"
SCHOOL = "stdmdiff ~ year_c + region + (1 | district) + (1 | district:school)"
SLEEP = "Reaction ~ Days + (1 + Days | Subject)"


def _snapshot(name, text):
    path = SNAPSHOTS / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing snapshot {path}; run with MLMETA_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text()


def _school():
    df = mlmeta.datasets.load("schoolcal")
    d = df["district"].astype(int)
    df["region"] = np.where(d % 3 == 0, "north", np.where(d % 3 == 1, "south", "east"))
    return df


@pytest.fixture(scope="module")
def school_res():
    return mlmeta.meregress(SCHOOL, _school(), variance="var")


@pytest.fixture(scope="module")
def berkey_res():
    return mlmeta.meregress(BERKEY, mlmeta.datasets.load("berkey"), variance="vi")


@pytest.fixture(scope="module")
def sleep_res():
    return mlmeta.mixed(SLEEP, pd.DataFrame(load("df_reference")["data"]["sleepstudy"]))


# --------------------------------------------------------------------------- #
# tables with factors, from fixed numbers (snapshots)
# --------------------------------------------------------------------------- #
def factor_summary() -> Summary:
    """A meta-regression on a continuous moderator, a three-level factor, a factor-by-
    moderator interaction and the constant; two outcomes as random effects."""
    rows = [FixedRow("year_c", .0053611, .010813, .50, .620, -.015832, .0265543),
            FixedRow("region[T.north]", .0600169, .2241363, .27, .789, -.3792821, .499316),
            FixedRow("region[T.south]", -.0736906, .2736447, -.27, .788, -.6100244, .4626431),
            FixedRow("region[T.north]:year_c", .0123, .0201, .61, .541, -.0271, .0517),
            FixedRow("region[T.south]:year_c", -.0044, .0188, -.23, .815, -.0412, .0324),
            FixedRow("_cons", .1736387, .1526746, 1.14, .255, -.1255981, .4728754)]
    random = [RandomBlock("trial", "Unstructured", [
        RandomRow("sd(outcome[AL])", .1816654, .0678526, .0873667, .3777449),
        RandomRow("sd(outcome[PD])", .0984536, .0606849, .029415, .3295303),
        RandomRow("corr(outcome[AL],outcome[PD])", .7752085, .4568554, -.8368652, .9971559)])]
    return Summary(title="Multilevel REML meta-regression", depvar="stdmdiff", nobs=56,
                   groups=[GroupRow("trial", 28, 2, 2.0, 2)], wald_chi2=0.52, wald_df=5,
                   wald_p=.9150, ll_label="Log restricted-likelihood", llf=-5.9684504, fixed=rows,
                   Q_M=458.80, Q_M_df=50, Q_M_p=0.0, random=random,
                   notes=["1 observation dropped because of missing values."])


def ambiguous_table() -> CoefTable:
    """Levels (and names) that Stata's 11/12-character abbreviation would make identical."""
    rows = [FixedRow("dose[T.high_dose_morning]", .31, .1, 3.1, .002, .11, .51),
            FixedRow("dose[T.high_dose_evening]", .22, .1, 2.2, .028, .02, .42),
            FixedRow("baseline_severity_1", .05, .02, 2.5, .012, .01, .09),
            FixedRow("baseline_severity_2", .04, .02, 2.0, .046, .001, .079),
            FixedRow("_cons", 1.2, .3, 4.0, .000, .61, 1.79)]
    return CoefTable(rows)


def test_factor_level_names():
    assert factor_level("region[T.north]") == ("region", "north")
    assert factor_level("outcome[AL]") == ("outcome", "AL")
    assert factor_level("C(dose, Treatment('low'))[T.2]") == ("dose", "2")
    assert factor_level("region[T.north]:year_c") == ("region:year_c", "north")
    assert factor_level("year_c:region[T.north]") == ("year_c:region", "north")
    assert factor_level("a[T.x]:b[T.y]") == ("a:b", "x:y")
    assert factor_level("year_c") == (None, "year_c")
    assert factor_level("_cons") == (None, "_cons")


def test_factor_table_snapshot():
    s = factor_summary()
    text = s.as_text()
    _snapshot("factor_header.txt", text)
    lines = text.splitlines()
    # the factor's name on a line of its own, its levels under it, blank lines around
    i = lines.index("      region |")
    assert lines[i - 1] == "             |"
    assert lines[i + 1].startswith("      north  |   .0600169")
    assert lines[i + 2].startswith("      south  |  -.0736906")
    assert lines[i + 3] == "             |"
    assert lines[i + 4] == "region:year_c |" or lines[i + 4] == "region:yea~c |"
    assert max(len(ln) for ln in lines) <= 78
    _snapshot("factor_header.md", s.as_markdown())
    _snapshot("factor_header.tex", s.as_latex())


def test_ambiguous_labels_widen_the_column():
    table = ambiguous_table()
    lines = table.text_lines("y") + ["-" * table.width()]
    text = "\n".join(lines) + "\n"
    _snapshot("factor_ambiguous.txt", text)
    # Stata's 12-character column would print "high_dose~g" twice and "baseline_~1" and
    # "baseline_~2"; two more characters tell them apart
    assert table.label_width() == 14 and table.width() == 80
    assert "high_dose_m~g  |" in text and "high_dose_e~g  |" in text
    assert "baseline_sev~1 |" in text and "baseline_sev~2 |" in text
    assert max(len(ln) for ln in lines) == table.width()
    # distinct after abbreviation: the 12-character column is kept
    plain = CoefTable([FixedRow("region[T.north]", 1, 1, 1, 1, 0, 2),
                       FixedRow("region[T.south]", 1, 1, 1, 1, 0, 2),
                       FixedRow("a_very_long_moderator", 1, 1, 1, 1, 0, 2)])
    assert plain.label_width() == 12 and plain.width() == 78


def test_random_effects_labels_widen_only_when_ambiguous():
    s = factor_summary()
    assert s._random_label_width() == 27           # one correlation: abbreviated, unambiguous
    rows = [RandomRow("corr(outcome[AL],outcome[PD])", .5, .1, .3, .7),
            RandomRow("corr(outcome[AL],outcome[PX])", .4, .1, .2, .6)]
    s.random = [RandomBlock("trial", "Unstructured", rows)]
    assert s._random_label_width() == 29
    text = s.as_text()
    assert "corr(outcome[AL],outcome[PD]) |" in text and "corr(outcome[AL],outcome[PX]) |" in text


# --------------------------------------------------------------------------- #
# fitted models: factor headers, REPL display, exports
# --------------------------------------------------------------------------- #
def test_fitted_factor_tables(school_res, berkey_res):
    lines = berkey_res.summary().as_text().splitlines()
    i = lines.index("     outcome |")
    assert lines[i + 1].startswith("         AL  |") and lines[i + 2].startswith("         PD  |")
    text = school_res.summary().as_text()
    assert "      region |\n      north  |" in text and "region[T." not in text
    md = school_res.summary().as_markdown()
    assert "| **region** |" in md and "| north |" in md and "| south |" in md
    html = school_res.summary()._repr_html_()
    assert 'class="mlmeta-factor">region</th>' in html and "<th>north</th>" in html
    tex = berkey_res.summary().as_latex()
    assert r"\multicolumn{7}{l}{\textit{outcome}} \\" in tex and "\nAL & " in tex


def _displays(school_res, sleep_res):
    full = school_res
    reduced = mlmeta.meregress("stdmdiff ~ year_c + region + (1 | district)", _school(), variance="var")
    return {
        "summary": full.summary(),
        "mixed summary": sleep_res.summary(),
        "heterogeneity": full.heterogeneity(),
        "wald_test": full.wald_test("region[T.north] = 0, region[T.south] = 0"),
        "wald_test F": sleep_res.wald_test("Days = 0", test="t"),
        "lrtest": mlmeta.lrtest(full, reduced),
        "estimates_table": mlmeta.estimates_table(full, reduced, names=["three", "two"]),
        "estimates_table random": mlmeta.estimates_table(full, reduced, random=True),
        "robust summary": full.robust(cluster="district").summary(),
        "robust wald_test": full.robust(cluster="district").wald_test(["year_c"]),
        "t_test summary": sleep_res.t_test().summary(),
        "ols summary": mlmeta.ols("stdmdiff ~ year_c + region", _school(), cluster="district").summary(),
    }


def test_repl_shows_the_text_table(school_res, sleep_res):
    for what, obj in _displays(school_res, sleep_res).items():
        text = obj.as_text()
        assert repr(obj) == text.rstrip("\n"), what
        assert str(obj) == text, what
        assert not repr(obj).startswith(("Summary(", "Heterogeneity(", "WaldTest(", "LRTest(",
                                         "EstimatesTable(", "'")), what
        html = obj._repr_html_()
        assert "<table" in html and "nan" not in html.lower(), what


def test_every_table_exports_markdown_and_latex(school_res, sleep_res):
    for what, obj in _displays(school_res, sleep_res).items():
        md, tex = obj.as_markdown(), obj.as_latex()
        assert md.endswith("\n") and tex.endswith("\n"), what
        tables = obj.tables()
        assert tables, what
        # markdown: a pipe table per part, as many cells in every row as in its header
        for block in md.split("\n\n"):
            rows = [ln for ln in block.splitlines() if ln.startswith("|")]
            if rows:
                counts = {ln.replace("\\|", "").count("|") for ln in rows}
                assert len(counts) == 1, (what, block)
        # LaTeX: one tabular per part, rows with the right number of cells, specials escaped
        assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == len(tables), what
        for t, chunk in zip(tables, tex.split(r"\begin{tabular}")[1:]):
            n = len(t.columns)
            body = chunk.split(r"\bottomrule")[0]
            body = body.split(r"\midrule" if r"\midrule" in body else r"\toprule")[-1]
            for ln in body.strip().splitlines():
                if not ln.startswith(r"\multicolumn"):
                    assert ln.replace(r"\&", "").count("&") == n - 1, (what, ln)
        assert "nan" not in md.lower() and "nan" not in tex.lower(), what
    tex = school_res.summary().as_latex()
    assert r"\_cons" in tex and r"P\textgreater{}\textbar{}z\textbar{}" in tex
    assert r"\_cons" in school_res.summary().as_markdown()


def test_summary_markdown_and_latex_of_a_fit(berkey_res):
    md = berkey_res.summary().as_markdown()
    assert md.startswith("**Multilevel REML meta-regression**")
    # labels in full (the text table abbreviates this correlation)
    assert r"corr(outcome\[AL\],outcome\[PD\])" in md
    assert "Test of homogeneity: Q\\_M = chi2(8) = 124.90" in md
    tex = berkey_res.summary().as_latex()
    assert r"corr(outcome{[}AL{]},outcome{[}PD{]})" in tex and r"\toprule" in tex


# --------------------------------------------------------------------------- #
# statsmodels' names
# --------------------------------------------------------------------------- #
def test_tvalues_on_z_and_t_results(school_res, sleep_res):
    pd.testing.assert_series_equal(school_res.tvalues, (school_res.params / school_res.bse).rename("z"))
    assert sleep_res.tvalues.name == "t"
    np.testing.assert_allclose(sleep_res.tvalues, sleep_res.params / sleep_res.bse, rtol=1e-14)
    t = mlmeta.meregress(SCHOOL, _school(), variance="var", test="t")
    assert t.tvalues.name == "t"


def test_fittedvalues_and_resid_mixed(sleep_res):
    """fitted = b0 + b1 Days + u0[subject] + u1[subject] Days (the BLUPs), as
    statsmodels' MixedLM and lme4's fitted(); resid = y - fitted; over the used rows."""
    data = pd.DataFrame(load("df_reference")["data"]["sleepstudy"])
    blup = sleep_res.random_effects()["Subject"]
    u0 = blup[blup.effect == "_cons"].blup
    u1 = blup[blup.effect == "Days"].blup
    s = data["Subject"]
    b = sleep_res.params
    days = data["Days"]
    expect = b["_cons"] + b["Days"] * days + u0.loc[s].to_numpy() + u1.loc[s].to_numpy() * days
    fv = sleep_res.fittedvalues
    pd.testing.assert_index_equal(fv.index, data.index)
    np.testing.assert_allclose(fv.to_numpy(), expect.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(sleep_res.resid.to_numpy(), (data["Reaction"] - fv).to_numpy(), rtol=1e-10,
                               atol=1e-9)
    assert sleep_res.resid.name == "resid"


def test_fittedvalues_and_resid_meregress_with_missing_rows():
    df = _school()
    df.loc[[3, 10], "year_c"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlmeta.MissingDataWarning)
        res = mlmeta.meregress(SCHOOL, df, variance="var")
    fv, r = res.fittedvalues, res.resid
    assert len(fv) == len(r) == res.nobs == 54
    assert 3 not in fv.index and 10 not in fv.index
    used = df.drop(index=[3, 10])
    np.testing.assert_allclose(fv + r, used["stdmdiff"], rtol=1e-12)
    # the BLUPs are in: fitted differs from x'b by the random-effects contribution
    xb = res.predict("xb").loc[fv.index]
    assert np.abs(fv - xb).max() > 1e-3


def test_t_test_has_statsmodels_contrast_names(school_res, sleep_res):
    for res in (school_res, sleep_res):
        tt = res.t_test()
        np.testing.assert_array_equal(tt.effect, res.params.to_numpy())
        np.testing.assert_array_equal(tt.sd, res.bse.to_numpy())
        np.testing.assert_allclose(tt.tvalue, (res.params / res.bse).to_numpy(), rtol=1e-14)
        assert tt.conf_int().shape == (len(res.params), 2)
        one = res.t_test(f"{res.fe_names[0]} = 0")
        assert one.df_denom[0] == pytest.approx(tt.df.iloc[0])
        assert isinstance(one, pd.DataFrame) and list(one.index) == [f"{res.fe_names[0]} = 0"]
    text = sleep_res.t_test(90).summary().as_text()
    assert "[90% conf." in text and "  Days |" in text and "df" in text.splitlines()[1]


# --------------------------------------------------------------------------- #
# warnings point at the user's line
# --------------------------------------------------------------------------- #
def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return caught


@pytest.mark.parametrize("call", ["meregress", "Model", "multilevel", "mixed", "ols", "sensitivity"])
def test_missing_data_warning_points_at_the_caller(call):
    df = _school()
    df.loc[4, "year_c"] = np.nan
    f = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)"
    calls = {
        "meregress": lambda: mlmeta.meregress(f, df, variance="var"),
        "Model": lambda: mlmeta.Model(f, df, variance="var"),
        "multilevel": lambda: mlmeta.multilevel("stdmdiff ~ year_c", df, levels=["district", "school"],
                                                variance="var"),
        "mixed": lambda: mlmeta.mixed("stdmdiff ~ year_c + (1 | district)", df),
        "ols": lambda: mlmeta.ols("stdmdiff ~ year_c", df, cluster="district"),
        "sensitivity": lambda: mlmeta.sensitivity(f, df, term="district", covariances=["identity"],
                                                  variance="var"),
    }
    caught = [w for w in _warnings_of(calls[call]) if issubclass(w.category, mlmeta.MissingDataWarning)]
    assert caught
    assert all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]


def test_fit_warnings_point_at_the_caller():
    school = mlmeta.datasets.load("schoolcal")
    slope = "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)"
    conv = _warnings_of(lambda: mlmeta.meregress(slope, school, variance="var", em_iter=0, maxiter=1,
                                                 safeguard=False))
    sing = _warnings_of(lambda: mlmeta.mixed("DV ~ IV1 + IV2 + IV3 + (IV1 + IV2 + IV3 | Group)",
                                             pd.read_csv(data_path("mixed_essay_sd0.1_s6.csv"))))
    res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district)", school, variance="var")
    dep = _warnings_of(lambda: res.df_resid)
    for caught, cls in ((conv, mlmeta.ConvergenceWarning), (sing, mlmeta.BoundaryWarning),
                        (dep, FutureWarning)):
        mine = [w for w in caught if issubclass(w.category, cls)]
        assert mine and all(w.filename == __file__ for w in mine), cls
