"""A known sampling covariance that couples a cluster's effects, rotated away.

The model: nested levels, the lowest one a random intercept per effect size (metafor's
``random = ~ 1 | study/es`` with ``V``), V block-diagonal by the groups of the level
above the lowest (the studies; in ``~ 1 | district/school/es``, the schools). Within
such a group c, V_c = Q_c diag(lambda_c) Q_c' with Q_c orthonormal, and the lowest
level adds sigma^2 I, so

    Cov(y_c) = sum_l Z_l,c Sigma_l Z_l,c' + Q_c (diag(lambda_c) + sigma^2 I) Q_c'.

With the group's rows rotated, y~ = Q'y, X~ = Q'X, Z~ = Q'Z (every level above the
lowest; the rows stay in their groups, so the levels stay nested) and the effects of the
lowest level rotated alike (still independent, variance sigma^2),

    Cov(y~_c) = sum_l Z~_l,c Sigma_l Z~_l,c' + diag(lambda_c) + sigma^2 I:

sampling variances lambda and one effect per lowest group, the shape whose lowest level
the engine folds into the diagonal in O(1) per effect, where the coupled V made every
top-level cluster one dense node. The likelihood is the same function of the same
parameters (|Q_c| = 1; r'V^-1 r, X'V^-1 X and X'X are unchanged), so the optimum is searched on the
rotated model (:func:`rotated_twin`) and the model as given evaluated there
(``optimize``).
"""

from __future__ import annotations

import numpy as np

from mlmeta._core._whiten import rotate_blocks, rotate_by
from mlmeta.design import build_design
from mlmeta.model import NestedModel
from mlmeta.refine import _scale_parts

__all__ = ["MAX_COND", "Rotation", "rotated_twin"]

#: clusters whose block of V has a condition number above this keep the Cholesky
#: whitening (the eigenvalues' rounding, about eps times the condition, would show in
#: the deviance)
MAX_COND = 1e6


class Rotation:
    """The blocks' eigenvectors Q_c of a rotated model: :meth:`apply` takes outcomes in
    the model's sorted row order to the rotated model's (Q_c' per block)."""

    def __init__(self, Q, qptr, starts, sel):
        self.Q, self.qptr, self.starts, self.sel = Q, qptr, starts, sel

    def apply(self, Y) -> np.ndarray:
        """Q'Y per block, for Y (n_obs x m) in the sorted order of the model's design."""
        out = np.array(Y, dtype=np.float64, order="F", copy=True)
        if out.ndim == 1:
            out = out[:, None]
        rotate_by(self.Q, self.qptr, self.starts, self.sel, out)
        return out.reshape(np.shape(Y))


def rotated_twin(model: NestedModel) -> NestedModel | None:
    """The rotated model (module docstring) of ``model``, or None where it does not
    apply: no V coupling effects of different lowest groups, V coupling effects of
    different groups of the level above the lowest, crossed levels, a lowest level other
    than one intercept per effect with a linear structure, or a block of V with a
    condition number above :data:`MAX_COND`.
    It takes the model's sampling scale and natural parameter sizes, so that its steps,
    probes and extra starts are the model's own, and holds the rotation (``rotation``, a
    :class:`Rotation`). Made once per model (kept on it)."""
    if "_rotated_twin" in model.__dict__:
        return model.__dict__["_rotated_twin"]
    twin = _rotated_twin(model)
    model.__dict__["_rotated_twin"] = twin
    return twin


def _rotated_twin(model):
    d = model.design
    args = d._tree_args
    L = d.n_levels
    if (d.Lambda is None or args is None or d.crossed or L < 2 or d.q[L - 1] != 1
            or d.n_groups[L - 1] != d.n_obs or model.residual != "known"
            or model.structs[L - 1].kind in ("custom", "spatial") or not args["merged"].any()
            or not np.all(d.Z[L - 1] == 1.0)):
        return None
    # the blocks: the groups of the level above the lowest, which V must not couple
    Vs = d.Lambda
    coo = Vs.tocoo()
    off = (coo.row != coo.col) & (coo.data != 0)
    block = np.asarray(d.groups[L - 2])
    if np.any(block[coo.row[off]] != block[coo.col[off]]):
        return None
    n, p = d.n_obs, d.X.shape[1]
    M = np.asfortranarray(np.column_stack([d.y, d.X, *d.Z[:L - 1]]))
    lam = np.array(d.variance, dtype=np.float64)
    starts = np.ascontiguousarray(d.group_start[L - 2], dtype=np.intp)
    sel = np.unique(block[coo.row[off]]).astype(np.intp)
    sizes = starts[sel + 1] - starts[sel]
    qptr = np.concatenate([[0], np.cumsum(sizes * sizes)]).astype(np.intp)
    Q = np.empty(qptr[-1])
    fail = rotate_blocks(Vs.indptr.astype(np.int64), Vs.indices.astype(np.int64),
                         np.asarray(Vs.data, dtype=np.float64), starts, sel, M, lam, MAX_COND,
                         Q, qptr)
    if fail >= 0:
        return None
    Z, col = [], 1 + p
    for z in d.Z[:L - 1]:
        Z.append(M[:, col:col + z.shape[1]])
        col += z.shape[1]
    design = build_design(M[:, 0], M[:, 1:1 + p], Z + [np.ones((n, 1))],
                          list(d.groups[:L - 1]) + [np.arange(n)], variance=lam)
    twin = NestedModel(design, model.structs, model.method, fe_constraints=model.fe_constraints,
                       cluster_labels=model.cluster_labels, scale=model.scale)
    twin.__dict__["_theta_scale_parts"] = _scale_parts(model)
    twin.rotation = Rotation(Q, qptr, starts, sel)
    return twin
