"""mlmeta.simstudy: grid expansion, metrics, determinism under any parallelism,
incremental saving and resuming, duck-typed executors (a fake one and Dask)."""

import importlib.util

import numpy as np
import pandas as pd
import pytest

from mlmeta import simstudy
from mlmeta.ols import ols
from mlmeta.simulate import lmm
from mlmeta.twostage import two_stage

GRID = {"n_groups": [8, 12], "n_obs": [6], "group_sd": [0.2, 1.0]}
FAST = ("mixed_intercept", "ols_cluster", "two_stage_ols", "two_stage_meta")


def _strip(frame):
    return frame.drop(columns=["seconds"]).reset_index(drop=True)


class _Future:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class FakeExecutor:
    """Anything with submit(fn, *args) -> object with .result()."""

    def __init__(self):
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        return _Future(fn, args)


def test_cells_product_and_defaults():
    cs = simstudy.cells({"n_groups": [10, 30], "n_obs": 5, "group_sd": [0.1, 1.0, 4.0],
                         "null": [False, True]})
    assert len(cs) == 12
    assert cs[0] == {"n_groups": 10, "n_obs": 5, "group_sd": 0.1, "n_coef": 3, "noise_sd": 1.0, "null": False}
    assert len({simstudy.cell_label(c) for c in cs}) == 12
    assert len(simstudy.cells(simstudy.ESSAY_GRID)) == 45
    with pytest.raises(ValueError, match="unknown grid"):
        simstudy.cells({"n_groups": [10], "n_obs": [5], "group_sd": [1], "groups": 3})
    with pytest.raises(ValueError, match="needs 'n_obs'"):
        simstudy.cells({"n_groups": [10], "group_sd": [1]})


def test_replicate_metrics_match_direct_fits():
    cell = simstudy.cells({"n_groups": 15, "n_obs": 8, "group_sd": 0.5})[0]
    rows = simstudy.replicate(cell, 3, seed=7, strategies=FAST, detail=True)
    rng = np.random.default_rng(simstudy.replicate_seed(7, cell, 3))
    data, _, beta = lmm(8, 3, 15, group_sd=0.5, seed=rng)
    order = ["_cons", "IV1", "IV2", "IV3"]
    direct = {"ols_cluster": ols("DV ~ IV1 + IV2 + IV3", data, cluster="Group", type="CR1S"),
              "two_stage_ols": two_stage("DV ~ IV1 + IV2 + IV3", data, "Group")}
    for row in rows:
        if row["strategy"] not in direct:
            continue
        res = direct[row["strategy"]]
        b, se = res.params[order].to_numpy(), res.bse[order].to_numpy()
        assert row["coef_abs_err"] == pytest.approx(np.abs(b - beta).sum(), rel=1e-12)
        assert row["se_sum"] == pytest.approx(se.sum(), rel=1e-12)
        assert row["t_sum"] == pytest.approx(np.abs(b / se).sum(), rel=1e-12)
        ci = res.conf_int().loc[order]
        cov = ((ci["lower"] <= beta) & (beta <= ci["upper"])).sum()
        assert row["n_covered"] == cov and row["coverage"] == cov / 4
        assert row["n_reject"] == int((res.pvalues[order[1:]] < 0.05).sum())
        assert row["est_IV2"] == pytest.approx(b[2]) and row["true_Intercept"] == beta[0]
        assert row["fit_success"] and row["error"] == ""
    assert {r["strategy"] for r in rows} == set(FAST)


def test_null_sets_slopes_to_zero():
    cell = simstudy.cells({"n_groups": 20, "n_obs": 10, "group_sd": 0.3, "null": True})[0]
    rows = simstudy.replicate(cell, 0, seed=1, strategies=("ols_cluster",), detail=True)
    assert rows[0]["true_IV1"] == rows[0]["true_IV3"] == 0.0 and rows[0]["true_Intercept"] != 0.0


def test_deterministic_whatever_the_parallelism():
    serial = simstudy.run(GRID, FAST, n_sim=3, seed=11, n_jobs=1, progress=False)
    fake = FakeExecutor()
    viafake = simstudy.run(GRID, FAST, n_sim=3, seed=11, executor=fake, chunksize=2, progress=False)
    procs = simstudy.run(GRID, FAST, n_sim=3, seed=11, n_jobs=2, chunksize=1, progress=False)
    assert len(serial) == 4 * 3 * len(FAST)
    assert fake.submitted == 4 * 2
    pd.testing.assert_frame_equal(_strip(serial), _strip(viafake))
    pd.testing.assert_frame_equal(_strip(serial), _strip(procs))
    other = simstudy.run(GRID, FAST, n_sim=3, seed=12, n_jobs=1, progress=False)
    assert not np.allclose(other["coef_abs_err"], serial["coef_abs_err"])
    # a replicate does not depend on the rest of the grid
    one = simstudy.run({"n_groups": [12], "n_obs": [6], "group_sd": [1.0]}, FAST, n_sim=3, seed=11,
                       n_jobs=1, progress=False)
    sub = serial[(serial["n_groups"] == 12) & (serial["group_sd"] == 1.0)]
    pd.testing.assert_frame_equal(_strip(one), _strip(sub))


def test_incremental_csv_and_resume(tmp_path):
    path = str(tmp_path / "study.csv")
    first = simstudy.run(GRID, FAST[:2], n_sim=2, seed=3, n_jobs=1, path=path, progress=False)
    assert len(pd.read_csv(path)) == len(first) == 4 * 2 * 2
    fake = FakeExecutor()
    # more replicates and one more strategy: only the missing work is submitted
    full = simstudy.run(GRID, FAST[:3], n_sim=3, seed=3, executor=fake, chunksize=1, path=path,
                        progress=False)
    assert fake.submitted == 4 * 3                 # every (cell, replicate) lacks something
    ref = simstudy.run(GRID, FAST[:3], n_sim=3, seed=3, n_jobs=1, progress=False)
    cols = [c for c in ref.columns if c not in ("seconds", "error")]
    pd.testing.assert_frame_equal(full[cols].reset_index(drop=True), ref[cols].reset_index(drop=True),
                                  check_dtype=False)
    fake2 = FakeExecutor()
    again = simstudy.run(GRID, FAST[:3], n_sim=3, seed=3, executor=fake2, path=path, progress=False)
    assert fake2.submitted == 0 and len(again) == len(ref)
    assert len(pd.read_csv(path)) == len(ref)
    with pytest.raises(ValueError, match="another seed"):
        simstudy.run(GRID, FAST[:3], n_sim=3, seed=4, n_jobs=1, path=path, progress=False)


@pytest.mark.skipif(not (importlib.util.find_spec("pyarrow") or importlib.util.find_spec("fastparquet")),
                    reason="no parquet engine installed")
def test_parquet(tmp_path):
    path = str(tmp_path / "study.parquet")
    a = simstudy.run(GRID, FAST[:2], n_sim=2, seed=3, n_jobs=1, path=path, progress=False)
    assert len(pd.read_parquet(path)) == len(a)


@pytest.mark.skipif(importlib.util.find_spec("distributed") is None, reason="dask.distributed not installed")
def test_dask_client():
    from distributed import Client
    serial = simstudy.run(GRID, FAST, n_sim=2, seed=5, n_jobs=1, progress=False)
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        viadask = simstudy.run(GRID, FAST, n_sim=2, seed=5, executor=client, chunksize=1, progress=False)
    pd.testing.assert_frame_equal(_strip(serial), _strip(viadask))


def test_failed_fit_is_a_row(capsys):
    res = simstudy.run({"n_groups": [6], "n_obs": [3], "group_sd": [0.5]}, ("two_stage_meta", "ols_cluster"),
                       n_sim=1, seed=0, n_jobs=1, progress=True)
    meta = res[res["strategy"] == "two_stage_meta"].iloc[0]
    assert not meta["fit_success"] and "ValueError" in meta["error"] and np.isnan(meta["coef_abs_err"])
    assert res[res["strategy"] == "ols_cluster"].iloc[0]["fit_success"]
    assert "1/1" in capsys.readouterr().err            # progress on stderr


def test_mixed_strategies_and_summaries():
    res = simstudy.run({"n_groups": [10], "n_obs": [8], "group_sd": [0.5, 2.0]}, n_sim=2, seed=2,
                       n_jobs=1, progress=False)
    assert set(res["strategy"]) == set(simstudy.STRATEGIES)
    mixed = res[res["strategy"].str.startswith("mixed")]
    assert mixed["fit_success"].all() and mixed["singular"].notna().all()
    assert res[res["strategy"] == "ols_cluster"]["singular"].isna().all()
    summ = simstudy.summarize(res)
    assert len(summ) == 2 * len(simstudy.STRATEGIES) and (summ["n_sim"] == 2).all()
    assert {"coef_abs_err", "coverage", "reject_rate", "fit_success"} <= set(summ.columns)
    # t statistics from Satterthwaite df: reject_rate consistent with the stored t
    assert ((res["coverage"] >= 0) & (res["coverage"] <= 1)).all()


def test_plot():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    res = simstudy.run({"n_groups": [8, 12], "n_obs": [6, 10], "group_sd": [0.2, 1.0]}, FAST[:2], n_sim=2,
                       seed=1, n_jobs=1, progress=False)
    figs = simstudy.plot(res, ["coef_abs_err", "fit_success"])
    assert set(figs) == {"coef_abs_err", "fit_success"}
    assert len(figs["coef_abs_err"].axes) == 4
    import matplotlib.pyplot as plt
    plt.close("all")


def test_unknown_strategy_and_option():
    with pytest.raises(ValueError, match="unknown strategies"):
        simstudy.run(GRID, ("lmer",), n_sim=1, progress=False)
    with pytest.raises(ValueError, match="unknown options"):
        simstudy.run(GRID, FAST, n_sim=1, options={"type": "CR2"}, progress=False)
