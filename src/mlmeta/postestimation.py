"""Postestimation for a fitted multilevel meta-regression (Stata's ``meta me``
postestimation, metafor's methods for ``rma.mv``).

:class:`PostestimationMixin` adds to the results object:

* ``heterogeneity()`` -- Cochran's I^2_Q and the multilevel Higgins-Thompson I^2;
* ``random_effects()`` -- BLUPs with comparative and diagnostic standard errors;
* ``predict()`` / ``predict_interval()`` -- linear predictions, fitted values,
  residuals, standardized residuals, prediction intervals for a new study;
* ``wald_test()``, ``containment_df()``, ``residual_df()``, ``t_test()`` -- linear
  hypotheses on the fixed effects with normal or t/F reference distributions (the
  model's df rule: containment or residual df, Satterthwaite for mixed models);
* ``e`` / ``estat()`` -- stored results comparable to Stata's ``e()``.

Profile likelihoods of the variance components are in :mod:`mlmeta.profile_likelihood`.

Rows: the model sorts its rows into clusters (``model.design.perm`` maps sorted
position k to model-frame row ``perm[k]``); the frame holds the used rows of the
data (``sample``). Per-row outputs are returned in the row order of the data,
one value per data row, NaN for rows not used in the fit.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta.constraints import linear_hypotheses
from mlmeta.plain_terms import for_formulaic
from mlmeta.reports import Heterogeneity, StoredResults, TTestTable, WaldTest, hypothesis_label
from mlmeta.summary import confidence_level
from mlmeta.vcomp import corr_to_eta, dcorr_deta, variance_components

__all__ = ["PostestimationMixin", "Heterogeneity", "WaldTest", "StoredResults", "TTestTable"]

_KINDS = ("xb", "fitted", "residuals", "residuals_marginal", "rstandard")


def _z(level):
    return float(_dist.norm_ppf(0.5 + confidence_level(level) / 200.0))


# --------------------------------------------------------------------------- #
# the mixin
# --------------------------------------------------------------------------- #
class PostestimationMixin:
    """Postestimation methods; uses ``model``, ``frame``, ``theta``, ``params``,
    ``cov_params()``, ``llf``, ``fe_names``, ``group_names``, ``sample`` and the
    Q_M / Wald attributes of the results object."""

    # -- row bookkeeping ----------------------------------------------------
    def _unsort(self, sorted_values):
        """Values over the model's sorted rows -> values in model-frame row order."""
        out = np.empty(self.model.design.n_obs)
        out[self.model.design.perm] = sorted_values
        return out

    def _to_data_rows(self, frame_values):
        """Values in model-frame row order -> array over the data rows (NaN outside)."""
        out = np.full(len(self.sample), np.nan)
        out[np.flatnonzero(self.sample)] = frame_values
        return out

    def _data_index(self) -> pd.Index:
        """The index of the data's rows (a RangeIndex for arrays and mappings)."""
        index = getattr(self.frame, "data_index", None)
        return pd.RangeIndex(len(self.sample)) if index is None else index

    def _profiled(self):
        return getattr(self.model, "residual", "known") == "profiled"

    def _Sigmas(self):
        """Absolute random-effects covariances; with an estimated residual variance
        the model's Sigma_l are relative to it (Sigma_l = sigma^2 T_l T_l')."""
        scale = float(self.model.evaluate(self.theta).sigma2) if self._profiled() else 1.0
        return [scale * S for S in self.model.Sigma_list(self.theta)], scale

    def _group_labels(self, lvl):
        """Labels of the design's groups at level ``lvl`` (design order)."""
        d, f = self.model.design, self.frame
        if d.group_start[lvl] is None:      # a crossed level: codes in label order
            return list(f.group_labels[lvl])
        first_rows = d.perm[d.group_start[lvl][:-1]]
        labels = f.group_labels[lvl]
        return [labels[c] for c in f.groups[lvl][first_rows]]

    def _new_matrix(self, spec, names, newdata, what):
        """Model matrix of ``newdata`` through a stored formulaic spec, columns in
        ``names`` order (formulaic's ``Intercept`` is ``_cons``)."""
        if not isinstance(newdata, pd.DataFrame):
            newdata = pd.DataFrame(newdata)
        try:
            mm = spec.get_model_matrix(for_formulaic(newdata), na_action="ignore")
        except Exception as exc:  # formulaic raises several types
            raise ValueError(f"cannot evaluate the {what} on newdata: {exc}") from None
        cols = {("_cons" if str(c) == "Intercept" else str(c)): j for j, c in enumerate(mm.columns)}
        missing = [n for n in names if n not in cols]
        if missing:
            raise ValueError(f"newdata does not give the {what} column(s) {missing}")
        M = np.asarray(mm.to_numpy(dtype=float))
        return M[:, [cols[n] for n in names]]

    # -- heterogeneity -------------------------------------------------------
    def heterogeneity(self, relevel=None) -> Heterogeneity:
        """Cochran's I^2_Q and the multilevel Higgins-Thompson I^2 (in percent).

        I^2_Q = max(0, (Q_M - (n - p)) / Q_M). For random-intercept models, with
        W = diag(1 / sigma_i^2) and P = W - W X (X'W X)^-1 X'W,

            s^2 = (n - p) / tr(P),   I^2_l = tau_l^2 / (sum_k tau_k^2 + s^2),
            I^2_total = sum_k tau_k^2 / (sum_k tau_k^2 + s^2).

        With random slopes the variance a level adds to an effect size,
        z' Sigma_l z, changes with the moderators, so no single share per level
        exists and I^2 is reported as not defined.

        Parameters
        ----------
        relevel : str or list of str, optional
            Grouping terms to report (default: all); the total always covers every
            level.

        Returns
        -------
        Heterogeneity
            ``I2_Q``, ``I2`` (level -> percent), ``I2_total``, ``s2``; prints as
            Stata's ``estat heterogeneity``.

        Raises
        ------
        ValueError
            For a mixed model on raw data (no sampling variances) or an unknown
            level.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> h = res.heterogeneity()
        >>> print(f"I2_Q {h.I2_Q:.2f}%, total {h.I2_total:.2f}%")
        I2_Q 90.50%, total 95.19%
        >>> {k: round(v, 2) for k, v in h.I2.items()}
        {'district': 63.32, 'district:school': 31.86}
        """
        if self._profiled() or self.Q_M is None:
            raise ValueError("heterogeneity statistics need known sampling variances")
        Q, df = self.Q_M, self.Q_M_df
        I2_Q = 100.0 * max(0.0, (Q - df) / Q) if Q > 0 else 0.0
        if relevel is None:
            keep = list(self.group_names)
        else:
            keep = [relevel] if isinstance(relevel, str) else list(relevel)
            bad = [g for g in keep if g not in self.group_names]
            if bad:
                raise ValueError(f"unknown level(s) {bad}; levels are {self.group_names}")
        slopes = [g for g, names in zip(self.group_names, self.frame.re_names) if names != ["_cons"]]
        if slopes:
            note = (f"random slopes at level(s) {', '.join(slopes)}: the variance a level adds "
                    f"to an effect size, z' Sigma z, depends on the moderator values, so there "
                    f"is no single share of the total variance per level")
            return Heterogeneity(I2_Q, Q, df, None, None, None, note)
        d = self.model.design
        w = 1.0 / d.variance if d.variance is not None else np.ones(d.n_obs)
        X = d.X
        trP = float(w.sum())
        if d.n_fe:
            XtWX = X.T @ (X * w[:, None])
            XtW2X = X.T @ (X * (w * w)[:, None])
            trP -= float(np.trace(np.linalg.solve(XtWX, XtW2X)))
        s2 = (d.n_obs - d.n_fe) / trP
        tau2 = {g: float(S[0, 0]) for g, S in zip(self.group_names, self.model.Sigma_list(self.theta))}
        total = sum(tau2.values())
        I2 = {g: 100.0 * tau2[g] / (total + s2) for g in keep}
        return Heterogeneity(I2_Q, Q, df, I2, 100.0 * total / (total + s2), s2)

    # -- random effects --------------------------------------------------------
    def random_effects(self, level: float = 95.0) -> dict:
        """BLUPs of the random effects per grouping term.

        Returns a dict term -> DataFrame indexed by group label (a MultiIndex over
        the grouping variables for nested terms such as ``district:school``), one
        row per group and effect, with columns ``effect``, ``blup``, ``se``
        (comparative: sqrt diag of the prediction-error covariance
        PEV = Var(u - u_hat), including the uncertainty of beta-hat, as metafor's
        ``ranef``), ``se_diag`` (diagnostic: sqrt diag(Sigma - PEV) = SD of u_hat)
        and ``lower``/``upper`` = blup -+ z se.

        Parameters
        ----------
        level : float
            Level of the intervals, in percent.

        Returns
        -------
        dict
            Grouping term -> DataFrame.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> re = res.random_effects()["district"]
        >>> re.head(3).round(4)
                 effect    blup      se  se_diag   lower   upper
        district
        11        _cons -0.1900  0.1665   0.1932 -0.5164  0.1364
        12        _cons -0.0847  0.1241   0.2229 -0.3279  0.1585
        18        _cons  0.1407  0.1372   0.2150 -0.1283  0.4097
        """
        z = _z(level)
        out = {}
        Sigmas = self._Sigmas()[0]
        for lvl, ((u, pev), S) in enumerate(zip(self.model.random_effects(self.theta), Sigmas)):
            term = self.frame.terms[lvl]
            effects = list(self.model.structs[lvl].effect_names)
            G, q = u.shape
            se = np.sqrt(np.clip(np.einsum("gii->gi", pev), 0.0, None))
            se_diag = np.sqrt(np.clip(np.diag(S)[None, :] - np.einsum("gii->gi", pev), 0.0, None))
            labels = self._group_labels(lvl)
            rows = [labels[g] for g in range(G) for _ in range(q)]
            if len(term.group_vars) > 1:
                index = pd.MultiIndex.from_tuples(rows, names=list(term.group_vars))
            else:
                index = pd.Index(rows, name=term.group_vars[0])
            blup, se, se_diag = u.reshape(-1), se.reshape(-1), se_diag.reshape(-1)
            out[self.group_names[lvl]] = pd.DataFrame(
                {"effect": effects * G, "blup": blup, "se": se, "se_diag": se_diag,
                 "lower": blup - z * se, "upper": blup + z * se}, index=index)
        return out

    def _re_contribution(self):
        """Z u_hat summed over levels, per sorted design row."""
        d = self.model.design
        total = np.zeros(d.n_obs)
        for Z, g, (u, _) in zip(d.Z, d.groups, self.model.random_effects(self.theta)):
            total += np.einsum("iq,iq->i", Z, u[g])
        return total

    # -- prediction -------------------------------------------------------------
    def predict(self, kind: str = "xb", newdata=None, stdp: bool = False):
        """Predictions, one per data row (NaN for rows not used), or per newdata row.

        * ``xb``: x'beta; with ``stdp=True`` also its SE sqrt(x' Var(beta) x).
        * ``fitted``: x'beta + sum_l z_l' u_l (BLUPs of every level).
        * ``residuals``: y - fitted; ``residuals_marginal``: y - x'beta.
        * ``rstandard``: (y - x'beta) / sqrt(diag(V - X Var(beta) X')), the
          standardized marginal residuals of metafor's ``rstandard.rma.mv``.

        Per-row outputs carry the data's index.

        ``newdata`` (a DataFrame) is only used by ``xb``; the fixed part is
        re-encoded with the stored formula spec.

        Parameters
        ----------
        kind : {"xb", "fitted", "residuals", "residuals_marginal", "rstandard"}
            What to predict.
        newdata : pandas.DataFrame, optional
            New moderator values (``kind="xb"`` only).
        stdp : bool
            Also return the standard error of x'beta.

        Returns
        -------
        pandas.Series or pandas.DataFrame
            A Series, or a DataFrame (xb, stdp) when ``stdp=True``.

        Raises
        ------
        ValueError
            For an unknown ``kind``, or ``newdata`` with another kind than "xb".

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> res.predict("fitted").head(3).round(4)
        0   -0.0432
        1   -0.0519
        2    0.0383
        Name: fitted, dtype: float64
        """
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if stdp and kind != "xb":
            raise ValueError("stdp= is the standard error of the linear predictor; use kind='xb'")
        b = self.params.values
        Vb = self.cov_params().values
        if newdata is not None:
            if kind != "xb":
                raise ValueError(f"kind={kind!r} needs the response and the groups of the fit; "
                                 f"newdata is only used with kind='xb'")
            X = self._new_matrix(self.frame.fixed_spec, self.fe_names, newdata, "fixed part")
            index = newdata.index if isinstance(newdata, pd.DataFrame) else None
            xb = pd.Series(X @ b, index=index, name="xb")
            if not stdp:
                return xb
            se = np.sqrt(np.einsum("ij,jk,ik->i", X, Vb, X))
            return pd.DataFrame({"xb": xb, "stdp": se}, index=xb.index)
        f, d = self.frame, self.model.design
        xb = f.X @ b
        if kind == "xb":
            out = pd.Series(self._to_data_rows(xb), index=self._data_index(), name="xb")
            if not stdp:
                return out
            se = self._to_data_rows(np.sqrt(np.einsum("ij,jk,ik->i", f.X, Vb, f.X)))
            return pd.DataFrame({"xb": out, "stdp": se}, index=out.index)
        if kind == "residuals_marginal":
            return pd.Series(self._to_data_rows(f.y - xb), index=self._data_index(), name=kind)
        if kind == "rstandard":
            lam = d.variance if d.variance is not None else np.full(d.n_obs, self._Sigmas()[1])
            v = self._unsort(lam) + self._re_variance(f.Z)
            v -= np.einsum("ij,jk,ik->i", f.X, Vb, f.X)
            return pd.Series(self._to_data_rows((f.y - xb) / np.sqrt(v)), index=self._data_index(),
                             name=kind)
        fitted = xb + self._unsort(self._re_contribution())
        if kind == "fitted":
            return pd.Series(self._to_data_rows(fitted), index=self._data_index(), name="fitted")
        return pd.Series(self._to_data_rows(f.y - fitted), index=self._data_index(), name="residuals")

    def _re_variance(self, Zs):
        """sum_l z_l' Sigma_l z_l per row, for per-level designs ``Zs``."""
        return sum(np.einsum("ij,jk,ik->i", Z, S, Z) for Z, S in zip(Zs, self._Sigmas()[0]))

    def predict_interval(self, newdata=None, level: float = 95.0, sampling_variance=None):
        """Confidence and prediction intervals for the effect in a new study.

            pred = x'beta,  se = sqrt(x' Var(beta) x),  CI = pred -+ z se
            PI   = pred -+ z sqrt(se^2 + sum_l z_l' Sigma_l z_l [+ v_new])

        The new study brings a new group at every level, so every variance
        component enters; random slopes are evaluated at the study's own values
        of their covariates (taken from ``newdata`` through each random term's
        formula spec). ``sampling_variance`` adds a known sampling variance v_new
        (a number or one per row). Without newdata: one row per data row (NaN for
        rows not used). For random-intercept models this is metafor's
        ``predict.rma`` (which adds sum(sigma2)); metafor ignores random slopes.
        Columns: pred, se, ci_lower, ci_upper, pi_lower, pi_upper, tau2 (the
        variance a new study adds).

        Parameters
        ----------
        newdata : pandas.DataFrame, optional
            Moderator values of the new studies.
        level : float
            Level of both intervals, in percent.
        sampling_variance : float or array-like, optional
            Known sampling variance of the new study's estimate.

        Returns
        -------
        pandas.DataFrame

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> import pandas as pd
        >>> res.predict_interval(pd.DataFrame({"year_c": [0, 10]})).round(4)
             pred      se  ci_lower  ci_upper  pi_lower  pi_upper    tau2
        0  0.1807  0.0887    0.0069    0.3545   -0.4775    0.8389  0.1049
        1  0.2338  0.1240   -0.0092    0.4768   -0.4459    0.9136  0.1049
        """
        z = _z(level)
        b, Vb = self.params.values, self.cov_params().values
        if newdata is None:
            X, Zs = self.frame.X, self.frame.Z
            index = self._data_index()
        else:
            if not isinstance(newdata, pd.DataFrame):
                newdata = pd.DataFrame(newdata)
            X = self._new_matrix(self.frame.fixed_spec, self.fe_names, newdata, "fixed part")
            Zs = [self._new_matrix(spec, names, newdata, f"random term of {g}")
                  for spec, names, g in zip(self.frame.re_specs, self.frame.re_names, self.group_names)]
            index = newdata.index
        pred = X @ b
        se = np.sqrt(np.einsum("ij,jk,ik->i", X, Vb, X))
        tau2 = self._re_variance(Zs)
        extra = 0.0 if sampling_variance is None else np.asarray(sampling_variance, dtype=float)
        sd_pi = np.sqrt(se ** 2 + tau2 + extra)
        cols = {"pred": pred, "se": se, "ci_lower": pred - z * se, "ci_upper": pred + z * se,
                "pi_lower": pred - z * sd_pi, "pi_upper": pred + z * sd_pi, "tau2": tau2}
        if newdata is None:
            cols = {k: self._to_data_rows(v) for k, v in cols.items()}
        return pd.DataFrame(cols, index=index)

    # -- tests of the fixed effects --------------------------------------------------
    def containment_df(self) -> pd.Series:
        """Containment degrees of freedom per fixed effect (metafor's ``dfs="contain"``).

        For coefficient j, the levels whose groups all hold a single value of
        column x_j "contain" it; df_j = min(G_l over those levels, else n) - p,
        at least 1. (The intercept is contained in every level: df = G_top - p.)

        As metafor, a term with random slopes (``(1 + x | study)``, metafor's
        ``~ x | study``) adds one more candidate level: the distinct cells of the
        term's effect values and its groups (the (x, study) combinations), so the
        coefficient of x is contained in them even when it varies within studies.

        Returns
        -------
        pandas.Series
            df per coefficient.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> res.containment_df()
        year_c    54.0
        _cons      9.0
        Name: df, dtype: float64
        """
        f = self.frame
        n, p = f.X.shape
        levels = []
        for g, labels, Z in zip(f.groups, f.group_labels, f.Z):
            g = np.asarray(g)
            levels.append((g, len(labels)))
            Z = np.asarray(Z.toarray() if hasattr(Z, "toarray") else Z, dtype=float)
            if Z.ndim == 2 and Z.shape[1] and np.ptp(Z, axis=0).any():
                _, cells = np.unique(np.column_stack([g, Z]), axis=0, return_inverse=True)
                cells = np.asarray(cells).ravel()
                G = int(cells.max()) + 1
                if G > len(labels):
                    levels.append((cells, G))
        out = np.full(p, float(n))
        for j in range(p):
            x = f.X[:, j]
            for g, G in levels:
                lo = np.full(G, np.inf)
                hi = np.full(G, -np.inf)
                np.minimum.at(lo, g, x)
                np.maximum.at(hi, g, x)
                if np.all(lo == hi):
                    out[j] = min(out[j], G)
        return pd.Series(np.maximum(out - p, 1.0), index=self.fe_names, name="df")

    def residual_df(self) -> pd.Series:
        """Residual degrees of freedom k - p for every fixed effect (metafor's
        ``dfs="residual"``), at least 1.

        Returns
        -------
        pandas.Series
            df per coefficient.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> res.residual_df()
        year_c    54.0
        _cons     54.0
        Name: df, dtype: float64
        """
        n, p = self.frame.X.shape
        return pd.Series(float(max(n - p, 1)), index=self.fe_names, name="df")

    @property
    def _df_rule(self) -> str:
        """The df rule of the t references of this model: "satterthwaite" for mixed
        models with Satterthwaite tests, else the ``dfs=`` of the fit ("contain",
        metafor's default for ``test="t"``, or "residual")."""
        if getattr(self, "test", "z") in ("satterthwaite", "kenward-roger"):
            return self.test
        return str(getattr(self, "options", {}).get("dfs", "contain"))

    def _coef_df(self) -> pd.Series:
        """Per-coefficient df of the t references under the model's df rule."""
        rule = self._df_rule
        if rule == "satterthwaite":
            from mlmeta.satterthwaite import satterthwaite_df

            return satterthwaite_df(self).astype(float)
        if rule == "residual":
            return self.residual_df()
        return self.containment_df()

    def _row_df(self, L) -> np.ndarray:
        """df of each contrast row of L: its Satterthwaite df (lmerTest's contest1D),
        or the smallest df of the coefficients it involves (metafor's
        ``anova(..., X=)``)."""
        if self._df_rule == "satterthwaite":
            from mlmeta.satterthwaite import satterthwaite_df

            return np.asarray(satterthwaite_df(self, L), dtype=float)
        cdf = self._coef_df().values
        return np.array([float(cdf[row != 0].min()) if np.any(row != 0) else np.nan for row in L])

    def t_test(self, hypotheses=None, level: float = 95.0, rhs=None) -> TTestTable:
        """t tests of the coefficients, or of linear hypotheses ``L beta = r``.

        Without ``hypotheses``: the coefficient table, t = b / se, p = 2 P(T_df > ``|t|``),
        CI = b -+ t_{df, 1-alpha/2} se. With ``hypotheses`` (text such as
        ``"x = 0"`` or ``"x1 - x2 = 0.5"``, a list of such strings, or a matrix L with
        ``rhs``; as :meth:`wald_test`): one row per hypothesis with ``coef`` = L b,
        t = (L b - r) / se and the interval for L b.

        df: the model's one df rule, as its summary uses for ``test="t"`` --
        Satterthwaite df of each contrast for mixed models (lmerTest's
        ``contest1D``), else the ``dfs=`` of the fit: containment df (metafor's
        ``dfs="contain"``, the default; a contrast gets the smallest df of its
        coefficients) or residual df k - p. (A number as the only positional
        argument is read as ``level``, as before.)

        Parameters
        ----------
        hypotheses : str, list of str or array-like, optional
            Linear hypotheses; default the coefficients.
        level : float
            Confidence level in percent.
        rhs : array-like, optional
            Right-hand sides r when ``hypotheses`` is a matrix L.

        Returns
        -------
        TTestTable
            A DataFrame with columns coef, std_err, t, df, pvalue, lower, upper (one
            row per hypothesis) that also has statsmodels' ``ContrastResults`` names
            (``effect``, ``sd``, ``tvalue``, ``pvalue``, ``df_denom``, ``conf_int()``,
            ``summary()``) and exports ``as_markdown()`` and ``as_latex()``.

        Raises
        ------
        ValueError
            For malformed hypotheses or unknown coefficient names.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> res.t_test("_cons + 5*year_c = 0").round(4)
                              coef  std_err       t   df  pvalue  lower   upper
        5*year_c + _cons = 0  0.2073   0.0969  2.1387  9.0  0.0612 -0.012  0.4265
        """
        if (hypotheses is not None and not isinstance(hypotheses, (bool, np.bool_))
                and isinstance(hypotheses, (int, float, np.integer, np.floating))):
            level, hypotheses = hypotheses, None
        q = 0.5 + confidence_level(level) / 200.0
        if hypotheses is None:
            df = self._coef_df()
            b, se = self.params, self.bse
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (b / se).where(se > 0)
            crit = _dist.t_ppf(q, df)
            out = TTestTable({"coef": b, "std_err": se, "t": t, "df": df,
                              "pvalue": 2 * _dist.t_sf(np.abs(t), df),
                              "lower": b - crit * se, "upper": b + crit * se})
            out.level = level
            return out
        names = self.fe_names
        L, r = linear_hypotheses(hypotheses, names, rhs)
        est = L @ self.params.values
        se = np.sqrt(np.clip(np.einsum("ia,ab,ib->i", L, self.cov_params().values, L), 0.0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(se > 0, (est - r) / np.where(se > 0, se, 1.0), np.nan)
        df = self._row_df(L)
        crit = _dist.t_ppf(q, df)
        index = [hypothesis_label(row, names, v) for row, v in zip(L, r)]
        out = TTestTable({"coef": est, "std_err": se, "t": t, "df": df,
                          "pvalue": 2 * _dist.t_sf(np.abs(t), df),
                          "lower": est - crit * se, "upper": est + crit * se}, index=index)
        out.level = level
        return out

    def wald_test(self, hypotheses, rhs=None, test: str = "z") -> WaldTest:
        """Wald test of linear hypotheses on the fixed effects.

        ``hypotheses``: text such as ``"x1 = 0, x2 = x3"`` or ``"_cons + 5*x = 0.1"``
        (a bare name means ``name = 0``), or a matrix L (one row per hypothesis,
        columns in ``params`` order) with ``rhs``. chi2 = (Lb - r)'(L V L')^-1 (Lb - r)
        on q = rows(L) df (``test="z"``, normal theory, as the coefficients' z tests;
        ``"chi2"`` is the same); ``test="t"``: F = chi2 / q on (q, df_denom), with the
        model's df rule: for mixed models (Satterthwaite tests) lmerTest's
        multi-df Satterthwaite df (``contest(fit, L, joint=TRUE)``, see
        :func:`satterthwaite_Fdf`); otherwise a row's df is the smallest df of its
        coefficients (containment, or k - p with ``dfs="residual"``) and df_denom
        the smallest over rows (metafor's ``anova(..., X=)``).

        Parameters
        ----------
        hypotheses : str, list of str or array-like
            Linear hypotheses.
        rhs : array-like, optional
            Right-hand sides r when ``hypotheses`` is a matrix L.
        test : {"z", "chi2", "t"}
            chi2 test, or F test on the model's df.

        Returns
        -------
        WaldTest
            ``statistic``, ``df``, ``pvalue`` (and ``df_denom`` for F); prints as
            Stata's ``test``.

        Raises
        ------
        ValueError
            For malformed hypotheses, unknown names or an unknown ``test``.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> print(res.wald_test("year_c = 0"))
         ( 1)  year_c = 0
        <BLANKLINE>
                     chi2(1) =     0.32
                 Prob > chi2 =   0.5735
        """
        if test not in ("z", "chi2", "t"):
            raise ValueError(f"test must be 'z' (chi2 test) or 't' (F test), got {test!r}")
        names = self.fe_names
        L, r = linear_hypotheses(hypotheses, names, rhs)
        q = L.shape[0]
        if np.linalg.matrix_rank(L) < q:
            raise ValueError("the hypotheses are linearly dependent (L does not have full row rank)")
        diff = L @ self.params.values - r
        try:
            chi2 = float(diff @ np.linalg.solve(L @ self.cov_params().values @ L.T, diff))
        except np.linalg.LinAlgError:
            raise ValueError("L Var(beta) L' is singular: the hypotheses involve a combination "
                             "of coefficients fixed by constraints") from None
        Ldf = pd.DataFrame(L, columns=names)
        if test in ("z", "chi2"):
            return WaldTest(Ldf, r, chi2, q, float(_dist.chi2_sf(chi2, q)))
        if self._df_rule == "satterthwaite":
            from mlmeta.satterthwaite import satterthwaite_Fdf

            ddf = float(satterthwaite_Fdf(self, L))
        else:
            ddf = float(np.nanmin(self._row_df(L)))
        F = chi2 / q
        return WaldTest(Ldf, r, F, q, float(_dist.f_sf(F, q, ddf)), "t", ddf)

    # -- stored results ---------------------------------------------------------------------
    def estat(self) -> StoredResults:
        """Stored results comparable to Stata's ``e()``; see :class:`StoredResults`.

        Estimation metric: eta = log SD, atanh correlation (an exchangeable level's
        correlation on (-1/(q-1), 1) mapped onto (-1, 1) first, see vcomp); Cov(eta) is
        the inverse observed information of the (restricted) log-likelihood (see vcomp).
        The fixed effects and eta are asymptotically independent (the expected
        information has no cross block), so V is block diagonal. Reporting
        metric (delta method): Var(sd) = sd^2 Var(log sd), Var(r) = (dr/deta)^2 Var(eta),
        dr/deta = 1 - r^2 on (-1, 1). Parameters on the boundary or fixed have NaN variances.

        Returns
        -------
        StoredResults

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> e = res.estat()
        >>> e["N"], round(e["ll"], 4)
        (56, -7.9587)
        >>> e.b.round(4)
        stdmdiff         _cons          0.1847
        district         lnsd(_cons)   -1.3662
        district:school  lnsd(_cons)   -1.7096
        Name: b, dtype: float64
        """
        comps, cov_eta, free_pos = variance_components(self.model, self.theta, self.group_names,
                                                       sd_scale=self.model.scale)
        eq = self.depvar
        idx = [(eq, n) for n in self.fe_names]
        ridx = list(idx)
        b_est, b_rep = list(self.params.values), list(self.params.values)
        jac = []
        for c in comps:
            if c.kind == "sd":
                name = c.label_sd.replace("sd(", "lnsd(", 1)
                b_est.append(np.log(c.value) if c.value > 0 else -np.inf)
                jac.append(c.value)
            else:
                name = "atr(" + c.label_sd.split("(", 1)[1]        # corr(a,b), rho(f)
                with np.errstate(divide="ignore"):        # a correlation at a bound: +-inf
                    b_est.append(float(corr_to_eta(np.clip(c.value, c.lower, 1.0), c.lower)))
                jac.append(dcorr_deta(c.value, c.lower))
            b_rep.append(c.value)
            idx.append((c.group, name))
            ridx.append((c.group, c.label_sd))
        p, k = self.n_fe, len(comps)
        V = np.full((p + k, p + k), np.nan)
        V[:p, :p] = self.cov_params().values
        V[:p, p:] = V[p:, :p] = 0.0
        for a, fa in enumerate(free_pos):
            for b_, fb in enumerate(free_pos):
                if fa is not None and fb is not None:
                    V[p + a, p + b_] = cov_eta[fa, fb]
        J = np.diag(np.r_[np.ones(p), jac])
        with np.errstate(invalid="ignore"):
            V_rep = J @ np.where(np.isfinite(V), V, 0.0) @ J
        V_rep[~np.isfinite(V)] = np.nan
        fin = np.isfinite(np.diag(V))
        rank = int(np.linalg.matrix_rank(V[np.ix_(fin, fin)])) if fin.any() else 0
        mi, mri = pd.MultiIndex.from_tuples(idx), pd.MultiIndex.from_tuples(ridx)
        k_rs = sum(c.kind == "sd" for c in comps)
        scalars = {
            "N": self.nobs, "k": p + k, "k_f": p, "k_r": k, "k_rs": k_rs, "k_rc": k - k_rs,
            "rank": rank, "df_m": self.wald_df, "ic": self.n_iter, "converged": int(self.converged),
            "ll": self.llf, "chi2": self.wald_chi2, "p": self.wald_pvalue,
            "Q_M": self.Q_M, "df_Q_M": self.Q_M_df, "p_Q_M": self.Q_M_pvalue,
        }
        structs = self.model.structs
        macros = {
            "cmd": "meregress", "method": self.method.upper(), "depvar": self.depvar,
            "ivars": " ".join(self.group_names), "chi2type": "Wald",
            "indepvars": " ".join(n for n in self.fe_names if n != "_cons"),
            "vartypes": " ".join(s.title for s in structs), "redim": " ".join(str(s.q) for s in structs),
            "revars": " ".join(" ".join(s.effect_names) for s in structs),
            "optmetric": "log SD / atanh correlation"}
        return StoredResults(scalars, macros, pd.Series(b_est, index=mi, name="b"),
                             pd.DataFrame(V, index=mi, columns=mi),
                             pd.Series(b_rep, index=mri, name="b"),
                             pd.DataFrame(V_rep, index=mri, columns=mri), self.sample.copy())

    @cached_property
    def e(self) -> StoredResults:
        """Same as :meth:`estat` (Stata's ``e()``), computed once."""
        return self.estat()
