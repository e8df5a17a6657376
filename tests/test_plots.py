"""Plots render to PNG (Agg backend), show what they claim, and place no text on top of
other text on the bundled examples."""

import itertools

import numpy as np
import pytest

import mlmeta

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")

from mlmeta import plots  # noqa: E402

MAIN = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)"
SLOPES = "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)"


@pytest.fixture(scope="module")
def main(fitted):
    return fitted(MAIN, "schoolcal", se="se")


@pytest.fixture(scope="module")
def slopes(fitted):
    return fitted(SLOPES, "schoolcal", variance="var")


@pytest.fixture(scope="module")
def berkey(fitted):
    return fitted("yi ~ 0 + outcome + (0 + outcome | trial)", "berkey", variance="vi")


@pytest.fixture(scope="module")
def pupiliq(fitted):
    return fitted("stdmdiff ~ 1 + (1 | study)", "pupiliq", se="se")


def _saved(fig, path):
    assert isinstance(fig, matplotlib.figure.Figure)
    fig.savefig(path, format="png")
    plt.close(fig)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def _texts(fig):
    """Every drawn, non-empty text of the figure with its window extent (tick labels only
    for ticks inside the view limits: matplotlib keeps but does not draw the others)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = set()
    drawn = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            tol = 1e-9 * max(hi - lo, 1.0)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update((id(tick.label1), id(tick.label2)))
                if lo - tol <= tick.get_loc() <= hi + tol:
                    drawn += [t for t in (tick.label1, tick.label2) if t.get_visible()]
    others = [t for t in fig.findobj(matplotlib.text.Text) if id(t) not in ticks and t.get_visible()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in drawn + others
            if t.get_text().strip()]


def _assert_no_overlap(fig):
    """No two texts overlap (0.5 px tolerance), no text leaves the figure, and no tick
    label intrudes into the data panel of its axes."""
    texts = _texts(fig)
    W, H = fig.bbox.width, fig.bbox.height
    for text, bb in texts:
        assert bb.x0 >= -0.5 and bb.y0 >= -0.5 and bb.x1 <= W + 0.5 and bb.y1 <= H + 0.5, text
    for (ta, a), (tb, b) in itertools.combinations(texts, 2):
        overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap_x <= 0.5 or overlap_y <= 0.5, f"{ta!r} overlaps {tb!r}"
    panel = fig.axes[0].get_window_extent()
    for ax in fig.axes:
        for t in ax.get_yticklabels():
            if t.get_visible() and t.get_text().strip():
                bb = t.get_window_extent()
                assert bb.x1 <= panel.x0 + 0.5 or bb.x0 >= panel.x1 - 0.5, t.get_text()


def _ticklabels(ax):
    return [t.get_text() for t in ax.get_yticklabels()]


def test_forest_plot_grouped_by_cluster(main, tmp_path):
    fig = plots.forest_plot(main)
    ax, right = fig.axes
    left = _ticklabels(ax)
    # column title, 11 district headers with their schools, gaps, pooled estimate and PI
    assert left[:3] == ["school", "district 11", "1"]
    assert left[-2:] == ["Pooled estimate", "Prediction interval"]
    assert len(left) == 1 + 11 + 56 + 10 + 1 + 2
    texts = _ticklabels(right)
    assert texts[0].startswith("Estimate [95% CI]") and texts[0].endswith("Weight")
    b, (lo, hi) = main.params["_cons"], main.conf_int().loc["_cons"]
    assert texts[-2] == f"{b:5.2f} [{lo:5.2f}, {hi:5.2f}]  100.0%"
    pi = main.predict_interval().iloc[0]
    assert texts[-1].split() == [f"[{pi.pi_lower:.2f},", f"{pi.pi_upper:.2f}]"]
    weights = np.array([float(t.split()[-1].rstrip("%")) for t, lab in zip(texts, left)
                        if lab and lab[0].isdigit()])
    # metafor's weights(): diag(V^-1) / sum, from the dense marginal covariance
    dat = mlmeta.datasets.load("schoolcal")
    S1, S2 = main.re_cov["district"].values[0, 0], main.re_cov["district:school"].values[0, 0]
    V = np.diag(dat.se ** 2 + S2) + S1 * (dat.district.values[:, None] == dat.district.values)
    w = np.diag(np.linalg.inv(V))
    np.testing.assert_allclose(weights, (100 * w / w.sum())[main.model.design.perm], atol=0.051)
    # squares: area proportional to weight (above the minimum size)
    squares = [c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]
    sizes = squares[0].get_sizes()
    big = sizes > 4.0 + 1e-9
    ratio = sizes[big] / w[main.model.design.perm][big]
    assert big.sum() > 40 and np.ptp(ratio) < 1e-9 * ratio.mean()
    _assert_no_overlap(fig)
    _saved(fig, tmp_path / "forest.png")


def test_forest_plot_ungrouped_labels(main, tmp_path):
    fig = plots.forest_plot(main, group=False, annotate=False)
    left = _ticklabels(fig.axes[0])
    assert len(fig.axes) == 1
    assert left[:2] == ["district/school", "11/1"] and len(left) == 1 + 56 + 1 + 2
    _assert_no_overlap(fig)
    _saved(fig, tmp_path / "forest_plain.png")


def test_forest_plot_subtotals(main, tmp_path):
    fig = plots.forest_plot(main, subtotals=True, prediction=False, level=90)
    ax, right = fig.axes
    left, texts = _ticklabels(ax), _ticklabels(right)
    assert left.count("Subtotal") == 11 and left[-1] == "Pooled estimate"
    # district 11's mean: inverse-variance mean with the school variance added
    dat = mlmeta.datasets.load("schoolcal")
    rows = dat[dat.district == 11]
    s2 = main.re_cov["district:school"].values[0, 0]
    w = 1.0 / (rows.se ** 2 + s2)
    est, se = (w * rows.stdmdiff).sum() / w.sum(), 1 / np.sqrt(w.sum())
    z = 1.6448536269514722
    first = texts[left.index("Subtotal")]
    assert first.split()[:3] == [f"{est:.2f}", f"[{est - z * se:.2f},", f"{est + z * se:.2f}]"]
    assert texts[0].startswith("Estimate [90% CI]")
    _assert_no_overlap(fig)
    _saved(fig, tmp_path / "forest_sub.png")


def test_forest_plot_meta_regression_shows_fitted_values(slopes, tmp_path):
    fig = plots.forest_plot(slopes, level=90)
    ax = fig.axes[0]
    assert "Pooled estimate" not in _ticklabels(ax)
    diamonds = [p for p in ax.patches if isinstance(p, matplotlib.patches.Polygon)]
    assert len(diamonds) == 56
    fitted = np.sort([p.get_xy()[1, 0] for p in diamonds])
    expected = np.sort(slopes.predict("xb").values)
    np.testing.assert_allclose(fitted, expected, rtol=1e-12)
    _assert_no_overlap(fig)
    _saved(fig, tmp_path / "forest_reg.png")


def test_forest_plot_labels_from_a_column(berkey, pupiliq, tmp_path):
    dat = mlmeta.datasets.load("berkey")
    fig = plots.forest_plot(berkey, label="outcome", data=dat)
    left = _ticklabels(fig.axes[0])
    assert left[:4] == ["outcome", "trial 1", "PD", "AL"]
    _assert_no_overlap(fig)
    _saved(fig, tmp_path / "forest_berkey.png")
    pu = mlmeta.datasets.load("pupiliq")
    fig = plots.forest_plot(pupiliq, label=pu.author)            # a Series per data row
    left = _ticklabels(fig.axes[0])
    assert left[1] == "Rosenthal et al." and "study 1" not in left    # one row per study: no groups
    _assert_no_overlap(fig)
    _saved(fig, tmp_path / "forest_pupiliq.png")
    fig = plots.forest_plot(berkey, label="trial")                # a grouping term
    assert _ticklabels(fig.axes[0])[2] == "1"
    plt.close(fig)


def test_forest_plot_into_given_axes_and_clipping(main):
    fig, ax = plt.subplots(figsize=(8, 14))
    out = plots.forest_plot(main, ax=ax, xlim=(-0.5, 0.8), refline=None)
    assert out is fig and fig.axes[0] is ax and ax.get_xlim() == (-0.5, 0.8)
    arrows = [line for line in ax.get_lines() if line.get_marker() in ("<", ">")]
    assert arrows and all(np.isin(line.get_xdata(), (-0.5, 0.8)).all() for line in arrows)
    plt.close(fig)


def test_forest_plot_bad_input(main, slopes, fitted):
    with pytest.raises(ValueError, match="subtotals"):
        plots.forest_plot(slopes, subtotals=True)
    with pytest.raises(ValueError, match="grouped rows"):
        plots.forest_plot(main, group=False, subtotals=True)
    with pytest.raises(ValueError, match="grouping term"):
        plots.forest_plot(main, group="school")
    with pytest.raises(ValueError, match="pass data="):
        plots.forest_plot(main, label="year")
    with pytest.raises(ValueError, match="unknown column"):
        plots.forest_plot(main, label="nope", data=mlmeta.datasets.load("schoolcal"))
    with pytest.raises(ValueError, match="55 values"):
        plots.forest_plot(main, label=list(range(55)))
    mixed = fitted("stdmdiff ~ 1 + (1 | district)", "schoolcal", kind="mixed")
    with pytest.raises(ValueError, match="known sampling variances"):
        plots.forest_plot(mixed)
    with pytest.raises(ValueError, match="known sampling variances"):
        plots.funnel_plot(mixed)
    plt.close("all")


def test_funnel_plot(main, slopes, pupiliq, tmp_path):
    ax = plots.funnel_plot(main)
    assert isinstance(ax, matplotlib.axes.Axes)
    dat = mlmeta.datasets.load("schoolcal")
    pts = ax.collections[-1].get_offsets()
    np.testing.assert_allclose(pts[:, 0], dat.stdmdiff)
    np.testing.assert_allclose(pts[:, 1], dat.se)
    assert ax.get_ylim()[0] > ax.get_ylim()[1] == 0.0         # precise studies at the top
    assert ax.get_xlabel() == "stdmdiff"
    _assert_no_overlap(ax.figure)
    _saved(ax.figure, tmp_path / "funnel.png")

    ax = plots.funnel_plot(slopes)                             # residuals by default
    pts = ax.collections[-1].get_offsets()
    np.testing.assert_allclose(pts[:, 0], slopes.predict("residuals_marginal").values)
    assert ax.get_xlabel() == "Residual value"
    _saved(ax.figure, tmp_path / "funnel_resid.png")


def test_contour_enhanced_funnel_plot(pupiliq, tmp_path):
    ax = plots.funnel_plot(pupiliq, contours=True)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["p > 0.1", "0.05 < p < 0.1", "0.01 < p < 0.05", "p < 0.01"]
    _assert_no_overlap(ax.figure)
    _saved(ax.figure, tmp_path / "funnel_contours.png")
    ax = plots.funnel_plot(pupiliq, contours=[80, 95], refline=0.1)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "p > 0.2", "0.05 < p < 0.2", "p < 0.05"]
    plt.close(ax.figure)


def test_funnel_plot_bad_input(main, slopes):
    with pytest.raises(ValueError, match="kind must be"):
        plots.funnel_plot(main, kind="studies")
    with pytest.raises(ValueError, match="without moderators"):
        plots.funnel_plot(slopes, kind="effects")
    with pytest.raises(ValueError, match="between 0 and 100"):
        plots.funnel_plot(main, contours=[95, 100])


def test_caterpillar_plot(main, slopes, tmp_path):
    fig = plots.caterpillar_plot(main)
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == 11 and ax.get_ylabel() == "district"
    _saved(fig, tmp_path / "cat.png")
    _saved(plots.caterpillar_plot(slopes, "district", effect="year_c"), tmp_path / "cat2.png")
    _saved(plots.caterpillar_plot(main, "district:school"), tmp_path / "cat3.png")
    with pytest.raises(ValueError, match="grouping term"):
        plots.caterpillar_plot(main, "school")
    with pytest.raises(ValueError, match="no random effect"):
        plots.caterpillar_plot(main, effect="year_c")


def test_profile_plot_into_given_axes(main, tmp_path):
    fig, ax = plt.subplots()
    out = plots.profile_plot(main, "district:school", n=10, ax=ax)
    assert out is fig
    line = ax.get_lines()[0]
    assert len(line.get_xdata()) >= 10
    _saved(fig, tmp_path / "profile.png")


def test_overlap_check_detects_overlapping_text():
    fig, ax = plt.subplots()
    ax.set_yticks([0.5, 0.51])
    ax.set_yticklabels(["ab", "cd"])
    with pytest.raises(AssertionError, match="overlaps"):
        _assert_no_overlap(fig)
    plt.close(fig)
