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
* ``profile()`` / ``profile_ci()`` -- profile likelihood of a variance component;
* ``e`` / ``estat()`` -- stored results comparable to Stata's ``e()``.

Rows: the model sorts its rows into clusters (``model.design.perm`` maps sorted
position k to model-frame row ``perm[k]``); the frame holds the used rows of the
data (``sample``). Per-row outputs are returned in the row order of the data,
one value per data row, NaN for rows not used in the fit.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
from scipy import optimize, stats

from mlmeta.constraints import linear_hypotheses
from mlmeta.covstruct import Custom
from mlmeta.optimize import fit_nested
from mlmeta.reports import Heterogeneity, StoredResults, TTestTable, WaldTest, hypothesis_label
from mlmeta.summary import confidence_level
from mlmeta.vcomp import corr_lower as corr_lower_of
from mlmeta.vcomp import corr_to_eta, dcorr_deta, variance_components

__all__ = ["PostestimationMixin", "Heterogeneity", "WaldTest", "StoredResults", "TTestTable"]

_KINDS = ("xb", "fitted", "residuals", "residuals_marginal", "rstandard")


def _z(level):
    return float(stats.norm.ppf(0.5 + confidence_level(level) / 200.0))


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
            mm = spec.get_model_matrix(newdata, na_action="ignore")
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

        ``relevel``: a grouping term or list of them to report (default: all);
        the total always covers every level. With random slopes the variance a
        level adds to an effect size, z' Sigma_l z, changes with the moderators,
        so no single share per level exists and I^2 is reported as not defined.
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
        re-encoded with the stored formula spec. Returns a Series, or a DataFrame
        (xb, stdp) when ``stdp=True``.
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
        ``dfs="residual"``), at least 1."""
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

        Without ``hypotheses``: the coefficient table, t = b / se, p = 2 P(T_df > |t|),
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

        Returns a :class:`~mlmeta.reports.TTestTable`: a DataFrame that also has
        statsmodels' ``ContrastResults`` names (``effect``, ``sd``, ``tvalue``,
        ``pvalue``, ``df_denom``, ``conf_int()``, ``summary()``).
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
            crit = stats.t.ppf(q, df)
            out = TTestTable({"coef": b, "std_err": se, "t": t, "df": df,
                              "pvalue": 2 * stats.t.sf(np.abs(t), df),
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
        crit = stats.t.ppf(q, df)
        index = [hypothesis_label(row, names, v) for row, v in zip(L, r)]
        out = TTestTable({"coef": est, "std_err": se, "t": t, "df": df,
                          "pvalue": 2 * stats.t.sf(np.abs(t), df),
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
            return WaldTest(Ldf, r, chi2, q, float(stats.chi2.sf(chi2, q)))
        if self._df_rule == "satterthwaite":
            from mlmeta.satterthwaite import satterthwaite_Fdf

            ddf = float(satterthwaite_Fdf(self, L))
        else:
            ddf = float(np.nanmin(self._row_df(L)))
        F = chi2 / q
        return WaldTest(Ldf, r, F, q, float(stats.f.sf(F, q, ddf)), "t", ddf)

    # -- profile likelihood -------------------------------------------------------------
    @cached_property
    def _profile_setup(self):
        """(model, theta, params, corr_lower) for profiling. Levels with correlated effects
        are written as Stata custom patterns (theta = SDs then correlations, ``Sigma = D R D``
        exactly), so that every variance and correlation is one theta element; params
        lists (theta index, grouping term, label, "var" | "corr"); corr_lower maps the
        theta index of an exchangeable level's correlation (q >= 3) to its lower bound
        -1/(q-1) (an estimate there is held just inside it, 1e-9 (1 + 1/(q-1)) above)."""
        from mlmeta.model import NestedModel

        if self._profiled():
            raise ValueError("profile likelihoods are available for models with known "
                             "sampling variances")
        m = self.model
        structs, thetas, params, off = [], [], [], 0
        corr_lower = {}
        for g, s, sl in zip(self.group_names, m.structs, m.theta_slices):
            names = list(s.effect_names)
            if s.kind in ("unstructured", "exchangeable"):
                q = len(names)
                if s.kind == "unstructured":
                    pattern = [[None] * q for _ in range(q)]
                else:    # one SD, one correlation (a label needs two or more places)
                    pattern = [["sd" if i == j else (None if q == 2 else "rho") for j in range(q)]
                               for i in range(q)]
                c = Custom(names, pattern)
                if s.kind == "exchangeable":   # (sd, rho), rho inside (lo, 1)
                    lo = corr_lower_of(s)
                    sd, rho = s.report_values(self.theta[sl])
                    th = np.array([sd, np.clip(rho, lo + 1e-9 * (1 - lo), c.CORR_BOUND)])
                    if lo > -1.0:
                        corr_lower[off + 1] = lo
                else:
                    th = c.from_Sigma(s.Sigma(self.theta[sl]), corr_bound=c.CORR_BOUND)
                s = c
            else:
                th = self.theta[sl]
            if s.kind == "identity":
                params.append((off, g, f"var({' '.join(names)})", "var"))
            elif s.kind == "independent":
                params += [(off + i, g, f"var({e})", "var") for i, e in enumerate(names)]
            elif s.kind == "custom":
                k = len(s.sd_groups)
                params += [(off + a, g, f"var({' '.join(names[i] for i in w)})", "var")
                           for a, w in enumerate(s.sd_groups)]
                params += [(off + k + b, g, "corr(" + ",".join(f"{names[i]},{names[j]}" for i, j in w[:1])
                            + ")", "corr") for b, w in enumerate(s.corr_groups)]
            structs.append(s)
            thetas.append(np.asarray(th, dtype=float))
            off += len(thetas[-1])
        if all(a is b for a, b in zip(structs, m.structs)):
            return m, self.theta.copy(), params, corr_lower
        pm = NestedModel(m.design, structs, m.method, residual=m.residual,
                         fe_constraints=m.fe_constraints, cluster_labels=m.cluster_labels)
        theta = np.concatenate(thetas)
        if abs(pm.deviance(theta) + 2.0 * self.llf) > 1e-7 * max(1.0, abs(self.llf)):
            raise RuntimeError("the profiling parameterisation does not reproduce the fit")
        return pm, theta, params, corr_lower

    def _profile_params(self):
        """(theta index, grouping term, label, kind) of every profiled parameter."""
        return self._profile_setup[2]

    def _resolve_param(self, param):
        params = self._profile_params()
        if isinstance(param, (int, np.integer)):
            hits = [p for p in params if p[0] == param]
        elif isinstance(param, tuple):
            hits = [p for p in params if p[1] == param[0] and p[2] in (param[1], f"var({param[1]})")]
        else:
            hits = [p for p in params if p[1] == param]
        if len(hits) != 1:
            avail = [(p[1], p[2]) for p in params]
            raise ValueError(f"cannot profile {param!r}: give a grouping term with one variance, "
                             f"a (term, effect) or (term, label) pair or a theta index; "
                             f"profileable: {avail}")
        return hits[0]

    def _profile_llf(self, i, value, kind="var", start=None):
        """max over the other parameters of the (restricted) log-likelihood with the
        variance (theta_i = sqrt(value)) or correlation (theta_i = value) held;
        returns (llf, theta)."""
        model, theta_hat, *_ = self._profile_setup
        theta0 = (theta_hat if start is None else start).copy()
        theta0[i] = np.sqrt(max(value, 0.0)) if kind == "var" else value
        if model.n_theta == 1:
            return -0.5 * model.deviance(theta0), theta0
        # Newton from the warm start (EM steps would move the held element's partners as
        # if it were free); a run that does not converge is repeated from the estimate
        rec = fit_nested(model, theta0=theta0, fixed=[i], em_iter=0, safeguard=False)
        if not rec.converged and start is not None:
            theta1 = theta_hat.copy()
            theta1[i] = theta0[i]
            alt = fit_nested(model, theta0=theta1, fixed=[i], em_iter=0, safeguard=False)
            if alt.deviance < rec.deviance:
                rec = alt
        return -0.5 * rec.deviance, np.asarray(rec.theta, float)

    def _profile_estimate(self, i, kind):
        t = self._profile_setup[1][i]
        return float(t ** 2) if kind == "var" else float(t)

    def profile(self, param=None, n: int = 20, values=None) -> pd.DataFrame:
        """Profile (restricted) log-likelihood of a variance component or correlation.

        ``param``: a grouping term (random intercept), a (term, effect) pair, a
        (term, label) pair with a label of :meth:`profile_ci` (e.g.
        ``("trial", "corr(outcome[AL],outcome[PD])")``) or a theta index; default:
        the first. Variances are profiled in the variance metric sigma^2 (metafor's
        ``profile.rma.mv``), correlations in rho: llf = max over the other covariance
        parameters (beta profiled out). ``values`` sets the grid; by default ``n``
        points spanning the profile-likelihood CI with a margin. Columns: sigma2, sd,
        llf (variances) or rho, llf (correlations).
        """
        i, g, label, kind = self._resolve_param(param if param is not None
                                                else self._profile_params()[0][0])
        est = self._profile_estimate(i, kind)
        if values is None:
            ci = self.profile_ci(params=[i]).iloc[0]
            lo, hi = float(ci.lower), float(ci.upper)
            if kind == "corr":
                values = np.linspace(max(-1.0, lo - 0.1), min(1.0, hi + 0.1), n)
                values = np.clip(values, -Custom.CORR_BOUND, Custom.CORR_BOUND)
            else:
                if not np.isfinite(hi):
                    hi = lo + 4.0 * max(est, 1e-8)
                span = hi - lo
                values = np.linspace(max(0.0, lo - 0.25 * span), hi + 0.25 * span, n)
            values = np.union1d(values, [est])
        values = np.asarray(values, dtype=float)
        llf = np.empty(values.size)
        start = None
        order = np.argsort(np.abs(values - est))
        for k in order:      # outward from the estimate, warm-starting each fit
            llf[k], start = self._profile_llf(i, values[k], kind, start)
        if kind == "corr":
            df = pd.DataFrame({"rho": values, "llf": llf})
        else:
            df = pd.DataFrame({"sigma2": values, "sd": np.sqrt(values), "llf": llf})
        df.attrs.update(param=(g, label), theta_index=i, estimate=est, llf_max=float(self.llf))
        return df

    def profile_ci(self, level: float = 95.0, params=None) -> pd.DataFrame:
        """Profile-likelihood confidence intervals for the variance components and the
        correlations of correlated random effects (metafor's ``confint``).

        The limits solve 2 (llf_max - llf(value)) = chi2_1(level) (brentq on each side
        of the estimate). When the profile at a variance of 0 (a correlation of -1 or
        1) stays above the cutoff, that bound is the limit, as in metafor. Rows: each
        variance (and each correlation of unstructured, exchangeable and custom
        levels). Columns: group, param, estimate, lower, upper (variances or
        correlations), sd, sd_lower, sd_upper (NaN for correlations).
        """
        _z(level)
        cut = self.llf - 0.5 * stats.chi2.ppf(level / 100.0, 1)
        v = self.model.design.variance
        vscale = float(np.median(v)) if v is not None else 1.0
        bound = Custom.CORR_BOUND
        rows = []
        for i, g, label, kind in self._profile_params():
            if params is not None and i not in params:
                continue
            est = self._profile_estimate(i, kind)
            cache = {}

            def f(x, i=i, kind=kind, cache=cache):  # bound now: f is built anew for each parameter
                if x not in cache:
                    cache[x] = self._profile_llf(i, x, kind)[0]
                return cache[x] - cut

            if kind == "corr":
                tol = 1e-10
                lo = self._profile_setup[3].get(i, -1.0)      # -1/(q-1) for an exchangeable level
                inside = -bound if lo == -1.0 else lo + 1e-9 * (1 - lo)
                lower = lo if est <= inside or f(inside) >= 0 else optimize.brentq(f, inside, est, xtol=tol)
                upper = 1.0 if est >= bound or f(bound) >= 0 else optimize.brentq(f, est, bound, xtol=tol)
                rows.append((g, label, est, lower, upper, kind))
                continue
            scale = max(est, 1e-4 * vscale)
            tol = 1e-10 * scale
            lower = 0.0 if est == 0 or f(0.0) >= 0 else optimize.brentq(f, 0.0, est, xtol=tol)
            hi = est + scale
            for _ in range(60):
                if f(hi) < 0:
                    break
                hi = est + 2 * (hi - est)
            upper = optimize.brentq(f, est, hi, xtol=tol) if f(hi) < 0 else np.inf
            rows.append((g, label, est, lower, upper, kind))
        df = pd.DataFrame(rows, columns=["group", "param", "estimate", "lower", "upper", "kind"])
        is_var = (df.pop("kind") == "var").to_numpy()
        for c in ("estimate", "lower", "upper"):
            df["sd" if c == "estimate" else f"sd_{c}"] = np.where(
                is_var, np.sqrt(np.where(is_var, df[c], 0.0)), np.nan)
        return df

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
                name = c.label_sd.replace("corr(", "atr(", 1)
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
