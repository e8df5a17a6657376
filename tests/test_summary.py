"""Tests for the summary table: Stata-style number formats, text layout
(snapshot files in tests/snapshots/) and HTML rendering.

Set MLMETA_UPDATE_SNAPSHOTS=1 to rewrite the snapshot files.
"""
from __future__ import annotations

import math
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mlmeta.summary import (FixedRow, GroupRow, RandomBlock, RandomRow, Summary,
                            abbrev, fmt_f, fmt_g)

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("MLMETA_UPDATE_SNAPSHOTS", "") not in ("", "0")
NAN = float("nan")


# --------------------------------------------------------------------------- #
# summaries built from the printed results of Stata's [META] meta meregress
# --------------------------------------------------------------------------- #
def ex1_pupiliq() -> Summary:
    """Example 1: meta meregress stdmdiff || study:, essevariable(se)."""
    return Summary(
        title="Multilevel REML meta-analysis", depvar="stdmdiff", nobs=19,
        groups=[GroupRow("study", 19, 1, 1.0, 1)],
        wald_chi2=None, wald_df=0, wald_p=None,
        ll_label="Log restricted-likelihood", llf=-3.7365412,
        fixed=[FixedRow("_cons", .0836939, .0516531, 1.62, .105, -.0175444, .1849322)],
        Q_M=35.83, Q_M_df=18, Q_M_p=.0074,
        random=[RandomBlock("study", "Identity", [RandomRow("sd(_cons)", .1372184)])],
    )


def ex1_weeks() -> Summary:
    """Example 1: meta meregress stdmdiff weeks || study:, ... variance."""
    return Summary(
        title="Multilevel REML meta-regression", depvar="stdmdiff", nobs=19,
        groups=[GroupRow("study", 19, 1, 1.0, 1)],
        wald_chi2=7.51, wald_df=1, wald_p=.0061,
        ll_label="Log restricted-likelihood", llf=-.71388211,
        fixed=[FixedRow("weeks", -.0157453, .0057447, -2.74, .006, -.0270046, -.0044859),
               FixedRow("_cons", .1941769, .0633561, 3.06, .002, .0700012, .3183527)],
        Q_M=27.66, Q_M_df=17, Q_M_p=.0490,
        random=[RandomBlock("study", "Identity", [RandomRow("var(_cons)", .011166)])],
    )


def ex2_schoolcal() -> Summary:
    """Example 2: meta meregress stdmdiff || district: || school:, ..."""
    return Summary(
        title="Multilevel REML meta-analysis", depvar="stdmdiff", nobs=56,
        groups=[GroupRow("district", 11, 3, 56 / 11, 11),
                GroupRow("school", 56, 1, 1.0, 1)],
        wald_chi2=None, wald_df=0, wald_p=None,
        ll_label="Log restricted-likelihood", llf=-7.9587239,
        fixed=[FixedRow("_cons", .1847132, .0845559, 2.18, .029, .0189866, .3504397)],
        Q_M=578.86, Q_M_df=55, Q_M_p=3.0e-66,
        random=[RandomBlock("district", "Identity", [RandomRow("sd(_cons)", .2550724)]),
                RandomBlock("school", "Identity", [RandomRow("sd(_cons)", .1809324)])],
    )


def ex5_slopes() -> Summary:
    """Example 5: random slope on year_c at the district level, independent."""
    return Summary(
        title="Multilevel REML meta-regression", depvar="stdmdiff", nobs=56,
        groups=[GroupRow("district", 11, 3, 56 / 11, 11),
                GroupRow("school", 56, 1, 1.0, 1)],
        wald_chi2=.55, wald_df=1, wald_p=.4577,
        ll_label="Log restricted-likelihood", llf=-7.2095301,
        fixed=[FixedRow("year_c", .0096021, .0129302, .74, .458, -.0157407, .0349448),
               FixedRow("_cons", .1609612, .082311, 1.96, .051, -.0003654, .3222879)],
        Q_M=550.26, Q_M_df=54, Q_M_p=1e-60,
        random=[RandomBlock("district", "Independent",
                            [RandomRow("sd(year_c)", .0335302),
                             RandomRow("sd(_cons)", .06437)]),
                RandomBlock("school", "Identity", [RandomRow("sd(_cons)", .1808125)])],
    )


def ex6_custom() -> Summary:
    """Example 6: covariance(custom A) with corr(year_c,_cons) fixed at .5
    (noheader; the manual prints these values with cformat(%9.3f))."""
    return Summary(
        title="Multilevel REML meta-regression", depvar="stdmdiff", nobs=56,
        groups=[GroupRow("district", 11, 3, 56 / 11, 11),
                GroupRow("school", 56, 1, 1.0, 1)],
        wald_chi2=None, wald_df=1, wald_p=None,
        ll_label="Log restricted-likelihood", llf=NAN,
        fixed=[FixedRow("year_c", .007, .011, .67, .500, -.014, .028),
               FixedRow("_cons", .170, .082, 2.08, .038, .010, .330)],
        Q_M=550.26, Q_M_df=54, Q_M_p=1e-60,
        random=[RandomBlock("district", "Custom",
                            [RandomRow("sd(year_c)", .026),
                             RandomRow("sd(_cons)", .116),
                             RandomRow("corr(year_c,_cons)", .5, fixed=True)]),
                RandomBlock("school", "Identity", [RandomRow("sd(_cons)", .180)])],
        show_header=False,
    )


def ex6_variance() -> Summary:
    """Example 6: estat sd, variance after covariance(custom B)."""
    s = ex6_custom()
    s.show_fixed = False
    s.random = [RandomBlock("district", "Custom",
                            [RandomRow("var(year_c _cons)", .0010852),
                             RandomRow("cov(year_c,_cons)", .0005426)]),
                RandomBlock("school", "Identity", [RandomRow("var(_cons)", .0326401)])]
    s.notes = ["corr(year_c,_cons)=.5 at district level fixed during estimation."]
    return s


def ml_with_se() -> Summary:
    """ML fit with standard errors of the random-effects parameters, a
    boundary estimate, a 90% level and notes."""
    return Summary(
        title="Multilevel ML meta-regression", depvar="stdmdiff", nobs=56,
        groups=[GroupRow("district", 11, 3, 56 / 11, 11),
                GroupRow("district:school", 56, 1, 1.0, 1)],
        wald_chi2=0.5523, wald_df=1, wald_p=0.45737,
        ll_label="Log likelihood", llf=-4.2138377,
        fixed=[FixedRow("year_c", .0095418, .0128399, .7431, .45739, -.0115779, .0306615),
               FixedRow("_cons", .1613204, .0804521, 2.0052, .04494, .0289889, .2936519)],
        Q_M=550.26, Q_M_df=54, Q_M_p=1e-60,
        random=[RandomBlock("district", "Unstructured",
                            [RandomRow("sd(year_c)", .0291746, .0176215, .0089251, .0953671),
                             RandomRow("sd(_cons)", .0702613, .0641178, .0117526, .4200438),
                             RandomRow("corr(year_c,_cons)", 1.0, boundary=True)]),
                RandomBlock("district:school", "Identity",
                            [RandomRow("sd(_cons)", .1785049, .0268393, .1329428, .2396813)])],
        level=90.0,
        notes=["the random-effects covariance at level district is on the boundary "
               "of the parameter space (a correlation of +/-1); standard errors of "
               "parameters at the boundary are not reported.",
               "2 observations with missing values were dropped."],
    )


CASES = {
    "ex1_pupiliq": ex1_pupiliq, "ex1_weeks": ex1_weeks, "ex2_schoolcal": ex2_schoolcal,
    "ex5_slopes": ex5_slopes, "ex6_custom": ex6_custom, "ex6_variance": ex6_variance,
    "ml_with_se": ml_with_se,
}


# --------------------------------------------------------------------------- #
# snapshots
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(CASES))
def test_text_snapshot(name):
    text = CASES[name]().as_text()
    path = SNAPSHOTS / f"{name}.txt"
    if UPDATE:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing snapshot {path}; run with MLMETA_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(CASES))
def test_text_width_and_missing(name):
    text = CASES[name]().as_text()
    assert text.endswith("\n")
    assert max(len(line) for line in text.splitlines()) <= 78
    assert "nan" not in text.lower()
    assert all(line == line.rstrip() for line in text.splitlines())


# --------------------------------------------------------------------------- #
# key substrings against the manual
# --------------------------------------------------------------------------- #
def test_ex2_key_values():
    text = ex2_schoolcal().as_text()
    lines = text.splitlines()
    assert lines[0].startswith("Multilevel REML meta-analysis")
    assert lines[0].endswith("Number of obs     =         56")
    assert "Log restricted-likelihood = -7.9587239" in text
    assert "Test of homogeneity: Q_M = chi2(55) = 578.86" in text
    assert "Prob > Q_M = 0.0000" in text
    hom = next(ln for ln in lines if ln.startswith("Test of homogeneity"))
    assert len(hom) == 78 and hom.endswith("Prob > Q_M = 0.0000")
    assert "Grouping information" in text
    assert "       district |         11          3        5.1         11" in text
    assert "         school |         56          1        1.0          1" in text
    assert "       _cons |   .1847132   .0845559     2.18   0.029     .0189866    .3504397" \
        in text
    assert "district: Identity           |" in text
    assert "                   sd(_cons) |   .2550724" in text
    assert "                   sd(_cons) |   .1809324" in text
    wald = next(ln for ln in lines if "Wald chi2" in ln)
    assert wald.split() == ["Wald", "chi2(0)", "=", "."]
    prob = next(ln for ln in lines if "Prob > chi2" in ln)
    assert prob.endswith("=          .") and prob.index("=", 30) == 66


def test_ex1_one_level_header():
    text = ex1_weeks().as_text()
    lines = text.splitlines()
    assert lines[1].startswith("Group variable: study")
    assert lines[1].endswith("Number of groups  =         19")
    assert any(ln.endswith("min =          1") for ln in lines)
    assert any(ln.endswith("avg =        1.0") for ln in lines)
    assert "Grouping information" not in text
    assert any(ln.endswith("Wald chi2(1)      =       7.51") for ln in lines)
    assert any(ln.endswith("Prob > chi2       =     0.0061") for ln in lines)
    assert "Log restricted-likelihood = -.71388211" in text
    assert "weeks |  -.0157453   .0057447    -2.74   0.006    -.0270046   -.0044859" in text
    assert "var(_cons) |    .011166" in text
    assert "Q_M = chi2(17) = 27.66" in text and "Prob > Q_M = 0.0490" in text


def test_coefficient_table_columns():
    lines = ex5_slopes().as_text().splitlines()
    i = next(k for k, ln in enumerate(lines) if "Coefficient" in ln)
    assert lines[i - 1] == "-" * 78
    assert lines[i] == ("    stdmdiff | Coefficient  Std. err.      z    P>|z|"
                        "     [95% conf. interval]")
    assert lines[i + 1] == "-" * 13 + "+" + "-" * 64
    assert lines[i + 2] == ("      year_c |   .0096021   .0129302     0.74   0.458"
                            "    -.0157407    .0349448")
    assert lines[i + 3] == ("       _cons |   .1609612    .082311     1.96   0.051"
                            "    -.0003654    .3222879")
    assert lines[i + 4] == "-" * 78
    assert lines[i + 5].startswith("Test of homogeneity: Q_M = chi2(54) = 550.26")
    assert all(lines[k][13] == "|" for k in (i, i + 2, i + 3))


def test_random_table_blocks():
    text = ex5_slopes().as_text()
    assert "district: Independent        |" in text
    assert "                  sd(year_c) |   .0335302" in text
    assert "                   sd(_cons) |     .06437" in text
    assert "school: Identity             |" in text


def test_fixed_marker_and_footnote():
    text = ex6_custom().as_text()
    assert "          corr(year_c,_cons) |         .5*" in text
    assert text.rstrip().endswith("(*) fixed during estimation")
    assert "Number of obs" not in text and "Log restricted" not in text
    assert "(*) fixed" not in ex5_slopes().as_text()


def test_boundary_marker_and_se_columns():
    text = ml_with_se().as_text()
    assert "Random-effects parameters  |   Estimate   Std. err.     [90% conf. interval]" \
        in text
    assert "P>|z|     [90% conf. interval]" in text
    assert "          corr(year_c,_cons) |          1(b)" in text
    assert "(b) on the boundary of the parameter space" in text
    assert "district:school: Identity    |" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("                  sd(year_c)"))
    assert row.split("|")[1].split() == [".0291746", ".0176215", ".0089251", ".0953671"]
    assert "Log likelihood = -4.2138377" in text


def test_level_changes_ci_header():
    s = ex2_schoolcal()
    s.level = 99
    assert "[99% conf. interval]" in s.as_text()
    s.level = 99.5
    text = s.as_text()
    assert "[99.5% conf. interval]" in text
    assert max(map(len, text.splitlines())) == 78


def test_notes_wrapped():
    text = ml_with_se().as_text()
    lines = text.splitlines()
    k = next(i for i, ln in enumerate(lines) if ln.startswith("Note: the random-effects"))
    assert lines[k + 1].startswith("      ") and len(lines[k]) <= 78
    assert lines[-1] == "Note: 2 observations with missing values were dropped."


# --------------------------------------------------------------------------- #
# show_* switches
# --------------------------------------------------------------------------- #
def test_show_switches():
    full = ex2_schoolcal()
    for flag, gone in [("show_header", ["Number of obs", "Grouping information",
                                        "Log restricted-likelihood", "Wald chi2"]),
                       ("show_groups", ["Grouping information", "Observations per group"]),
                       ("show_fixed", ["Coefficient", ".1847132"]),
                       ("show_random", ["Random-effects parameters", ".2550724"]),
                       ("show_homtest", ["Test of homogeneity", "Q_M"])]:
        s = ex2_schoolcal()
        setattr(s, flag, False)
        text, page = s.as_text(), s.as_html()
        for g in gone:
            assert g in full.as_text()
            assert g not in text, (flag, g)
            assert g not in page, (flag, g)
    s = ex2_schoolcal()
    s.show_groups = False
    assert "Number of obs" in s.as_text() and "Log restricted-likelihood" in s.as_text()
    s = ex1_pupiliq()
    s.show_groups = False
    assert "Group variable" not in s.as_text() and "Obs per group" not in s.as_text()


def test_noheader_nofetable_like_manual():
    s = ex1_weeks()
    s.show_header = s.show_fixed = False
    lines = s.as_text().splitlines()
    assert lines[0] == ("Test of homogeneity: Q_M = chi2(17) = 27.66"
                        "                Prob > Q_M = 0.0490")
    assert lines[1] == ""
    assert "Random-effects parameters" in lines[3]


def test_everything_off_gives_empty_text():
    s = ex2_schoolcal()
    s.show_header = s.show_fixed = s.show_random = s.show_homtest = False
    assert s.as_text() == ""


# --------------------------------------------------------------------------- #
# missing values
# --------------------------------------------------------------------------- #
def test_missing_values_print_as_dot():
    s = Summary(
        title="Multilevel ML meta-regression", depvar="y", nobs=10,
        groups=[GroupRow("g", 5, 2, NAN, 2)],
        wald_chi2=NAN, wald_df=1, wald_p=None,
        ll_label="Log likelihood", llf=NAN,
        fixed=[FixedRow("x", 1.5, NAN, NAN, NAN, NAN, NAN)],
        Q_M=None, Q_M_df=8, Q_M_p=NAN,
        random=[RandomBlock("g", "Identity",
                            [RandomRow("sd(_cons)", NAN, se=float("inf"), lo=NAN, hi=NAN)])],
    )
    text = s.as_text()
    assert "nan" not in text.lower() and "inf" not in text.lower()
    assert "Log likelihood = ." in text
    assert "Q_M = chi2(8) = ." in text and "Prob > Q_M = ." in text
    assert any(ln.endswith("Wald chi2(1)      =          .") for ln in text.splitlines())
    assert "avg =          ." in text
    row = next(ln for ln in text.splitlines() if ln.lstrip().startswith("x |"))
    assert row.split("|")[1].split() == ["1.5", ".", ".", ".", ".", "."]
    assert "nan" not in s.as_html().lower()


def test_re_estimate_without_se_leaves_blanks():
    s = ml_with_se()
    row = next(ln for ln in s.as_text().splitlines() if "corr(year_c,_cons)" in ln)
    assert row.endswith("1(b)")


# --------------------------------------------------------------------------- #
# number and name formatting
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("x, width, expected", [
    (0.0836939, 9, ".0836939"),
    (0.08369391234, 9, ".0836939"),
    (-0.0157453, 9, "-.0157453"),
    (0.1941769, 9, ".1941769"),
    (0.19417694, 9, ".1941769"),
    (-7.9587239, 10, "-7.9587239"),
    (-7.95872391, 10, "-7.9587239"),
    (-0.71388211, 10, "-.71388211"),
    (-0.7138821149, 10, "-.71388211"),
    (-2611.7483, 10, "-2611.7483"),
    (578.86, 10, "578.86"),
    (578.86, 9, "578.86"),
    (0.011166, 9, ".011166"),
    (0.06437, 9, ".06437"),
    (0.5, 9, ".5"),
    (1.0, 9, "1"),
    (56.0, 9, "56"),
    (0.0, 9, "0"),
    (-0.0, 9, "0"),
    (11253.06, 9, "11253.06"),
    (-238.8943, 9, "-238.8943"),
    (1170.8134, 9, "1170.813"),
    (1234567.891, 9, "1234568"),
    (12345678.0, 9, "12345678"),
    (123456789.0, 9, "1.23e+08"),
    (-123456789.0, 9, "-1.23e+08"),
    (123456789.0, 10, "123456789"),
    (1.23456789e12, 10, "1.235e+12"),
    (0.0000325, 9, ".0000325"),
    (0.00000325, 9, "3.25e-06"),
    (1e-9, 9, "1.00e-09"),
    (-4.19e-11, 9, "-4.19e-11"),
    (1e-9, 10, "1.000e-09"),
    (1e-120, 9, "1.0e-120"),
    (0.99999999, 9, "1"),
    (9.99999999, 9, "10"),
    (99999999.6, 9, "1.00e+08"),
])
def test_fmt_g(x, width, expected):
    assert fmt_g(x, width) == expected


def test_fmt_g_fits_width_and_round_trips():
    for e in range(-15, 16):
        for m in (1.0, 1.2345678901, 4.999999999, 9.87654321, 9.9999999999):
            for sgn in (1, -1):
                x = sgn * m * 10.0 ** e
                for width in (9, 10):
                    s = fmt_g(x, width)
                    assert len(s) <= width, (x, s)
                    assert math.isclose(float(s), x, rel_tol=5e-3), (x, s)


def test_fmt_g_missing_and_sig():
    for v in (None, NAN, float("inf"), -float("inf")):
        assert fmt_g(v) == "."
        assert fmt_f(v, 2) == "."
    assert fmt_g(3.14159265, 10, sig=3) == "3.14"
    assert fmt_f(578.857, 2) == "578.86" and fmt_f(3e-66, 4) == "0.0000"


def test_abbrev():
    assert abbrev("school_effect", 12) == "school_eff~t"
    assert abbrev("stdmdiff", 12) == "stdmdiff"
    assert abbrev("a" * 12, 12) == "a" * 12
    s = ex2_schoolcal()
    s.depvar = "standardized_difference"
    s.fixed[0].name = "year_centered_1990"
    text = s.as_text()
    assert "\nstandardiz~e | Coefficient" in text
    assert "\nyear_cente~0 |" in text
    s.random[0].rows[0].label = "sd(a_very_long_moderator_name_here)"
    assert "sd(a_very_long_moderator~e) |" in s.as_text()


# --------------------------------------------------------------------------- #
# HTML
# --------------------------------------------------------------------------- #
class _Checker(HTMLParser):
    VOID = {"br", "hr", "img", "meta", "link", "input", "col"}

    def __init__(self):
        super().__init__()
        self.stack, self.tables, self.data, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        self.stack.append(tag)
        if tag == "table":
            self.tables.append(dict(attrs).get("class"))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.data.append(data)


def _parse(page: str) -> _Checker:
    p = _Checker()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors
    assert not p.stack, p.stack
    return p


@pytest.mark.parametrize("name", sorted(CASES))
def test_html_well_formed(name):
    s = CASES[name]()
    page = s.as_html()
    assert page == s._repr_html_()
    assert page.startswith('<div class="mlmeta-summary">') and page.endswith("</div>")
    _parse(page)


def test_html_contents():
    s = ex2_schoolcal()
    p = _parse(s.as_html())
    assert p.tables == ["mlmeta-header", "mlmeta-groups", "mlmeta-fixed",
                        "mlmeta-homtest", "mlmeta-random"]
    cells = [d.strip() for d in p.data if d.strip()]
    for v in ["Multilevel REML meta-analysis", "56", "district", "5.1",
              "-7.9587239", ".1847132", ".0845559", "2.18", "0.029", ".0189866",
              ".3504397", "Q_M = chi2(55) = 578.86", "Prob > Q_M = 0.0000",
              "district: Identity", ".2550724", ".1809324", "[95% conf. interval]",
              "P>|z|"]:
        assert v in cells, v


def test_html_escapes_and_markers():
    s = ml_with_se()
    s.depvar = "y<&>"
    s.notes.append("<script>alert(1)</script>")
    page = s.as_html()
    assert "y&lt;&amp;&gt;" in page and "<script>" not in page
    p = _parse(page)
    cells = [d.strip() for d in p.data if d.strip()]
    assert "1(b)" in cells and "[90% conf. interval]" in cells
    assert "(b) on the boundary of the parameter space" in cells
    assert "district:school: Identity" in cells
    page6 = ex6_custom().as_html()
    assert ".5*" in page6 and "(*) fixed during estimation" in page6
    assert 'class="mlmeta-header"' not in page6


def test_str_is_text():
    s = ex1_pupiliq()
    assert str(s) == s.as_text()
