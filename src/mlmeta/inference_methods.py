"""The results' methods that hand a fit to the inference modules: Type III/I ANOVA
(:mod:`mlmeta.anova`), cluster-robust inference (:mod:`mlmeta.robust`), influence
diagnostics (:mod:`mlmeta.influence`), the Egger-type test (:mod:`mlmeta.pubbias`),
the bootstrap and the permutation test (:mod:`mlmeta.resampling`).

:class:`InferenceMethodsMixin` is a base of :class:`mlmeta.MeregressResults` (and so of
:class:`mlmeta.MixedResults`); each method states what it computes and delegates to the
module that computes it.
"""

from __future__ import annotations

import pandas as pd

from mlmeta.anova import anova as _anova

__all__ = ["InferenceMethodsMixin"]


class InferenceMethodsMixin:
    """ANOVA, robust inference, influence, small-study and resampling methods of a fit."""

    def anova(self, type=3, ddf=None, *, data=None) -> pd.DataFrame:
        """ANOVA table of the fixed effects: one test per formula term.

        Each term's hypothesis ``L beta = 0`` is lmerTest's: Type III contrasts
        (each term's columns after residualising out the terms that contain it, in
        the over-parameterised coding) or Type I (sequential: the rows of the
        Doolittle factor of ``X'X``). A meta-regression tests it by the Wald
        statistic ``chi2 = (L b)' (L Var(b) L')^-1 (L b)`` on q = rows(L) df
        (``test="z"``), or ``F = chi2 / q`` on (q, smallest df of the coefficients
        involved) (``test="t"``), as metafor's ``anova(res, btt=)``. Mixed models use
        F tests on Satterthwaite or Kenward-Roger df (:meth:`MixedResults.anova`).

        Parameters
        ----------
        type : {3, 1, "III", "I"}
            Type III (default) or Type I (sequential) hypotheses.
        ddf : {None, "satterthwaite", "kenward-roger"}
            Mixed models only (a meta-regression's ``test=`` decides).
        data : pandas.DataFrame, optional
            The data of the fit, when the results do not hold it (Type III).

        Returns
        -------
        pandas.DataFrame
            Indexed by term: ``F, df_num, df_den, pvalue`` (mixed models and
            ``test="t"`` meta-regressions) or ``chi2, df_num, pvalue`` (``test="z"``).

        Raises
        ------
        ValueError
            For an unknown ``type`` or ``ddf``.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("pupiliq")
        >>> res = mlmeta.meregress("stdmdiff ~ tester + weeks + (1 | study)", df, se="se",
        ...                        test="t")
        >>> res.anova().round(4)
                     F  df_num  df_den  pvalue
        term
        tester  0.1219       1    16.0  0.7316
        weeks   6.5485       1    16.0  0.0210
        """
        return _anova(self, type=type, ddf=ddf, data=data)

    def robust(self, cluster=None, type="CR2", df=None, *, data=None):
        """Cluster-robust inference with the fitted model as working covariance.

        See :func:`mlmeta.robust` for the estimator, the small-sample corrections
        and the degrees of freedom.

        Parameters
        ----------
        cluster : str or array-like, optional
            Clusters: a grouping term (default the top level), a column of ``data``,
            or one label per row.
        type : {"CR2", "CR0", "CR1", "CR1p", "CR1S", "CR3"}
            Small-sample correction.
        df : {None, "satterthwaite", "naive-t", "naive-tp", "z"}
            Degrees of freedom (None: J - p for CR1p, Satterthwaite otherwise).
        data : pandas.DataFrame, optional
            Data holding the ``cluster`` column.

        Returns
        -------
        RobustResults

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> rob = res.robust(type="CR2")
        >>> print(f"{rob.bse['_cons']:.4f} on {rob.df['_cons']:.2f} df")
        0.0845 on 9.86 df
        """
        from mlmeta.robust import robust

        return robust(self, cluster=cluster, type=type, df=df, data=data)

    def influence(self, cluster=None, *, data=None, reestimate=True, n_jobs=None) -> pd.DataFrame:
        """Influence diagnostics by deletion refits, per data row or per cluster.

        Each unit c (a row, or every row of a cluster) is deleted and the model refitted
        (warm-started; the variance components re-estimated unless
        ``reestimate=False``), giving ``b_(-c)``, ``theta_(-c)``. For a meta-regression,
        as metafor's methods for ``rma.mv``:

        * ``cooks_distance = (b - b_(-c))' Var(b)^-1 (b - b_(-c))``;
        * ``dfbetas:k = (b_k - b_(-c),k) / sqrt(Var_theta_(-c)(b)_kk)``;
        * ``hat``: the diagonal of ``H = X (X'V^-1X)^-1 X'V^-1`` (rows only);
        * ``rstudent = r_i / sqrt(M_i(theta_(-i)) + x_i' Var(b_(-i)) x_i)`` with
          ``r_i = y_i - x_i'b_(-i)`` and M the marginal variance (rows only);
        * ``X2 = r_c' (M_c(theta_(-c)) + X_c Var(b_(-c)) X_c')^-1 r_c`` (clusters only).

        Mixed models follow lme4's ``influence.merMod`` (Cook's distance scaled by
        ``(m - p) / (m p)``, DFBETAS with the deletion fit's own variance and the
        opposite sign, conditional hat values and internally studentized residuals);
        see :mod:`mlmeta.influence`.

        Parameters
        ----------
        cluster : str or array-like, optional
            None (one row at a time), a grouping term, a column of ``data``, or one
            value per data row or per used row: the units deleted together.
        data : pandas.DataFrame, optional
            Data holding the ``cluster`` column.
        reestimate : bool
            Re-estimate the variance components in each deletion fit (default, as
            metafor and lme4) or hold them at the full-data estimates.
        n_jobs : int, optional
            Threads for the deletion fits; default all cores.

        Returns
        -------
        pandas.DataFrame
            One row per used data row (the data's index) with ``cooks_distance``,
            ``hat``, ``rstudent`` and ``dfbetas:<coef>``, or one per cluster with
            ``cooks_distance``, ``X2`` and ``dfbetas:<coef>``. A unit whose deletion
            leaves the fixed effects unidentified has NaN values;
            ``attrs["not_converged"]`` and ``attrs["failed"]`` list the units whose
            deletion fit did not converge or gave NaN.

        Raises
        ------
        ValueError
            For a crossed design (per-cluster deletion is not defined there yet) or
            an unknown ``cluster``.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> inf = res.influence(cluster="district")
        >>> inf.sort_values("cooks_distance").tail(2).round(3)
                  cooks_distance     X2  dfbetas:year_c  dfbetas:_cons
        district
        ...
        """
        from mlmeta.influence import influence

        return influence(self, cluster, data=data, reestimate=reestimate, n_jobs=n_jobs)

    def egger_test(self, robust=None, *, cluster=None, predictor="sei", test=None, level=95.0,
                   data=None):
        """Multilevel Egger-type regression test of funnel-plot asymmetry.

        The model is refitted with the sampling standard error ``s_i = sqrt(v_i)``
        (``predictor="sei"``, Egger's test) or the sampling variance ``v_i``
        (``predictor="vi"``) as one more moderator, with the same random effects,
        sampling covariance and method:

        ``y = X beta + alpha s_i + sum_l Z_l u_l + e``,  H0: ``alpha = 0``

        metafor's ``rma.mv(yi, V, mods = ~ sqrt(vi), random = ...)``, the multilevel
        form of ``regtest``. alpha is tested by z, by t on the model's df rule, or,
        with ``robust="CR2"``, by its cluster-robust CR2 standard error on
        Satterthwaite df (clubSandwich's ``coef_test``), robust to a misspecified
        within-cluster covariance. With an intercept, the intercept of the refit is
        the limit estimate: the effect of a study of infinite precision (PET for
        ``"sei"``, PEESE for ``"vi"``).

        Parameters
        ----------
        robust : {None, "CR2"}
            Model-based (default) or cluster-robust inference.
        cluster : str or array-like, optional
            The robust clusters: a grouping term (default the top level), a column of
            ``data`` or values per row; only with ``robust="CR2"``.
        predictor : {"sei", "vi"}
            sqrt(v_i) (Egger's test) or v_i.
        test : {None, "z", "t"}
            Reference distribution of model-based inference; default the fit's.
        level : float
            Confidence level of the limit estimate's interval, in percent.
        data : pandas.DataFrame, optional
            Data holding the ``cluster`` column.

        Returns
        -------
        EggerTest
            ``statistic``, ``pvalue``, ``coef`` and ``se`` of alpha, ``df``, the
            ``limit`` estimate with ``limit_ci``, and the refit as ``fit``; prints as
            metafor's ``regtest``.

        Raises
        ------
        ValueError
            For a mixed model (no sampling variances), fixed-effect constraints,
            equal sampling variances (no information), a predictor collinear with the
            moderators, or ``cluster`` without ``robust="CR2"``.

        See Also
        --------
        mlmeta.plots.funnel_plot : the plot whose asymmetry the test measures.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> print(res.egger_test(robust="CR2"))
        Regression test for funnel plot asymmetry (multilevel)
        <BLANKLINE>
        predictor: standard error sqrt(v_i)
        inference: cluster-robust CR2, Satterthwaite df, clusters: district
        coefficient: -0.9846 (se 0.7056)
        <BLANKLINE>
        test for funnel plot asymmetry: t(4.693) = -1.3954, p = 0.2253
        limit estimate (as sei -> 0): 0.3201 (95% CI -0.0658, 0.7060)
        """
        from mlmeta.pubbias import egger_test

        return egger_test(self, robust, cluster=cluster, predictor=predictor, test=test,
                          level=level, data=data)

    def bootstrap(self, n=1000, *, kind="parametric", level=95.0, seed=None, n_jobs=None,
                  executor=None):
        """Bootstrap percentile intervals of the fixed effects and the random-effects
        SDs and correlations.

        ``kind="parametric"``: outcomes simulated from the fitted model
        (``y* = X beta + sum_l Z_l u_l* + e*``) and refitted in one batch run of the
        engine; ``kind="cluster"``: top-level clusters drawn with replacement (each
        copy a new cluster) and refitted. Replicate b draws from
        ``SeedSequence(seed).spawn``, so results do not depend on ``n_jobs`` nor on
        the ``executor`` and its number of workers.

        Parameters
        ----------
        n : int
            Number of replicates (>= 2).
        kind : {"parametric", "cluster"}
            What is resampled.
        level : float
            Level of the percentile intervals, in percent.
        seed : int, optional
            Seed of the replicates.
        n_jobs : int, optional
            Threads; default all cores (1 per task with an ``executor``).
        executor : concurrent.futures.Executor or distributed.Client, optional
            Runs the refits in contiguous chunks of replicates on its workers
            (processes, a Dask cluster); the fitted model is pickled to them.

        Returns
        -------
        table : pandas.DataFrame
            Per parameter: estimate, boot_mean, boot_se, lower, upper (percentile
            interval) and n_ok (usable replicates).
        replicates : dict
            Parameter -> array of its replicate values.

        Raises
        ------
        ValueError
            For an unknown ``kind`` or ``n < 2``.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> table, reps = res.bootstrap(50, seed=1, n_jobs=1)
        >>> list(table.index)
        ['_cons', 'district: sd(_cons)', 'district:school: sd(_cons)']
        >>> int(table.loc["_cons", "n_ok"])
        50
        """
        from mlmeta.resampling import bootstrap

        return bootstrap(self, n, kind=kind, level=level, seed=seed, n_jobs=n_jobs,
                         executor=executor)

    def permutation_test(self, n=1000, *, seed=None, n_jobs=None, executor=None):
        """Permutation test of the moderators (metafor's ``permutest``).

        The rows of the moderators are permuted, the model refitted, and the observed
        omnibus Wald statistic Q_M and each ``|z|`` compared with their permutation
        distributions: ``p = (1 + #{T* >= T}) / (n + 1)``.

        Parameters
        ----------
        n : int
            Number of permutations.
        seed : int, optional
            Seed of the permutations.
        n_jobs : int, optional
            Threads; default all cores (1 per task with an ``executor``).
        executor : concurrent.futures.Executor or distributed.Client, optional
            Runs the refits in contiguous chunks of permutations on its workers; the
            results do not depend on it.

        Returns
        -------
        pandas.DataFrame
            statistic, p_perm and p_asymptotic, the omnibus test first.

        Raises
        ------
        ValueError
            If the model has no moderators or has fixed-effect constraints.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> perm = res.permutation_test(50, seed=1, n_jobs=1)
        >>> list(perm.index), list(perm.columns)
        (['Q_M (moderators)', 'year_c'], ['statistic', 'p_perm', 'p_asymptotic'])
        """
        from mlmeta.resampling import permutation_test

        return permutation_test(self, n, seed=seed, n_jobs=n_jobs, executor=executor)
