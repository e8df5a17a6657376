"""Plots of a fitted multilevel meta-regression (matplotlib, an optional extra:
``pip install mlmeta[plot]``).

* :func:`forest_plot` -- observed effects y_i with y_i -+ z sigma_i (sampling
  SDs), squares sized by weight, "estimate [CI]" and weights, grouped by cluster
  with optional subtotals, and the pooled estimate as a diamond (beta_cons -+ z se)
  with its prediction interval for a new study (fitted values for meta-regressions);
* :func:`funnel_plot` -- effects or residuals against their sampling SEs, optionally
  contour-enhanced (returns the Axes);
* :func:`caterpillar_plot` -- BLUPs of one level, sorted, with u -+ z se(PEV);
* :func:`profile_plot` -- profile (restricted) log-likelihood of a variance
  component with the cutoff llf_max - chi2_1(level) / 2 that defines its CI.

Each returns the matplotlib Figure (the funnel plot its Axes); pass ``ax=`` to draw
into existing axes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlmeta import _dist
from mlmeta.influence import marginal_weights
from mlmeta.summary import confidence_level
from mlmeta.validate import aligned

__all__ = ["forest_plot", "funnel_plot", "caterpillar_plot", "profile_plot"]


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


# --------------------------------------------------------------------------- forest plot
_MONO = "DejaVu Sans Mono"


def _known_design(res, what):
    d = res.model.design
    if res.model.residual == "profiled" or d.variance is None:
        raise ValueError(f"a {what} needs known sampling variances (a meregress fit); a mixed "
                         f"model on raw data has none")
    return d


def _values_per_row(res, values, data, what):
    """Labels for the model-frame rows from a grouping term, a column of ``data``, or
    values per data row or per used row."""
    f = res.frame
    if isinstance(values, str):
        if values in res.group_names:
            lvl = res.group_names.index(values)
            return [_label(f.group_labels[lvl][c]) for c in f.groups[lvl]]
        if data is None:
            raise ValueError(f"{what}={values!r} is not a grouping term of the model "
                             f"({res.group_names}); pass data= to take it from a column")
        if values not in data:
            raise ValueError(f"unknown column {values!r} in data")
        values = data[values]
    sample = np.asarray(res.sample, dtype=bool)
    if isinstance(values, (pd.Series, pd.DataFrame)) and len(values) == sample.shape[0]:
        values = aligned(values, res._data_index(), what)
    values = np.asarray(values, dtype=object)
    if values.shape[0] == sample.shape[0]:
        values = values[sample]
    elif values.shape[0] != sample.sum():
        raise ValueError(f"{what} has {values.shape[0]} values; expected one per data row "
                         f"({sample.shape[0]}) or per row used in the fit ({int(sample.sum())})")
    return [_label(v) for v in values]


def _default_labels(res, lvl):
    """Per frame row: the innermost group's label, without the components of the
    grouping term ``lvl`` (None: the full label); the data's row labels when the
    innermost level is the grouping level itself."""
    f = res.frame
    inner = len(f.groups) - 1
    if lvl is not None and inner == lvl:
        return [_label(i) for i in res._data_index()[np.asarray(res.sample, dtype=bool)]]
    labels = [f.group_labels[inner][c] for c in f.groups[inner]]
    k = 0 if lvl is None else len(f.terms[lvl].group_vars)
    return [_label(lab[k:] if isinstance(lab, tuple) and k else lab) for lab in labels]


def _label_title(res, label, lvl):
    """Title of the label column: the label's column or term, or what the default labels are."""
    if label is not None:
        return label if isinstance(label, str) else str(getattr(label, "name", "") or "")
    inner = len(res.frame.terms) - 1
    if lvl is not None and inner == lvl:
        return str(res._data_index().name or "")
    group_vars = res.frame.terms[inner].group_vars
    k = 0 if lvl is None else len(res.frame.terms[lvl].group_vars)
    return "/".join(group_vars[k:])


def _grouping(res, group):
    """The grouping level of the rows (None: no grouping). ``group=None`` groups by the
    top level when some top-level group holds more than one row."""
    if group is None:
        return 0 if np.diff(res.model.design.group_start[0]).max() > 1 else None
    if group is False:
        return None
    if group not in res.group_names:
        raise ValueError(f"group= must be a grouping term of the model {res.group_names} or "
                         f"False, got {group!r}")
    return res.group_names.index(group)


def _pooled_tau2(res):
    """Variance a new study adds at covariate values 0: sum of the intercept variances."""
    tau2 = 0.0
    for names, S in zip(res.frame.re_names, res._Sigmas()[0]):
        if "_cons" in names:
            j = list(names).index("_cons")
            tau2 += float(S[j, j])
    return tau2


def _subtotal(res, rows, lvl):
    """A group's mean effect from its own rows: the GLS mean (1'W1)^-1 1'W y with W^-1 the
    covariance of the rows without the variance components of levels <= lvl."""
    d = res.model.design
    M = np.diag(d.variance[rows]) if d.Lambda is None else d.Lambda[rows][:, rows].toarray()
    for l, (Z, g, S) in enumerate(zip(d.Z, d.groups, res.model.Sigma_list(res.theta))):
        if l > lvl:
            Zc = Z[rows]
            M += (Zc @ S @ Zc.T) * (g[rows][:, None] == g[rows][None, :])
    w = np.linalg.solve(M, np.ones(rows.shape[0]))
    return float(w @ d.y[rows] / w.sum()), float(1.0 / np.sqrt(w.sum()))


def _forest_rows(res, lvl, labels, subtotals, z):
    """Rows of the plot, top to bottom: dicts with kind (group, effect, subtotal, gap),
    the left label and, for effects, the sorted design row."""
    d = res.model.design
    out = []
    if lvl is None:
        return [dict(kind="effect", label=labels[d.perm[k]], row=k) for k in range(d.n_obs)]
    starts = d.group_start[lvl]
    names = res._group_labels(lvl)
    for g in range(len(starts) - 1):
        rows = np.arange(starts[g], starts[g + 1])
        out.append(dict(kind="group", label=f"{res.group_names[lvl]} {_label(names[g])}"))
        out += [dict(kind="effect", label=labels[d.perm[k]], row=k) for k in rows]
        if subtotals:
            est, se = _subtotal(res, rows, lvl)
            out.append(dict(kind="subtotal", label="Subtotal", rows=rows,
                            est=est, lo=est - z * se, hi=est + z * se))
        out.append(dict(kind="gap", label=""))
    return out[:-1]


def _num(x, width):
    """x with two decimals in ``width`` characters, never "-0.00"."""
    return f"{x + 0.0 if round(x, 2) != 0 else 0.0:{width}.2f}"


def _ci_text(est, lo, hi, width):
    return f"{_num(est, width)} [{_num(lo, width)}, {_num(hi, width)}]"


def forest_plot(res, level: float = 95.0, ax=None, figsize=None, *, label=None, data=None,
                group=None, subtotals=False, annotate=True, weights=True, prediction=True,
                refline=0.0, xlim=None, fontsize=8.0):
    """Forest plot at metafor's standard: every effect size with its sampling interval.

    One row per effect size ``y_i`` with its sampling interval ``y_i -+ z sqrt(v_i)``, a
    square of area proportional to its weight and, on the right, "estimate [CI]" and
    the weight in percent, metafor's ``weights()`` for ``rma.mv``:
    ``w_i = (V^-1)_ii / sum_k (V^-1)_kk``.

    Rows are grouped by cluster, each group under a header and, with
    ``subtotals=True`` (models without moderators), closed by its mean effect: the GLS
    mean of its rows ``(1'W1)^-1 1'W y``, with ``W^-1`` their covariance without the
    variance components of the grouping level and above (the sampling errors and the
    lower levels), drawn as a diamond of half-width ``z (1'W1)^-1/2``.

    Without moderators the pooled estimate is a diamond ``b -+ z se``, followed by the
    prediction interval for a new study ``b -+ z sqrt(se^2 + sum_l tau_l^2)`` (the
    intercept variances). For a meta-regression each row also shows its fitted value
    ``x_i'b -+ z sqrt(x_i' Var(b) x_i)`` as a grey diamond (metafor's ``addfit``).

    Parameters
    ----------
    res : MeregressResults
        A fit with known sampling variances.
    level : float
        Level of the intervals, in percent.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; default a new figure.
    figsize : tuple, optional
        Size of a new figure (default grows with the number of rows).
    label : str or array-like, optional
        Row labels: a grouping term, a column of ``data``, or one value per data row.
        Default: the innermost group's label within its group (the row's index when
        the innermost level is the grouping).
    data : pandas.DataFrame, optional
        Data holding the ``label`` column.
    group : str or False, optional
        Grouping term whose groups form the blocks of rows; default the top level
        when its groups hold several rows; False for none.
    subtotals : bool
        Close each group with its mean effect (models without moderators).
    annotate : bool
        Show the "estimate [CI]" column.
    weights : bool
        Show the weight column.
    prediction : bool
        Show the prediction interval under the pooled estimate.
    refline : float or None
        Position of the vertical reference line (None: none).
    xlim : tuple, optional
        x range; intervals beyond it end in arrows.
    fontsize : float
        Size of the labels and annotations.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        For a model without sampling variances (a mixed model), a crossed design
        (the weights need the covariance by cluster; not available yet), an unknown
        ``group``, or ``subtotals=True`` for a meta-regression or without grouped
        rows.

    See Also
    --------
    funnel_plot : effects against their standard errors.

    Examples
    --------
    >>> import mlmeta
    >>> from mlmeta import plots
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                        df, variance="var")
    >>> fig = plots.forest_plot(res, subtotals=True)
    >>> labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    >>> labels[-2:]
    ['Pooled estimate', 'Prediction interval']
    """
    d = _known_design(res, "forest plot")
    z = _dist.norm_ppf(0.5 + confidence_level(level) / 200.0)
    lvl = _grouping(res, group)
    labels = _values_per_row(res, label, data, "label") if label is not None else _default_labels(res, lvl)
    pooled = res.fe_names == ["_cons"]
    if subtotals and not pooled:
        raise ValueError("subtotals= needs a model without moderators (the pooled mean of a group)")
    if subtotals and lvl is None:
        raise ValueError("subtotals= needs grouped rows (group= a grouping term)")
    rows = [dict(kind="head")] + _forest_rows(res, lvl, labels, subtotals, z)
    w = marginal_weights(res.model, res.theta)
    w = 100.0 * w / w.sum()
    y, sd = res.frame.y[d.perm], np.sqrt(d.variance)      # observed effects, sorted rows
    if pooled:
        b, se = float(res.params["_cons"]), float(res.bse["_cons"])
        rows += [dict(kind="gap", label=""),
                 dict(kind="pooled", label="Pooled estimate", est=b, lo=b - z * se, hi=b + z * se)]
        if prediction:
            half = z * np.sqrt(se ** 2 + _pooled_tau2(res))
            rows.append(dict(kind="pi", label="Prediction interval", lo=b - half, hi=b + half))
    n_rows = len(rows)
    for k, r in enumerate(rows):
        r["y"] = float(n_rows - k)
    fig, ax = _axes(ax, figsize or (7.5, 0.19 * n_rows + 1.0))
    eff = [r for r in rows if r["kind"] == "effect"]
    k = np.array([r["row"] for r in eff], dtype=int)
    ye = np.array([r["y"] for r in eff])
    lo, hi = y[k] - z * sd[k], y[k] + z * sd[k]
    extent = [lo, hi] + [[r[key]] for r in rows for key in ("lo", "hi") if key in r]
    xmin, xmax = (float(np.min(np.concatenate(extent))), float(np.max(np.concatenate(extent))))
    if refline is not None:
        xmin, xmax = min(xmin, refline), max(xmax, refline)
    pad = 0.04 * (xmax - xmin or 1.0)
    xlo, xhi = (xmin - pad, xmax + pad) if xlim is None else (float(xlim[0]), float(xlim[1]))
    # effects: interval lines (arrows where clipped), squares sized by weight
    ax.hlines(ye, np.clip(lo, xlo, xhi), np.clip(hi, xlo, xhi), color="0.15", lw=0.8, zorder=2)
    for side, clipped in ((xlo, lo < xlo), (xhi, hi > xhi)):
        if clipped.any():
            ax.plot(np.full(clipped.sum(), side), ye[clipped], ls="none", color="0.15",
                    marker="<" if side == xlo else ">", ms=4, zorder=3)
    inside = (y[k] >= xlo) & (y[k] <= xhi)
    squares = ax.scatter(y[k][inside], ye[inside], marker="s", color="0.15", zorder=3)
    if not pooled:                                  # fitted values of a meta-regression
        Xs, Vb = res.frame.X[d.perm][k], res.cov_params().values
        fit = Xs @ res.params.values
        half = z * np.sqrt(np.einsum("ij,jk,ik->i", Xs, Vb, Xs))
        for f_, h_, y_ in zip(fit, half, ye):
            _diamond(ax, f_, f_ - h_, f_ + h_, y_, 0.3, color="0.6", zorder=1)
    for r in rows:
        if r["kind"] in ("subtotal", "pooled"):
            _diamond(ax, r["est"], r["lo"], r["hi"], r["y"], 0.38,
                     color="0.15" if r["kind"] == "pooled" else "0.4", zorder=3)
        elif r["kind"] == "pi":
            ax.hlines(r["y"], r["lo"], r["hi"], color="0.15", lw=0.9)
            ax.vlines([r["lo"], r["hi"]], r["y"] - 0.2, r["y"] + 0.2, color="0.15", lw=0.9)
    top = max(ye) + 0.5
    if refline is not None:
        ax.vlines(refline, 0.5, top, color="0.55", lw=0.7, zorder=0)
    if pooled:
        ax.vlines(rows[-2 if prediction else -1]["est"], 0.5, top, color="0.3", lw=0.6, ls=":",
                  zorder=0)
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(0.4, n_rows + 0.6)
    # text: left labels, right "estimate [CI]" and weights, as tick labels (never overlapping
    # the panel: tight_layout makes room for them)
    width = max(len(_num(v, 0)) for r in rows for v in _numbers(r, y, sd, z))
    right = []
    for r in rows:
        right.append(_right_text(r, y, sd, z, w, width, weights) if annotate else "")
    left = [_label_title(res, label, lvl) if r["kind"] == "head" else r["label"] for r in rows]
    ys = [r["y"] for r in rows]
    ax.set_yticks(ys)
    ax.set_yticklabels(left, fontsize=fontsize)
    if annotate:
        right[0] = _head_text(level, width, weights)
        ax2 = ax.twinx()
        ax2.set_ylim(ax.get_ylim())
        ax2.set_yticks(ys)
        ax2.set_yticklabels(right, fontsize=fontsize, family=_MONO)
        ax2.tick_params(axis="y", length=0)
        for sp in ax2.spines.values():
            sp.set_visible(False)
        _style(ax2, rows)
    _style(ax, rows)
    ax.tick_params(axis="y", length=0)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(res.depvar, fontsize=fontsize + 1)
    ax.tick_params(axis="x", labelsize=fontsize)
    fig.tight_layout()
    # squares: side proportional to sqrt(weight), the largest 70% of a row's height
    row_pt = ax.get_window_extent().height * 72.0 / fig.dpi / (n_rows + 0.2)
    side = np.maximum(0.7 * row_pt * np.sqrt(w[k] / w[k].max()), 2.0)
    squares.set_sizes(side[inside] ** 2)
    return fig


def _numbers(r, y, sd, z):
    if r["kind"] == "effect":
        i = r["row"]
        return (y[i], y[i] - z * sd[i], y[i] + z * sd[i])
    return tuple(r[key] for key in ("est", "lo", "hi") if key in r)


def _right_text(r, y, sd, z, w, width, weights):
    kind = r["kind"]
    if kind == "effect":
        i = r["row"]
        text = _ci_text(y[i], y[i] - z * sd[i], y[i] + z * sd[i], width)
        return text + (f"  {w[i]:5.1f}%" if weights else "")
    if kind == "subtotal":
        return _ci_text(r["est"], r["lo"], r["hi"], width) + (
            f"  {w[r['rows']].sum():5.1f}%" if weights else "")
    if kind == "pooled":
        return _ci_text(r["est"], r["lo"], r["hi"], width) + ("  100.0%" if weights else "")
    if kind == "pi":
        return f"{'':>{width}} [{_num(r['lo'], width)}, {_num(r['hi'], width)}]"
    return ""


def _head_text(level, width, weights):
    """Column titles over "est [lo, hi]  ww.w%" (3 width + 5 and 6 characters)."""
    text = f"Estimate [{level:g}% CI]".ljust(3 * width + 5)
    return text + (("  " + "Weight".rjust(6)) if weights else "")


def _style(ax, rows):
    """Bold headers and group titles, italic subtotal labels."""
    for t, r in zip(ax.get_yticklabels(), rows):
        if r["kind"] in ("head", "group", "pooled"):
            t.set_fontweight("bold")
        elif r["kind"] in ("subtotal", "pi"):
            t.set_fontstyle("italic")


def _diamond(ax, est, lo, hi, y, h, **kw):
    ax.fill([lo, est, hi, est], [y, y + h, y, y - h], lw=0, **kw)


# --------------------------------------------------------------------------- funnel plot
_BACKGROUND = "0.92"


def funnel_plot(res, kind=None, *, level: float = 95.0, contours=None, refline=None, ax=None,
                figsize=(5.5, 4.5)):
    """Funnel plot: each effect against its sampling standard error, as metafor's ``funnel()``.

    The y axis is the standard error ``sqrt(v_i)``, 0 at the top. ``kind="effects"``
    plots ``y_i`` around the pooled estimate ``b`` (a model without moderators, the
    default there); ``kind="residuals"`` the marginal residuals ``y_i - x_i'b`` around 0
    (the default for a meta-regression). The pseudo confidence region
    ``center -+ z_level se`` is drawn as a funnel.

    A contour-enhanced funnel (Peters et al., 2008) shades instead, around ``refline``,
    the regions where a two-sided test of a single effect would be non-significant
    (white) or significant at each level (darker to lighter grey:
    ``0.10 > p > 0.05``, ``0.05 > p > 0.01``, ``p < 0.01``).

    Parameters
    ----------
    res : MeregressResults
        A fit with known sampling variances.
    kind : {None, "effects", "residuals"}
        What is plotted; default effects without moderators, residuals with.
    level : float
        Level of the pseudo confidence region, in percent.
    contours : bool or sequence of float, optional
        True (levels 90, 95, 99) or levels in percent: draw a contour-enhanced funnel.
    refline : float, optional
        Centre of the contours (default 0); without contours a dotted reference line.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; default a new figure.
    figsize : tuple
        Size of a new figure.

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ValueError
        For a model without sampling variances, an unknown ``kind``,
        ``kind="effects"`` with moderators, or contour levels outside (0, 100).

    See Also
    --------
    MeregressResults.egger_test : the regression test of funnel-plot asymmetry.

    Examples
    --------
    >>> import mlmeta
    >>> from mlmeta import plots
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
    ...                        df, variance="var")
    >>> ax = plots.funnel_plot(res, contours=True)
    >>> ax.get_ylabel(), [t.get_text() for t in ax.get_legend().get_texts()]
    ('Standard error', ['p > 0.1', '0.05 < p < 0.1', '0.01 < p < 0.05', 'p < 0.01'])
    """
    d = _known_design(res, "funnel plot")
    pooled = res.fe_names == ["_cons"]
    kind = ("effects" if pooled else "residuals") if kind is None else kind
    if kind not in ("effects", "residuals"):
        raise ValueError(f"kind must be 'effects' or 'residuals', got {kind!r}")
    if kind == "effects" and not pooled:
        raise ValueError("kind='effects' needs a model without moderators (one pooled estimate "
                         "to centre the funnel on); use kind='residuals'")
    f = res.frame
    y = f.y if kind == "effects" else f.y - f.X @ res.params.values
    se = np.sqrt(d.variance[np.argsort(d.perm)])
    center = float(res.params["_cons"]) if kind == "effects" else 0.0
    se_max = 1.05 * float(se.max())
    s = np.array([0.0, se_max])
    fig, ax = _axes(ax, figsize)
    if contours:
        from matplotlib.patches import Patch

        levels = [90.0, 95.0, 99.0] if contours is True else sorted(float(x) for x in contours)
        if not levels or any(not 0 < lv < 100 for lv in levels):
            raise ValueError(f"contours= needs levels in percent between 0 and 100, got {contours!r}")
        ref = 0.0 if refline is None else float(refline)
        zs = [_dist.norm_ppf(0.5 + lv / 200.0) for lv in levels]
        grays = ["white"] + [f"{g:.2f}" for g in np.linspace(0.55, 0.8, len(levels) - 1)]
        ax.set_facecolor(_BACKGROUND)
        handles = []
        for i in reversed(range(len(levels))):        # widest band first, inner ones on top
            ax.fill_betweenx(s, ref - zs[i] * s, ref + zs[i] * s, color=grays[i], lw=0)
        for i in range(len(levels)):
            text = (f"p > {_p(levels[0])}" if i == 0
                    else f"{_p(levels[i])} < p < {_p(levels[i - 1])}")
            handles.append(Patch(facecolor=grays[i], edgecolor="0.5", lw=0.5, label=text))
        handles.append(Patch(facecolor=_BACKGROUND, edgecolor="0.5", lw=0.5,
                             label=f"p < {_p(levels[-1])}"))
        ax.axvline(ref, color="0.3", lw=0.7)
        half = max(zs[-1] * se_max, float(np.max(np.abs(y - ref)))) * 1.08
        ax.set_xlim(ref - half, ref + half)
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, title="two-sided p", title_fontsize=7)
    else:
        zq = _dist.norm_ppf(0.5 + confidence_level(level) / 200.0)
        ax.set_facecolor(_BACKGROUND)
        ax.fill_betweenx(s, center - zq * s, center + zq * s, color="white", lw=0)
        ax.plot(center - zq * s, s, color="0.3", lw=0.8, ls="--")
        ax.plot(center + zq * s, s, color="0.3", lw=0.8, ls="--",
                label=f"{level:g}% pseudo-confidence region")
        ax.axvline(center, color="0.3", lw=0.8)
        half = max(zq * se_max, float(np.max(np.abs(y - center)))) * 1.08
        ax.set_xlim(center - half, center + half)
        if refline is not None:
            ax.axvline(float(refline), color="0.5", lw=0.7, ls=":")
    ax.scatter(y, se, s=16, color="0.1", zorder=3)
    ax.set_ylim(se_max, 0.0)
    ax.set_ylabel("Standard error")
    ax.set_xlabel(res.depvar if kind == "effects" else "Residual value")
    fig.tight_layout()
    return ax


def _p(level):
    """The two-sided p-value at the edge of a level's region (percent -> 0.05)."""
    return f"{1.0 - level / 100.0:.3g}"


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
    cut = prof.attrs["llf_max"] - 0.5 * _dist.chi2_ppf(level / 100.0, 1)
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
