"""A known sampling covariance that couples a cluster's effects, rotated away.

The model: two nested levels, the lower one a random intercept per effect size
(metafor's ``random = ~ 1 | study/es`` with ``V``), V block-diagonal by cluster (study).
Within cluster c, V_c = Q_c diag(lambda_c) Q_c' with Q_c orthonormal, and the lower
level adds sigma^2 I, so

    Cov(y_c) = Z_c Sigma Z_c' + Q_c (diag(lambda_c) + sigma^2 I) Q_c'.

With the cluster's rows rotated, y~ = Q'y, X~ = Q'X, Z~ = Q'Z (and the effects of the
lower level rotated alike, still independent with variance sigma^2),

    Cov(y~_c) = Z~_c Sigma Z~_c' + diag(lambda_c) + sigma^2 I:

sampling variances lambda and one effect per lower group, the shape whose lower level
the engine folds into the diagonal in O(1) per effect, where the coupled V made every
cluster one dense node. The likelihood is the same function of the same parameters
(|Q_c| = 1; r'V^-1 r, X'V^-1 X and X'X are unchanged), so the optimum is searched on the
rotated model (:func:`rotated_twin`) and the model as given evaluated there
(``optimize``).
"""

from __future__ import annotations

import numpy as np

from mlmeta._core._whiten import rotate_blocks
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from mlmeta.refine import _scale_parts

__all__ = ["MAX_COND", "rotated_twin"]

#: clusters whose block of V has a condition number above this keep the Cholesky
#: whitening (the eigenvalues' rounding, about eps times the condition, would show in
#: the deviance)
MAX_COND = 1e6


def rotated_twin(model: NestedModel) -> NestedModel | None:
    """The rotated model (module docstring) of ``model``, or None where it does not
    apply: no V coupling effects of different lower groups, other than two nested levels
    (or crossed ones), a lower level other than one intercept per effect with a linear
    structure, or a cluster's block of V with a condition number above :data:`MAX_COND`.
    It takes the model's sampling scale and natural parameter sizes, so that its steps,
    probes and extra starts are the model's own."""
    d = model.design
    args = d._tree_args
    if (d.Lambda is None or args is None or d.crossed or d.n_levels != 2 or d.q[1] != 1
            or d.n_groups[1] != d.n_obs or model.residual != "known"
            or model.structs[1].kind in ("custom", "spatial") or not args["merged"].any()
            or not np.all(d.Z[1] == 1.0)):
        return None
    Vs = d.Lambda
    n, p = d.n_obs, d.X.shape[1]
    M = np.asfortranarray(np.column_stack([d.y, d.X, d.Z[0]]))
    lam = np.array(d.variance, dtype=np.float64)
    sel = np.flatnonzero(args["merged"]).astype(np.intp)
    fail = rotate_blocks(Vs.indptr.astype(np.int64), Vs.indices.astype(np.int64),
                         np.asarray(Vs.data, dtype=np.float64),
                         np.ascontiguousarray(d.group_start[0], dtype=np.intp), sel, M, lam,
                         MAX_COND)
    if fail >= 0:
        return None
    design = build_design(M[:, 0], M[:, 1:1 + p], [M[:, 1 + p:], np.ones((n, 1))],
                          [d.groups[0], np.arange(n)], variance=lam)
    twin = NestedModel(design, model.structs, model.method, fe_constraints=model.fe_constraints,
                       cluster_labels=model.cluster_labels, scale=model.scale)
    twin.__dict__["_theta_scale_parts"] = _scale_parts(model)
    return twin
