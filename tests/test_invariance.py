"""Invariances of the fit: shifting the outcome or a moderator (with an intercept) and
rescaling a moderator leave the likelihood, the slope and its standard error unchanged
(the design's working basis keeps the cross-products exact)."""

import pytest

import mlmeta

F = "{y} ~ {x} + (1 | district) + (1 | district:school)"


@pytest.fixture(scope="module")
def reference(schoolcal):
    return {m: mlmeta.meregress(F.format(y="stdmdiff", x="year_c"), schoolcal, variance="var",
                                method=m) for m in ("reml", "ml")}


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("y_shift,x_shift,x_scale", [(1e5, 0.0, 1.0), (0.0, 1e7, 1.0),
                                                     (0.0, 0.0, 1e-6), (0.0, 0.0, 1e6),
                                                     (-3e4, 2e6, 1e3)])
def test_shifts_and_scales_change_nothing(schoolcal, reference, method, y_shift, x_shift,
                                          x_scale):
    ref = reference[method]
    df = schoolcal.assign(yy=schoolcal.stdmdiff + y_shift,
                          xx=schoolcal.year_c * x_scale + x_shift)
    res = mlmeta.meregress(F.format(y="yy", x="xx"), df, variance="var", method=method)
    assert res.converged
    assert res.llf == pytest.approx(ref.llf, rel=1e-8)
    assert res.params["xx"] * x_scale == pytest.approx(ref.params["year_c"], rel=1e-7)
    assert res.bse["xx"] * x_scale == pytest.approx(ref.bse["year_c"], rel=1e-7)
    for g in ("district", "district:school"):
        assert res.re_cov[g].values[0, 0] == pytest.approx(ref.re_cov[g].values[0, 0], rel=1e-6)
    # the intercept moves with the shifts: _cons = ref - slope * shift + y_shift
    cons = ref.params["_cons"] - ref.params["year_c"] * x_shift / x_scale + y_shift
    assert res.params["_cons"] == pytest.approx(cons, rel=1e-7, abs=1e-7)


def test_mixed_model_outcome_shift(schoolcal):
    """Raw-data mixed model: an outcome offset of 1e6 changes nothing."""
    f = "{y} ~ year_c + (1 | district)"
    a = mlmeta.mixed(f.format(y="stdmdiff"), schoolcal)
    b = mlmeta.mixed(f.format(y="yy"), schoolcal.assign(yy=schoolcal.stdmdiff + 1e6))
    assert b.llf == pytest.approx(a.llf, rel=1e-8)
    assert b.bse["year_c"] == pytest.approx(a.bse["year_c"], rel=1e-7)
    assert b.scale == pytest.approx(a.scale, rel=1e-7)


@pytest.mark.parametrize("kind", ["meregress", "mixed"])
def test_row_order_and_group_relabelling_change_nothing(schoolcal, kind):
    """Rows in another order and groups under other labels: the same fit."""
    import numpy as np

    f = "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)"
    rng = np.random.default_rng(7)
    perm = rng.permutation(len(schoolcal))
    relabel = {d: f"d{k}" for k, d in enumerate(rng.permutation(schoolcal.district.unique()))}
    other = schoolcal.iloc[perm].assign(district=lambda d: d.district.map(relabel),
                                        school=lambda d: d.school * 7 + 3)
    if kind == "meregress":
        def fit(data):
            return mlmeta.meregress(f, data, variance="var")
    else:                      # raw data: one row per school would not be identified
        f = "stdmdiff ~ year_c + (1 + year_c | district)"

        def fit(data):
            return mlmeta.mixed(f, data)
    a, b = fit(schoolcal), fit(other)
    assert b.llf == pytest.approx(a.llf, rel=1e-9)
    np.testing.assert_allclose(b.params.values, a.params.values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b.bse.values, a.bse.values, rtol=1e-6)
    for g in a.re_cov:
        np.testing.assert_allclose(b.re_cov[g].values, a.re_cov[g].values, rtol=1e-5, atol=1e-9)
