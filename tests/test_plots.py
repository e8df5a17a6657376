"""Plots render to PNG (Agg backend) and return their Figure."""

import pytest


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


def _saved(fig, path):
    assert isinstance(fig, matplotlib.figure.Figure)
    fig.savefig(path, format="png")
    plt.close(fig)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_forest_plot(main, slopes, tmp_path):
    fig = plots.forest_plot(main)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 57 and labels[-1] == "Pooled" and labels[0] == "11/1"
    _saved(fig, tmp_path / "forest.png")
    _saved(plots.forest_plot(slopes, level=90), tmp_path / "forest_reg.png")


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
