"""Plots of a fitted multilevel meta-regression (matplotlib, an optional extra:
``pip install mlmeta[plot]``).

* :func:`forest_plot` -- observed effects y_i with y_i -+ z sigma_i (sampling
  SDs), grouped by cluster, and the pooled estimate as a diamond
  (beta_cons -+ z se) with its prediction interval for a new study;
* :func:`caterpillar_plot` -- BLUPs of one level, sorted, with u -+ z se(PEV);
* :func:`profile_plot` -- profile (restricted) log-likelihood of a variance
  component with the cutoff llf_max - chi2_1(level) / 2 that defines its CI.

Each returns the matplotlib Figure; pass ``ax=`` to draw into existing axes.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["forest_plot", "caterpillar_plot", "profile_plot"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("mlmeta's plots need matplotlib; install it with "
                          "pip install 'mlmeta[plot]' (or pip install matplotlib)") from exc
    return plt


def _axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig, ax = _pyplot().subplots(figsize=figsize)
    return fig, ax


def _label(lab):
    return "/".join(str(x) for x in lab) if isinstance(lab, tuple) else str(lab)


def forest_plot(res, level: float = 95.0, ax=None, figsize=None):
    """Forest plot: every effect size with its sampling confidence interval.

    Effect sizes are drawn in cluster order as ``y_i -+ z sigma_i`` (sigma_i the
    sampling SD), labelled by their innermost group. For a model without moderators
    the pooled estimate is a diamond ``beta -+ z se`` with the prediction interval
    ``beta -+ z sqrt(se^2 + sum_l tau_l^2)`` as whiskers; for a meta-regression each
    study's fitted x'beta is marked instead.

    Parameters
    ----------
    res : MeregressResults
        A fit with known sampling variances.
    level : float
        Level of the intervals, in percent.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; default a new figure.
    figsize : tuple, optional
        Size of a new figure (default grows with the number of effect sizes).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        For a model without sampling variances (a mixed model).

    Examples
    --------
    >>> import mlmeta
    >>> from mlmeta import plots
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                        df, variance="var")
    >>> fig = plots.forest_plot(res)
    >>> fig.axes[0].get_title()
    'Forest plot'
    """
    d = res.model.design
    if d.variance is None:
        raise ValueError("a forest plot needs known sampling variances")
    z = stats.norm.ppf(0.5 + level / 200.0)
    n = d.n_obs
    f = res.frame
    inner = len(f.groups) - 1
    labels = [_label(f.group_labels[inner][f.groups[inner][r]]) for r in d.perm]
    sd = np.sqrt(d.variance)
    pos = np.arange(n, 0, -1, dtype=float)
    fig, ax = _axes(ax, figsize or (6.5, max(3.0, 0.22 * n + 1.5)))
    ax.errorbar(f.y[d.perm], pos, xerr=z * sd, fmt="s", color="0.15", ms=3.5, lw=0.9,
                capsize=0, label=f"observed ({level:g}% CI)")
    ticks, ticklabels = list(pos), labels
    if res.fe_names == ["_cons"]:
        b, se = float(res.params["_cons"]), float(res.bse["_cons"])
        tau2 = sum(float(S[0, 0]) for S in res.model.Sigma_list(res.theta))
        y0 = -0.5
        lo, hi = b - z * se, b + z * se
        ax.fill([lo, b, hi, b], [y0, y0 + 0.4, y0, y0 - 0.4], color="tab:blue",
                label=f"pooled estimate ({level:g}% CI)")
        half = z * np.sqrt(se ** 2 + tau2)
        ax.plot([b - half, b + half], [y0, y0], color="tab:blue", lw=1.2,
                label="prediction interval")
        ax.axvline(b, color="tab:blue", lw=0.6, ls=":")
        ticks, ticklabels = ticks + [y0], labels + ["Pooled"]
    else:
        ax.plot(f.X[d.perm] @ res.params.values, pos, "D", color="tab:blue", ms=3.5,
                label="fitted x'beta")
    ax.axvline(0.0, color="0.5", lw=0.6)
    ax.set_yticks(ticks)
    ax.set_yticklabels(ticklabels, fontsize=7)
    ax.set_xlabel(res.depvar)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Forest plot")
    fig.tight_layout()
    return fig


def caterpillar_plot(res, group=None, effect: str = "_cons", level: float = 95.0,
                     ax=None, figsize=None):
    """Caterpillar plot: the BLUPs of one level, sorted, with their intervals.

    Each group's ``u_hat -+ z se`` with the comparative standard error
    ``se = sqrt(diag PEV)`` of :meth:`MeregressResults.random_effects`.

    Parameters
    ----------
    res : MeregressResults
        A fitted model.
    group : str, optional
        Grouping term (default the top level).
    effect : str
        Random effect to show (``"_cons"``, or a random slope's name).
    level : float
        Level of the intervals, in percent.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into.
    figsize : tuple, optional
        Size of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        For an unknown grouping term or effect.

    Examples
    --------
    >>> import mlmeta
    >>> from mlmeta import plots
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                        df, variance="var")
    >>> fig = plots.caterpillar_plot(res, group="district")
    >>> len(fig.axes[0].get_yticklabels())          # one row per district
    11
    """
    group = res.group_names[0] if group is None else group
    if group not in res.group_names:
        raise ValueError(f"unknown grouping term {group!r}; terms are {res.group_names}")
    re = res.random_effects(level=level)[group]
    re = re[re.effect == effect]
    if re.empty:
        raise ValueError(f"level {group!r} has no random effect {effect!r}")
    re = re.sort_values("blup")
    labels = [_label(i) for i in re.index]
    pos = np.arange(len(re), dtype=float)
    fig, ax = _axes(ax, figsize or (5.5, max(3.0, 0.2 * len(re) + 1.5)))
    ax.errorbar(re.blup.values, pos, xerr=[re.blup - re.lower, re.upper - re.blup],
                fmt="o", color="tab:blue", ms=3.5, lw=0.9, capsize=0)
    ax.axvline(0.0, color="0.5", lw=0.6, ls="--")
    ax.set_yticks(pos)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel(f"BLUP of {effect} ({level:g}% interval)")
    ax.set_ylabel(group)
    ax.set_title(f"Random effects: {group}")
    fig.tight_layout()
    return fig


def profile_plot(res, param=None, n: int = 20, level: float = 95.0, ax=None, figsize=(5.5, 4.0)):
    """Profile (restricted) log-likelihood of a variance component.

    The curve of :meth:`MeregressResults.profile` with the estimate, the cutoff
    ``llf_max - chi2_1(level) / 2`` and the profile-likelihood interval of
    :meth:`MeregressResults.profile_ci` where the curve crosses it.

    Parameters
    ----------
    res : MeregressResults
        A fitted model.
    param : str, tuple or int, optional
        The variance component, as :meth:`MeregressResults.profile` takes it.
    n : int
        Number of grid points.
    level : float
        Level of the interval, in percent.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into.
    figsize : tuple
        Size of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import mlmeta
    >>> from mlmeta import plots
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                        df, variance="var")
    >>> fig = plots.profile_plot(res, "district", n=10)
    >>> fig.axes[0].get_ylabel()
    'restricted log-likelihood'
    """
    prof = res.profile(param, n=n)
    group, label = prof.attrs["param"]
    cut = prof.attrs["llf_max"] - 0.5 * stats.chi2.ppf(level / 100.0, 1)
    ci = res.profile_ci(level=level, params=[prof.attrs["theta_index"]]).iloc[0]
    fig, ax = _axes(ax, figsize)
    ax.plot(prof.sigma2, prof.llf, "-o", color="tab:blue", ms=3, lw=1.2)
    ax.axhline(cut, color="0.4", ls="--", lw=0.8, label=f"cutoff ({level:g}% CI)")
    ax.axvline(prof.attrs["estimate"], color="0.4", ls=":", lw=0.8, label="estimate")
    for v in (ci.lower, ci.upper):
        if np.isfinite(v):
            ax.axvline(v, color="tab:red", lw=0.6)
    ax.set_xlabel(f"{label} at {group}")
    ax.set_ylabel("restricted log-likelihood" if res.method == "reml" else "log-likelihood")
    ax.legend(fontsize=7)
    ax.set_title("Profile likelihood")
    fig.tight_layout()
    return fig
