"""What cluster-robust inference returns: :class:`RobustResults` (the coefficient table
on the robust covariance, its tests and its printed summary) and :class:`WaldTestResult`
(a test of linear constraints ``C beta = c0``), built by :func:`mlmeta.robust.robust`
and :func:`mlmeta.robust.cluster_robust`.

Tests: t on each coefficient's df (Satterthwaite, J - 1, J - p or normal, see
:mod:`mlmeta.robust`), and for q constraints the Wald statistic
``Q_W = (C beta - c0)' (C V_CR C')^-1 (C beta - c0)`` as HTZ
``F = (nu - q + 1) / (nu q) Q_W`` on (q, nu - q + 1) df, naive ``F = Q_W / q`` on (q, J - 1)
or (q, J - p) df, or chi2 on q df. The degrees of freedom come from the per-cluster
pieces the estimator keeps (``pieces.nu(C)``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta.constraints import linear_hypotheses
from mlmeta.summary import Display, Table, TextDisplay, confidence_level, fmt_f, t_table

__all__ = ["RobustResults", "RobustSummary", "WaldTestResult", "constraint_matrix", "TEST_OF_DF"]

# the Wald test that goes with each df method
TEST_OF_DF = {"satterthwaite": "HTZ", "naive-t": "naive-F", "naive-tp": "naive-Fp", "z": "chi2"}


class WaldTestResult(Display):
    """A Wald test of ``C beta = c0`` with a cluster-robust covariance.

    Prints (and shows at the REPL) as the hypotheses and the test; ``as_html()``,
    ``as_markdown()`` and ``as_latex()`` render the same tables.

    Attributes
    ----------
    test : str
        "HTZ", "chi2", "naive-F" or "naive-Fp".
    statistic : float
        The F statistic (Q_W / q for chi2).
    df_num, df_denom : float
        Numerator and denominator df.
    pvalue : float
        p-value.
    Q : float
        The Wald quadratic form ``Q_W = (C beta - c0)' (C V_CR C')^-1 (C beta - c0)``.
    delta : float
        HTZ scaling ``(nu - q + 1) / nu``.
    constraints : list of str
        The constraints tested.
    dropped : list of str
        Constraints implied by the model's fixed-effect constraints (left out).

    Examples
    --------
    >>> import mlmeta
    >>> dat = mlmeta.datasets.load("berkey")
    >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
    >>> rob = res.robust(cluster="trial", type="CR2")
    >>> w = rob.wald_test("outcome[AL] = 0, outcome[PD] = 0")
    >>> print(f"{w.test}: F({w.df_num}, {w.df_denom:.2f}) = {w.statistic:.2f}, p = {w.pvalue:.4f}")
    HTZ: F(2, 2.62) = 48.39, p = 0.0085
    """

    def __init__(self, test, statistic, df_num, df_denom, pvalue, Q, delta, constraints, dropped=()):
        self.test, self.statistic, self.df_num, self.df_denom = test, statistic, df_num, df_denom
        self.pvalue, self.Q, self.delta, self.constraints = pvalue, Q, delta, constraints
        self.dropped = list(dropped)

    def to_dict(self):
        return {k: getattr(self, k) for k in ("test", "statistic", "df_num", "df_denom", "pvalue",
                                              "Q", "delta")}

    def _stats(self) -> list[tuple[str, str]]:
        if self.test == "chi2":
            return [(f"chi2({self.df_num})", fmt_f(self.Q, 2)), ("Prob > chi2", fmt_f(self.pvalue, 4))]
        dd = "inf" if not np.isfinite(self.df_denom) else f"{self.df_denom:.4g}"
        return [(f"F({self.df_num}, {dd})", fmt_f(self.statistic, 2)), ("Prob > F", fmt_f(self.pvalue, 4))]

    def as_text(self) -> str:
        lines = [f"Wald test ({self.test}) of:"]
        lines += [f" ({i:2d})  {c}" for i, c in enumerate(self.constraints, start=1)]
        lines += [""] + [f"{lab:>20} = {val:>8}" for lab, val in self._stats()]
        return "\n".join(lines) + "\n"

    def tables(self) -> list[Table]:
        rows = [[f"({i})", c] for i, c in enumerate(self.constraints, start=1)]
        return [Table(["", "Hypothesis"], rows, f"Wald test ({self.test})"),
                Table(["", ""], [list(r) for r in self._stats()])]

def _describe(row, val, names):
    terms = [(("-" if c < 0 else "+"), ("" if abs(c) == 1 else f"{abs(c):g}*") + nm)
             for c, nm in zip(row, names) if c != 0]
    text = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    return text + "".join(f" {sg} {t}" for sg, t in terms[1:]) + f" = {val:g}"

def constraint_matrix(spec, names, value=None):
    """(C, c0, labels) for ``C beta = c0`` from ``"x1 = 0, x2 = x3"`` (formulaic's
    constraint syntax), a list of such strings or of names (each = 0), or a q x p array
    (null values ``value``, default 0)."""
    names = list(names)
    C, c0 = linear_hypotheses(spec, names, value, what="constraints")
    if np.linalg.matrix_rank(C) < C.shape[0]:
        raise ValueError("the constraints are linearly dependent")
    return C, c0, [_describe(row, val, names) for row, val in zip(C, c0)]

class RobustResults:
    """Cluster-robust inference for the coefficients of a fitted model.

    Attributes
    ----------
    params, bse, df, tvalues, pvalues : pandas.Series over the coefficients
        (``bse`` from the robust covariance; ``df`` per coefficient).
    type : small-sample correction (CR0, CR1, CR1p, CR1S, CR2, CR3).
    df_method : "satterthwaite", "naive-t" (J - 1), "naive-tp" (J - p) or "z".
    n_clusters, nobs, n_fe, cluster_name, cluster_sizes.
    description : e.g. "Cluster-robust CR2 (clubSandwich) standard errors, Satterthwaite df".

    Examples
    --------
    >>> import mlmeta
    >>> dat = mlmeta.datasets.load("berkey")
    >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
    >>> rob = res.robust(cluster="trial", type="CR2")
    >>> rob
    <RobustResults CR2 J=5 n=10 df=satterthwaite>
    >>> rob.conf_int().round(4)
                  lower   upper
    outcome[AL] -0.5771 -0.0737
    outcome[PD]  0.1919  0.4972
    """

    def __init__(self, params, names, vcov, pieces, *, type, df, n_clusters, nobs,
                 cluster_name=None, label=None, cluster_sizes=None, A=None):
        self.fe_names = list(names)
        self.params = pd.Series(params, index=self.fe_names, name="coef")
        self._A = np.eye(len(self.fe_names)) if A is None else np.asarray(A, dtype=float)
        self._vcov = self._A @ vcov @ self._A.T
        self._pieces = pieces
        self.type, self.df_method = type, df
        self.n_clusters, self.nobs, self.n_fe = int(n_clusters), int(nobs), int(vcov.shape[0])
        self.cluster_name, self.label, self.cluster_sizes = cluster_name, label, cluster_sizes
        self.bse = pd.Series(np.sqrt(np.maximum(np.diag(self._vcov), 0)), index=self.fe_names,
                             name="robust se")
        J, p = self.n_clusters, self.n_fe
        free = np.any(self._A != 0, axis=1)
        if df == "satterthwaite":
            vals = [pieces.nu(row) if f else np.nan for row, f in zip(self._A, free)]
        else:
            vals = np.where(free, {"naive-t": J - 1, "naive-tp": J - p, "z": np.inf}[df], np.nan)
        self.df = pd.Series(np.asarray(vals, dtype=float), index=self.fe_names, name="df")
        with np.errstate(divide="ignore", invalid="ignore"):
            self.tvalues = pd.Series(np.where(free, self.params / self.bse, np.nan), index=self.fe_names,
                                     name="t")
        self.pvalues = pd.Series(2 * _dist.t_sf(np.abs(self.tvalues), self.df), index=self.fe_names,
                                 name="P>|t|")

    def cov_params(self) -> pd.DataFrame:
        """The cluster-robust covariance matrix of the coefficients, ``V_CR``.

        Returns
        -------
        pandas.DataFrame
        """
        return pd.DataFrame(self._vcov, index=self.fe_names, columns=self.fe_names)

    def conf_int(self, level: float = 95.0, *, alpha=None) -> pd.DataFrame:
        """Confidence intervals ``beta -+ t_df se`` with each coefficient's df.

        Parameters
        ----------
        level : float
            Confidence level in percent.
        alpha : float, optional
            ``1 - level / 100``, as statsmodels spells it.

        Returns
        -------
        pandas.DataFrame
            Columns ``lower`` and ``upper``.
        """
        crit = _dist.t_ppf(0.5 + confidence_level(level, alpha) / 200.0, self.df)
        return pd.DataFrame({"lower": self.params - crit * self.bse, "upper": self.params + crit * self.bse})

    def wald_test(self, R, value=None, test=None):
        """Test linear constraints ``R beta = value`` with the robust covariance.

        ``R``: a string such as ``"x1 = 0, x2 = 0"`` or ``"x1 = x2"``, a list of
        coefficient names (each = 0), or a q x p array (with ``value``, default 0).
        ``test``: "HTZ" (Hotelling-T^2 approximation, clubSandwich's default),
        "chi2" (Q_W ~ chi2(q)), "naive-F" (Q_W / q ~ F(q, J - 1)) or "naive-Fp"
        (F(q, J - p), metafor's robust() omnibus test); a list gives a DataFrame.
        None (default): the test that goes with the results' df method, as in the
        summary -- HTZ for Satterthwaite df, naive-F for J - 1, naive-Fp for J - p
        (so metafor's F test after ``type="CR1p"``), chi2 for "z".

        Parameters
        ----------
        R : str, list of str or array-like
            Constraints.
        value : array-like, optional
            Right-hand sides when ``R`` is a matrix (default 0).
        test : str or list of str, optional
            The test(s).

        Returns
        -------
        WaldTestResult or pandas.DataFrame
            One test, or one row per test when ``test`` is a list.

        Raises
        ------
        ValueError
            For malformed or linearly dependent constraints or an unknown test.

        Examples
        --------
        >>> import mlmeta
        >>> dat = mlmeta.datasets.load("berkey")
        >>> res = mlmeta.meregress("yi ~ 0 + outcome + (0 + outcome | trial)", dat, variance="vi")
        >>> rob = res.robust(cluster="trial", type="CR1p")          # metafor's robust()
        >>> w = rob.wald_test("outcome[AL] = outcome[PD]")
        >>> print(f"{w.test}: F({w.df_num}, {w.df_denom:.0f}) = {w.statistic:.2f}")
        naive-Fp: F(1, 3) = 71.68
        """
        if test is None:
            test = TEST_OF_DF[self.df_method]
        if not isinstance(test, str):
            return pd.DataFrame([self.wald_test(R, value, t).to_dict() for t in test])
        C, c0, labels = constraint_matrix(R, self.fe_names, value)
        keep = []                     # drop constraints implied by the model's own (Stata's rule)
        for i in range(C.shape[0]):
            if np.linalg.matrix_rank(C[keep + [i]] @ self._A) == len(keep) + 1:
                keep.append(i)
        if not keep:
            raise ValueError("the constraints only involve coefficients that the model's own constraints fix")
        dropped = [lab for i, lab in enumerate(labels) if i not in keep]
        C, c0, labels = C[keep], c0[keep], [labels[i] for i in keep]
        q, J, p = C.shape[0], self.n_clusters, self.n_fe
        d = C @ self.params.to_numpy() - c0
        Q = float(d @ np.linalg.solve(C @ self._vcov @ C.T, d))
        t = test.lower()
        if t == "htz":
            nu = self._pieces.nu(C @ self._A)
            delta, df2 = max((nu - q + 1) / nu, 0.0), nu - q + 1
            F = delta * Q / q
            pv = float(_dist.f_sf(F, q, df2)) if df2 > 0 else np.nan
            return WaldTestResult("HTZ", F, q, df2, pv, Q, delta, labels, dropped)
        if t == "chi2":
            pv = float(_dist.chi2_sf(Q, q))
            return WaldTestResult("chi2", Q / q, q, np.inf, pv, Q, 1.0, labels, dropped)
        if t in ("naive-f", "naive-fp"):
            df2 = J - 1 if t == "naive-f" else J - p
            name = "naive-F" if t == "naive-f" else "naive-Fp"
            return WaldTestResult(name, Q / q, q, df2, float(_dist.f_sf(Q / q, q, df2)), Q, 1.0, labels,
                                  dropped)
        raise ValueError(f"test must be 'HTZ', 'chi2', 'naive-F' or 'naive-Fp', got {test!r}")

    @property
    def description(self) -> str:
        """What was computed. metafor and Stata are named only where the whole
        procedure is theirs: CR1p with J - p df (and the F(q, J - p) omnibus test) is
        metafor's ``robust()``, CR1S with J - 1 df (and F(q, J - 1)) Stata's
        ``regress, vce(cluster)``; with other df only the factor is given."""
        cr1p = "CR1p (metafor's robust(), J/(J-p))" if self.df_method == "naive-tp" else "CR1p (J/(J-p))"
        cr1s = ("CR1S (Stata's regress, J(N-1)/((J-1)(N-p)))" if self.df_method == "naive-t"
                else "CR1S (J(N-1)/((J-1)(N-p)))")
        kind = {"CR1": "CR1 (clubSandwich's J/(J-1))", "CR1p": cr1p, "CR1S": cr1s,
                "CR2": "CR2 (clubSandwich)", "CR3": "CR3 (approximate jackknife)"}.get(self.type, self.type)
        J, p = self.n_clusters, self.n_fe
        dft = {"satterthwaite": "Satterthwaite df", "naive-t": f"df = J - 1 = {J - 1}",
               "naive-tp": f"df = J - p = {J - p}", "z": "normal reference"}[self.df_method]
        return f"Cluster-robust {kind} standard errors, {dft}"

    @property
    def _omnibus(self):
        idx = [nm for nm in self.fe_names if nm != "_cons"]
        if not idx:
            return None
        return self.wald_test(idx, test=TEST_OF_DF[self.df_method])

    def summary(self, level: float = 95.0) -> RobustSummary:
        """Coefficient table with robust SEs, df, t tests and confidence intervals, and
        the omnibus Wald test of the moderators.

        Parameters
        ----------
        level : float
            Confidence level in percent.

        Returns
        -------
        RobustSummary
            A str (print it) with HTML for notebooks.
        """
        w = 78
        head = "Cluster-robust inference" + (f": {self.label}" if self.label else "")
        clus = f"Clusters ({self.cluster_name})" if self.cluster_name else "Clusters"
        items = [("Number of obs", f"{self.nobs:>9,}"), (clus[:17], f"{self.n_clusters:>9,}")]
        if self.cluster_sizes is not None:
            sz = self.cluster_sizes
            items.append(("Obs per cluster", f"{int(sz.min())}/{sz.mean():.1f}/{int(sz.max())}"))
        lines = [f"{head if i == 0 else '':<48}{lab:<18}= {val}" for i, (lab, val) in enumerate(items)]
        table = t_table(self.fe_names, self.params, self.bse, self.tvalues, self.df, self.pvalues,
                        self.conf_int(level), level)
        rule = "-" * table.width(w)
        lines += [rule] + table.text_lines("", w) + [rule]
        notes = []
        om = self._omnibus
        if om is not None:
            dd = "inf" if not np.isfinite(om.df_denom) else f"{om.df_denom:.2f}"
            notes.append(f"Wald test ({om.test}) of all coefficients but _cons: F({om.df_num}, {dd}) = "
                         f"{om.statistic:.2f}, Prob > F = {om.pvalue:.4f}")
        notes.append(self.description + ".")
        header = Table(["", ""], [[lab, val.strip()] for lab, val in items], head)
        return RobustSummary("\n".join(lines + notes), [header, table.table("", "Coefficients", notes)])

    def __repr__(self):
        return f"<RobustResults {self.type} J={self.n_clusters} n={self.nobs} df={self.df_method}>"

class RobustSummary(TextDisplay):
    """The rendered table: a str (print it; the REPL shows the table), with ``as_text()``,
    HTML tables for notebooks, ``as_markdown()`` and ``as_latex()``."""
