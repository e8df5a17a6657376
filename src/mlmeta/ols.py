"""Ordinary least squares with classical or cluster-robust standard errors.

For y = X beta + e over N rows and p coefficients:

    beta = (X'X)^-1 X'y,   r = y - X beta,   s^2 = r'r / (N - p)

Classical:       Var(beta) = s^2 (X'X)^-1,  t tests on N - p df.
Cluster-robust:  Var(beta) = c (X'X)^-1 (sum_j X_j' A_j r_j r_j' A_j' X_j) (X'X)^-1
over J clusters, with the small-sample corrections of :mod:`mlmeta.robust` and
working model I (sandwich's ``vcovCL`` and clubSandwich's ``vcovCR(lm, cluster, type)``):

    CR0  c = 1                         CR1   c = J / (J - 1)         (clubSandwich CR1)
    CR1p c = J / (J - p)               CR1S  c = J (N - 1) / ((J - 1)(N - p))
                                                (Stata; sandwich::vcovCL type "HC1")
    CR2  A_j = (I - X_j (X'X)^-1 X_j')^-1/2   (Bell-McCaffrey / Pustejovsky-Tipton)
    CR3  A_j = (I - X_j (X'X)^-1 X_j')^-1

Degrees of freedom of the t tests (``df=``): ``"naive-tp"`` J - p (the convention of
pymer4's ``Lm(robust="cluster")``; default except for CR2), ``"satterthwaite"``
(clubSandwich's ``coef_test(test = "Satterthwaite")``; default for CR2),
``"naive-t"`` J - 1, ``"z"`` normal, or a number.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from scipy import linalg

from mlmeta import _dist
from mlmeta._errors import MissingDataWarning, warn
from mlmeta.formula import build_model_frame, parse_formula
from mlmeta.summary import Table, TextDisplay, confidence_level, fmt_f, fmt_g, t_table

__all__ = ["ols", "OLSResults", "LinearResults", "TextSummary"]

_WIDTH = 78


class TextSummary(TextDisplay):
    """A rendered table: a str (print it; the REPL shows the table), with ``as_text()``,
    HTML tables for notebooks, ``as_markdown()`` and ``as_latex()``."""


class LinearResults:
    """Coefficients with a covariance matrix and t reference distributions.

    Attributes
    ----------
    params, bse, tvalues, pvalues, df : pandas.Series over the coefficients
        (``df`` per coefficient; ``inf`` for normal-reference tests).
    nobs : rows used.  fe_names : coefficient names (``_cons`` = intercept).
    """

    _title = "Linear model"

    def __init__(self, params, cov, names, df, nobs, depvar=None):
        self.fe_names = list(names)
        p = len(self.fe_names)
        cov = np.asarray(cov, dtype=float).reshape(p, p)
        self._cov = 0.5 * (cov + cov.T)
        self.params = pd.Series(np.asarray(params, dtype=float), index=self.fe_names, name="coef")
        self.bse = pd.Series(np.sqrt(np.clip(np.diag(self._cov), 0.0, None)), index=self.fe_names,
                             name="std err")
        self.df = pd.Series(np.broadcast_to(np.asarray(df, dtype=float), (p,)).copy(),
                            index=self.fe_names, name="df")
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(self.bse > 0, self.params / self.bse.where(self.bse > 0, 1.0), np.nan)
        self.tvalues = pd.Series(t, index=self.fe_names, name="t")
        self.pvalues = pd.Series(2 * _dist.t_sf(np.abs(t), self.df), index=self.fe_names, name="P>|t|")
        self.nobs = int(nobs)
        self.depvar = depvar

    @property
    def n_fe(self) -> int:
        return len(self.fe_names)

    def cov_params(self) -> pd.DataFrame:
        """The covariance matrix of the coefficients."""
        return pd.DataFrame(self._cov, index=self.fe_names, columns=self.fe_names)

    def conf_int(self, level: float = 95.0, *, alpha=None) -> pd.DataFrame:
        """beta -+ t_{df} se at ``level`` percent, each coefficient on its own df
        (``alpha=`` as in statsmodels)."""
        crit = _dist.t_ppf(0.5 + confidence_level(level, alpha) / 200.0, self.df)
        return pd.DataFrame({"lower": self.params - crit * self.bse,
                             "upper": self.params + crit * self.bse})

    def _header_items(self) -> list:
        """(label, value) of the header's right-hand column, values padded as printed."""
        return [("Number of obs", f"{self.nobs:>9,}")]

    def _header(self) -> list:
        return [f"{self._title if i == 0 else '':<48}{lab[:17]:<18}= {val}"
                for i, (lab, val) in enumerate(self._header_items())]

    def _footer(self) -> list:
        return []

    def summary(self, level: float = 95.0) -> TextSummary:
        """Coefficient table with standard errors, t tests, df and confidence intervals."""
        table = t_table(self.fe_names, self.params, self.bse, self.tvalues, self.df, self.pvalues,
                        self.conf_int(level), level)
        rule = "-" * table.width(_WIDTH)
        lines = self._header() + [rule] + table.text_lines(self.depvar, _WIDTH) + [rule]
        lines.extend(self._footer())
        header = Table(["", ""], [[lab, val.strip()] for lab, val in self._header_items()], self._title)
        return TextSummary("\n".join(lines),
                           [header, table.table(self.depvar or "", "Coefficients", self._footer())])

    def to_frame(self, level: float = 95.0) -> pd.DataFrame:
        """The coefficient table as a DataFrame."""
        ci = self.conf_int(level)
        return pd.DataFrame({"coef": self.params, "std err": self.bse, "t": self.tvalues,
                             "df": self.df, "P>|t|": self.pvalues, "lower": ci["lower"],
                             "upper": ci["upper"]})

    def __repr__(self):
        return f"<{type(self).__name__} n={self.nobs} p={self.n_fe}>"


class OLSResults(LinearResults):
    """A fitted OLS regression (statsmodels-style names), returned by :func:`ols`.

    Extra attributes: ``resid``, ``fittedvalues`` (Series over the used rows, indexed
    like the data), ``scale`` (s^2), ``df_resid``
    (N - p), ``rsquared``, ``rsquared_adj``, ``cov_type`` ("nonrobust" or the CR
    type), ``n_clusters``, ``cluster_name``, ``robust`` (the
    :class:`mlmeta.robust.RobustResults`, or None), ``sample`` (rows used).

    Examples
    --------
    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(10, 1, 8, seed=2)
    >>> fit = mlmeta.ols("DV ~ IV1", data)
    >>> print(f"R2 = {fit.rsquared:.4f}, s2 = {fit.scale:.4f}, df = {fit.df_resid}")
    R2 = 0.0282, s2 = 0.9365, df = 78
    """

    def __init__(self, params, cov, names, df, *, y, X, resid, robust=None, cov_type="nonrobust",
                 df_method=None, cluster_name=None, sample=None, depvar=None, index=None):
        super().__init__(params, cov, names, df, y.shape[0], depvar=depvar)
        self.resid = pd.Series(resid, index=index, name="resid")
        self.fittedvalues = pd.Series(y - resid, index=index, name="fitted")
        self.df_resid = int(y.shape[0] - X.shape[1])
        self.scale = float(resid @ resid / self.df_resid) if self.df_resid > 0 else np.nan
        has_const = "_cons" in self.fe_names
        tss = float(np.sum((y - y.mean()) ** 2)) if has_const else float(y @ y)
        self.rsquared = 1.0 - float(resid @ resid) / tss if tss > 0 else np.nan
        dfm = X.shape[1] - (1 if has_const else 0)
        dft = y.shape[0] - (1 if has_const else 0)
        self.rsquared_adj = 1.0 - (1.0 - self.rsquared) * dft / self.df_resid if self.df_resid > 0 else np.nan
        self.df_model = dfm
        self.robust = robust
        self.cov_type = cov_type
        self.df_method = df_method
        self.cluster_name = cluster_name
        self.n_clusters = None if robust is None else robust.n_clusters
        self.sample = sample

    @property
    def _title(self):
        return "Linear regression" if self.robust is None else "Linear regression, cluster-robust SEs"

    def _header_items(self):
        items = [("Number of obs", f"{self.nobs:>9,}")]
        if self.robust is not None:
            clus = f"Clusters ({self.cluster_name})" if self.cluster_name else "Clusters"
            items.append((clus, f"{self.n_clusters:>9,}"))
        items.append(("R-squared", f"{fmt_f(self.rsquared, 4):>9}"))
        items.append(("Root MSE", f"{fmt_g(np.sqrt(self.scale), 9):>9}"))
        return items

    def _footer(self):
        if self.robust is None:
            return [f"Classical standard errors, t tests on {fmt_g(self.df.iloc[0], 9)} df."]
        if self.df_method == "fixed":
            text = self.robust.description.split(" standard errors")[0]
            return [f"{text} standard errors, t tests on {fmt_g(self.df.iloc[0], 9)} df."]
        return [self.robust.description + "."]

    def wald_test(self, R, value=None, test=None):
        """Joint test of ``R beta = value``.

        With cluster-robust SEs see :meth:`RobustResults.wald_test`; with classical
        SEs an F test ``Q / q`` on (q, N - p) df.

        Parameters
        ----------
        R : str, list of str or array-like
            Constraints, e.g. ``"IV1 = 0, IV2 = 0"``.
        value : array-like, optional
            Right-hand sides when ``R`` is a matrix (default 0).
        test : str, optional
            Robust test (default the one of the df method).

        Returns
        -------
        WaldTestResult

        Examples
        --------
        >>> import mlmeta
        >>> data, _, _ = mlmeta.simulate.lmm(10, 1, 8, seed=2)
        >>> w = mlmeta.ols("DV ~ IV1", data, cluster="Group", type="CR2").wald_test("IV1 = 0")
        >>> print(f"{w.test}: F({w.df_num}, {w.df_denom:.2f}) = {w.statistic:.4f}")
        HTZ: F(1, 6.02) = 1.9198
        """
        if self.robust is not None:
            test = test or {"satterthwaite": "HTZ", "naive-t": "naive-F", "naive-tp": "naive-Fp",
                            "z": "chi2"}.get(self.df_method, "naive-Fp")
            return self.robust.wald_test(R, value, test)
        from mlmeta.robust_results import WaldTestResult, constraint_matrix

        C, c0, labels = constraint_matrix(R, self.fe_names, value)
        d = C @ self.params.to_numpy() - c0
        Q = float(d @ np.linalg.solve(C @ self._cov @ C.T, d))
        q = C.shape[0]
        F = Q / q
        pvalue = float(_dist.f_sf(F, q, self.df_resid))
        return WaldTestResult("F", F, q, self.df_resid, pvalue, Q, 1.0, labels)

    def __repr__(self):
        return f"<OLSResults n={self.nobs} p={self.n_fe} cov={self.cov_type}>"


def _cluster_values(cluster, data, n_rows):
    """Cluster labels over all rows of the data, and a name for them."""
    if isinstance(cluster, str):
        if not hasattr(data, "columns") or cluster not in data.columns:
            raise ValueError(f"unknown cluster column {cluster!r}")
        return np.asarray(data[cluster]), cluster
    values = cluster.to_numpy() if isinstance(cluster, (pd.Series, pd.Index)) else np.asarray(cluster)
    if values.ndim != 1 or values.shape[0] != n_rows:
        raise ValueError(f"cluster must have one value per data row ({n_rows}), got shape {values.shape}")
    return values, getattr(cluster, "name", None)


def labelled_frame(parsed, data, labels, what):
    """The model frame of the rows whose label (``what``: "cluster" or "group") is
    present, rows with a missing label dropped with a MissingDataWarning. Returns
    (frame, labels over all data rows, their name, mask of the rows kept)."""
    n_rows = len(data)
    values, name = _cluster_values(labels, data, n_rows)
    keep = ~np.asarray(pd.isna(values), dtype=bool)
    if not keep.all():
        warn(f"dropped {int((~keep).sum())} of {n_rows} rows with a missing {what} label",
             MissingDataWarning)
    sub = data if keep.all() else data.iloc[np.flatnonzero(keep)]
    return build_model_frame(parsed, sub), values, name, keep


def ols_fit(y, X):
    """beta, residuals and (X'X)^-1 by a QR decomposition of X."""
    Q, R = linalg.qr(X, mode="economic")
    d = np.abs(np.diag(R))
    if d.size and d.min() <= 1e-12 * d.max():
        raise ValueError("the design matrix is rank deficient (collinear columns)")
    beta = linalg.solve_triangular(R, Q.T @ y)
    Ri = linalg.solve_triangular(R, np.eye(R.shape[0]))
    return beta, y - X @ beta, Ri @ Ri.T


def ols(formula, data, cluster=None, type="CR1", df=None) -> OLSResults:
    """OLS regression, optionally with cluster-robust standard errors.

    ``beta = (X'X)^-1 X'y``, ``s^2 = r'r / (N - p)``; classical
    ``Var(beta) = s^2 (X'X)^-1`` with t tests on N - p df, or the cluster-robust
    sandwich of :func:`cluster_robust` with working model I (sandwich's ``vcovCL``,
    clubSandwich's ``vcovCR(lm, cluster, type)``, pymer4's
    ``Lm(robust="cluster")``).

    Parameters
    ----------
    formula : str
        ``"DV ~ IV1 + IV2"`` (formulaic syntax; no random-effects bars).
    data : pandas.DataFrame
        The data.
    cluster : str or array-like, optional
        None (classical SEs), a column name, or one label per data row. Rows with a
        missing cluster label are dropped like rows with missing values.
    type : {"CR1", "CR0", "CR1p", "CR1S", "CR2", "CR3"}
        Small-sample correction with ``cluster`` (CR1: J/(J-1)).
    df : str or float, optional
        t reference df with ``cluster``: "naive-tp" (J - p; default, except
        "satterthwaite" for CR2), "satterthwaite", "naive-t" (J - 1), "z", or a number.

    Returns
    -------
    OLSResults
        Coefficients named after the columns, the intercept ``_cons`` last.

    Raises
    ------
    ValueError
        For random-effects terms in the formula, collinear columns, or no more
        observations than coefficients.

    Examples
    --------
    >>> import mlmeta
    >>> data, _, _ = mlmeta.simulate.lmm(10, 1, 8, seed=2)
    >>> fit = mlmeta.ols("DV ~ IV1", data, cluster="Group", type="CR2")
    >>> fit.to_frame().round(4)
             coef  std err       t      df   P>|t|   lower   upper
    IV1    0.1685   0.1216  1.3856  6.0215  0.2150 -0.1288  0.4658
    _cons  0.3111   0.0863  3.6054  6.9974  0.0087  0.1071  0.5152
    """
    from mlmeta.robust import cluster_robust

    parsed = parse_formula(formula)
    if parsed.random:
        raise ValueError("ols() fits fixed effects only; the formula has random-effects terms "
                         f"({', '.join(f'({t.rhs} | {t.group})' for t in parsed.random)}): "
                         "use mlmeta.mixed for a mixed model")
    if cluster is None:
        frame, cl_all, cl_name, keep = build_model_frame(parsed, data), None, None, np.ones(len(data), bool)
    else:
        frame, cl_all, cl_name, keep = labelled_frame(parsed, data, cluster, "cluster")
    for note in frame.notes:
        warn(note, UserWarning)
    sample = keep.copy()
    sample[np.flatnonzero(keep)] = frame.sample
    y, X, names = frame.y, np.asarray(frame.X), frame.fe_names
    N, p = X.shape
    if N <= p:
        raise ValueError(f"{N} observations for {p} coefficients: more observations are needed")
    beta, resid, XtXi = ols_fit(y, X)
    index = frame.data_index[np.flatnonzero(frame.sample)]      # the used rows' labels
    if cl_all is None:
        s2 = float(resid @ resid) / (N - p)
        return OLSResults(beta, s2 * XtXi, names, float(N - p) if df is None else df, y=y, X=X,
                          resid=resid, sample=sample, depvar=parsed.response, index=index)
    cl = cl_all[sample]
    numeric_df = df is not None and not isinstance(df, str)
    method = ("satterthwaite" if type == "CR2" else "naive-tp") if df is None or numeric_df else df
    rob = cluster_robust(X, resid, cl, type=type, df=method, params=beta, names=names,
                         cluster_name=cl_name, label=parsed.response)
    dfs = float(df) if numeric_df else rob.df.to_numpy()
    return OLSResults(beta, rob.cov_params().to_numpy(), names, dfs, y=y, X=X, resid=resid, robust=rob,
                      cov_type=type, df_method="fixed" if numeric_df else method, cluster_name=cl_name,
                      sample=sample, depvar=parsed.response, index=index)
