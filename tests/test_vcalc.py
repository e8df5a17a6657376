"""vcalc() against metafor's vcalc() and clubSandwich's impute_covariance_matrix()
(stored by tests/reference/make_robust_references.R)."""

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import mlmeta
from mlmeta.vcalc import vcalc
from references import data_path, load

REF = {c["name"]: c for c in load("robust_reference")["vcalc"]}
DATA = pd.read_csv(data_path("robust_vcalc.csv"))


def _call(case, **extra):
    a = case["args"]
    rho = a.get("rho")
    if isinstance(rho, list):
        rho = tuple(rho)
    if "rho_within" in a:
        rho = (a["rho_within"], pd.DataFrame(a["rho_between"], index=a["types"], columns=a["types"]))
    data = mlmeta.datasets.load("berkey") if a.get("data") == "berkey" else DATA
    return vcalc("vi", a.get("cluster", "cluster"), rho=rho, obs=a.get("obs"), type=a.get("type"),
                 time=a.get("time"), phi=a.get("phi"), data=data, **extra)


@pytest.mark.parametrize("name", [n for n, c in REF.items() if not c["warnings"]])
def test_matches_metafor(name):
    V = _call(REF[name])
    assert sparse.isspmatrix_csr(V)
    np.testing.assert_allclose(V.toarray(), np.array(REF[name]["V"]), rtol=1e-13, atol=1e-16)


def test_constant_correlation_is_the_default():
    """vcalc(v, cluster, rho) = clubSandwich's impute_covariance_matrix(vi, cluster, r)."""
    V = vcalc(DATA["vi"], DATA["cluster"], rho=0.6)
    np.testing.assert_allclose(V.toarray(), np.array(REF["impute_constant"]["V"]), rtol=1e-13)


def test_not_positive_definite_names_the_clusters():
    ref = REF["type_only_npd"]
    bad = sorted(w.split("cluster ")[1].rstrip(".") for w in ref["warnings"])
    with pytest.raises(ValueError, match="not positive definite") as err:
        _call(ref)
    for b in bad:
        assert repr(b) in str(err.value)
    ok = [c for c in DATA["cluster"].unique() if c not in bad]
    assert not any(repr(c) in str(err.value) for c in ok)
    V = _call(ref, check_pd=False)                            # as metafor, when asked to
    np.testing.assert_allclose(V.toarray(), np.array(ref["V"]), rtol=1e-13)


def test_blocks_and_row_order():
    V = vcalc("vi", "cluster", rho=0.4, time="time", phi=0.9, data=DATA).toarray()
    blocks = vcalc("vi", "cluster", rho=0.4, time="time", phi=0.9, data=DATA, blocks=True)
    labels = sorted(DATA["cluster"].unique())
    assert len(blocks) == len(labels)
    for lab, B in zip(labels, blocks):
        idx = np.flatnonzero(DATA["cluster"] == lab)
        np.testing.assert_array_equal(B, V[np.ix_(idx, idx)])
    perm = np.random.default_rng(0).permutation(len(DATA))
    V2 = vcalc("vi", "cluster", rho=0.4, time="time", phi=0.9, data=DATA.iloc[perm]).toarray()
    np.testing.assert_array_equal(V2, V[np.ix_(perm, perm)])


def test_pair_specs_agree():
    base = REF["type_matrix_obs"]["args"]
    R = pd.DataFrame(base["rho_between"], index=base["types"], columns=base["types"])
    as_frame = vcalc("vi", "cluster", rho=(0.8, R), obs="esid", type="type", data=DATA)
    as_dict = vcalc("vi", "cluster", rho=(0.8, {("A", "B"): 0.3, ("A", "C"): 0.5, ("C", "B"): 0.6}),
                    obs="esid", type="type", data=DATA)
    as_array = vcalc("vi", "cluster", rho=(0.8, R.to_numpy()), obs="esid", type="type", data=DATA)
    for other in (as_dict, as_array):
        np.testing.assert_array_equal(as_frame.toarray(), other.toarray())


def test_subgroups_are_independent():
    sub = np.where(DATA["esid"] % 2 == 0, "even", "odd")
    V = vcalc(DATA["vi"], DATA["cluster"], rho=0.5, subgroup=sub).toarray()
    cl = DATA["cluster"].to_numpy()
    same = (cl[:, None] == cl[None, :]) & (sub[:, None] == sub[None, :])
    assert np.all(V[~same] == 0)
    off = same & ~np.eye(len(DATA), dtype=bool)
    np.testing.assert_allclose(V[off], 0.5 * np.sqrt(np.outer(DATA["vi"], DATA["vi"]))[off])


def test_validation():
    v, cl = DATA["vi"].to_numpy(), DATA["cluster"].to_numpy()
    with pytest.raises(ValueError, match="length"):
        vcalc(v[:-1], cl, rho=0.5)
    with pytest.raises(ValueError, match=r"\(-1, 1\)"):
        vcalc(v, cl, rho=1.0)
    with pytest.raises(ValueError, match=r"\(-1, 1\)"):
        vcalc(v, cl, rho=(0.5, 1.2), type=DATA["type"])
    with pytest.raises(ValueError, match="positive"):
        vcalc(-v, cl, rho=0.5)
    with pytest.raises(ValueError, match="phi= needs time="):
        vcalc(v, cl, rho=0.5, phi=0.5)
    with pytest.raises(ValueError, match="needs phi="):
        vcalc(v, cl, time=DATA["time"])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vcalc(v, cl, time=DATA["time"], phi=1.5)
    with pytest.raises(ValueError, match="rho=\\(within, between\\)"):
        vcalc(v, cl, rho=0.5, type=DATA["type"], obs=DATA["esid"])
    with pytest.raises(ValueError, match="no correlation given"):
        vcalc(v, cl, rho={("A", "B"): 0.3}, type=DATA["type"])
    with pytest.raises(ValueError, match="missing"):
        vcalc(v, np.where(np.arange(len(v)) == 3, None, cl), rho=0.5)
    with pytest.raises(ValueError, match="no data="):
        vcalc("vi", "cluster", rho=0.5)
    V = vcalc(1.0, cl, rho=0.3)                                 # a scalar variance for all rows
    assert np.all(V.diagonal() == 1.0)
