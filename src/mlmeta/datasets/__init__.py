"""Example datasets bundled with mlmeta.

>>> from mlmeta import datasets
>>> datasets.names()
['berkey', 'pupiliq', 'schoolcal']
>>> df = datasets.load("schoolcal")
>>> df.shape
(56, 8)

Each dataset also has a function of its own name (``datasets.schoolcal()``)
whose docstring gives the source, the citation and the variables;
``datasets.describe(name)`` returns that text.
"""

from __future__ import annotations

import inspect
from importlib.resources import files

import pandas as pd

__all__ = ["load", "names", "describe", "pupiliq", "schoolcal", "berkey"]


def pupiliq() -> pd.DataFrame:
    """Effects of teacher expectancy on pupil IQ (19 experiments).

    Source: R package metadat, ``dat.raudenbush1985``; the same data as Stata's
    ``pupiliq.dta``, with Stata's variable names.

    Citations:

    * Raudenbush, S. W. (1984). Magnitude of teacher expectancy effects on
      pupil IQ as a function of the credibility of expectancy induction: A
      synthesis of findings from 18 experiments. Journal of Educational
      Psychology, 76(1), 85-97.
    * Raudenbush, S. W., & Bryk, A. S. (1985). Empirical Bayes meta-analysis.
      Journal of Educational Statistics, 10(2), 75-98.

    Variables (19 rows)::

        study     study id, 1..19 (int)
        author    study author(s)
        year      publication year (int)
        weeks     weeks of teacher-student contact before the expectancy
                  induction (int)
        setting   "group" or "indiv": how the IQ test was administered
        tester    "aware" or "blind": whether the tester knew of the induction
        nexper    size of the experimental group (int)
        ncontrol  size of the control group (int)
        stdmdiff  standardized mean difference in IQ, experimental - control
        se        standard error of stdmdiff, as published (3 decimals)
        var       sampling variance of stdmdiff, se**2

    ``se`` carries the published three-decimal standard errors, as Stata's
    pupiliq.dta does, and reproduces the Stata manual's printed results
    (``meta summarize``: theta .0836939, tau2 .0188289; ``meta regress weeks``:
    slope -.0157453). metadat's ``vi`` column is ``var`` rounded to four
    decimals.

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> from mlmeta import datasets
    >>> df = datasets.pupiliq()
    >>> df.shape
    (19, 11)
    >>> print(f"{df['stdmdiff'].mean():.4f}")
    0.1637
    """
    return load("pupiliq")


def schoolcal() -> pd.DataFrame:
    """Effect of modified school calendars on student achievement.

    56 studies (schools) in 11 school districts; schools are nested in
    districts.

    Source: R package metadat, ``dat.konstantopoulos2011``; the same data as
    Stata's ``schoolcal.dta``, with Stata's variable names.

    Citations:

    * Cooper, H., Valentine, J. C., Charlton, K., & Melson, A. (2003). The
      effects of modified school calendars on student achievement and on
      school and community attitudes. Review of Educational Research, 73(1),
      1-52.
    * Konstantopoulos, S. (2011). Fixed effects and variance components
      estimation in three-level meta-analysis. Research Synthesis Methods,
      2(1), 61-76.

    Variables (56 rows)::

        district  district id (int; 11 districts)
        school    school id within its district (int; ids repeat across
                  districts, so a school is identified by district:school)
        study     study id, 1..56 (int)
        stdmdiff  standardized mean difference in achievement, modified -
                  traditional calendar
        var       sampling variance of stdmdiff
        se        standard error of stdmdiff, sqrt(var)
        year      year of the study (int)
        year_c    year - 1990 (int)

    The three-level model ``stdmdiff ~ 1 + (1 | district) + (1 | district:school)``
    fitted by REML gives _cons .1847132 (SE .0845559), sd .2550724 and
    .1809324, log restricted-likelihood -7.95872 (Stata manual, example 2).

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> from mlmeta import datasets
    >>> df = datasets.schoolcal()
    >>> df.groupby("district").size().head(3)
    district
    11    4
    12    4
    18    3
    dtype: int64
    """
    return load("schoolcal")


def berkey() -> pd.DataFrame:
    """Surgical versus non-surgical periodontal treatment: two outcomes per trial.

    Five trials, each reporting two correlated outcomes, probing depth (PD)
    and attachment level (AL); the sampling errors of the two outcomes of a
    trial are correlated (known 2x2 covariance matrix per trial).

    Source: R package metadat, ``dat.berkey1998`` (same variable names).

    Citation:

    * Berkey, C. S., Hoaglin, D. C., Antczak-Bouckoms, A., Mosteller, F., &
      Colditz, G. A. (1998). Meta-analysis of multiple outcomes by regression
      with random effects. Statistics in Medicine, 17(22), 2537-2550.

    Variables (10 rows, two per trial, PD first)::

        trial    trial id, 1..5 (int)
        author   trial author(s)
        year     publication year (int)
        ni       number of patients (int)
        outcome  "PD" (probing depth) or "AL" (attachment level)
        yi       observed mean difference, surgical - non-surgical (mm)
        vi       sampling variance of yi
        v1i      sampling covariance of yi with the trial's PD estimate
        v2i      sampling covariance of yi with the trial's AL estimate

    Within a trial the rows ``[v1i, v2i]`` form the 2x2 sampling covariance
    matrix of (PD, AL).

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> from mlmeta import datasets
    >>> df = datasets.berkey()
    >>> df.loc[df.trial == 1, ["outcome", "yi", "v1i", "v2i"]]
      outcome    yi     v1i     v2i
    0      PD  0.47  0.0075  0.0030
    1      AL -0.32  0.0030  0.0077
    """
    return load("berkey")


_LOADERS = {"berkey": berkey, "pupiliq": pupiliq, "schoolcal": schoolcal}


def names() -> list[str]:
    """Names of the bundled datasets, sorted.

    Returns
    -------
    list of str

    Examples
    --------
    >>> from mlmeta import datasets
    >>> datasets.names()
    ['berkey', 'pupiliq', 'schoolcal']
    """
    return sorted(_LOADERS)


def _check(name: str) -> str:
    if name not in _LOADERS:
        raise ValueError(
            f"unknown dataset {name!r}; available datasets: {', '.join(names())}")
    return name


def load(name: str) -> pd.DataFrame:
    """Load a bundled dataset as a new pandas DataFrame.

    Parameters
    ----------
    name : str
        One of :func:`names` (``"pupiliq"``, ``"schoolcal"``, ``"berkey"``).

    Returns
    -------
    pandas.DataFrame
        Integer-valued columns are int64, text columns strings (pandas' default
        text dtype), the rest float64.

    Raises
    ------
    ValueError
        If ``name`` is not a bundled dataset; the message lists the available ones.

    Examples
    --------
    >>> from mlmeta import datasets
    >>> datasets.load("schoolcal").columns.tolist()
    ['district', 'school', 'study', 'stdmdiff', 'var', 'se', 'year', 'year_c']
    """
    _check(name)
    with files("mlmeta.datasets").joinpath(f"{name}.csv").open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


def describe(name: str) -> str:
    """Source, citation and variables of a bundled dataset.

    Parameters
    ----------
    name : str
        One of :func:`names`.

    Returns
    -------
    str
        The docstring of the dataset's loader.

    Raises
    ------
    ValueError
        If ``name`` is not a bundled dataset.

    Examples
    --------
    >>> from mlmeta import datasets
    >>> print(datasets.describe("berkey").splitlines()[0])
    Surgical versus non-surgical periodontal treatment: two outcomes per trial.
    """
    return inspect.getdoc(_LOADERS[_check(name)])
