"""Random-effects covariance structures: theta <-> T (a square root of Sigma).

Each structure maps its free parameters ``theta`` to a factor ``T`` with
``Sigma = T T'`` that stays well defined on the boundary (a variance at 0, a
correlation at +-1), gives ``dT/dtheta`` exactly, and converts to and from the
reporting metric (standard deviations and correlations, Stata's default).

* ``identity``:      T = s I                       theta = (s),          s >= 0
* ``independent``:   T = diag(s_1..s_q)             theta = (s_i),        s_i >= 0
* ``exchangeable``:  T = a I + g 1 1'               theta = (a, g),       a >= 0
      Sigma = a^2 I + (2 a g + q g^2) 1 1'  (every exchangeable PSD matrix)
* ``unstructured``:  T lower triangular             theta = vech(T),      diag >= 0
"""

from __future__ import annotations

import numpy as np

__all__ = ["CovStruct", "make_structure", "STRUCTURES"]

STRUCTURES = ("independent", "exchangeable", "identity", "unstructured")


class CovStruct:
    """Base class. Subclasses define ``n_theta``, ``T``, ``dT``, ``from_Sigma``,
    ``lower``/``upper`` and ``report_params``."""

    kind: str = ""
    title: str = ""

    def __init__(self, effect_names):
        self.effect_names = list(effect_names)
        self.q = len(self.effect_names)

    # -- parameterisation -------------------------------------------------
    n_theta: int = 0

    def T(self, theta):  # pragma: no cover - abstract
        raise NotImplementedError

    def dT(self, theta):
        """(n_theta, q, q) derivatives; every structure here is linear in theta."""
        out = np.zeros((self.n_theta, self.q, self.q))
        zero = np.zeros(self.n_theta)
        for i in range(self.n_theta):
            e = zero.copy()
            e[i] = 1.0
            out[i] = self.T(e) - self.T(zero)
        return out

    def Sigma(self, theta):
        T = self.T(theta)
        return T @ T.T

    def from_Sigma(self, Sigma):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def bounds(self):
        return list(zip(self.lower, self.upper))

    # -- reporting ----------------------------------------------------------
    def report_params(self):
        """List of (kind, label-effects) for the reporting metric, in display order.

        kind is "sd" (effects: tuple of effect indices sharing that SD) or
        "corr" (effects: tuple of (i, j) pairs sharing that correlation)."""
        raise NotImplementedError  # pragma: no cover

    def report_values(self, theta):
        """SDs and correlations, one value per :meth:`report_params` entry."""
        S = self.Sigma(theta)
        sd = np.sqrt(np.clip(np.diag(S), 0.0, None))
        out = []
        for kind, eff in self.report_params():
            if kind == "sd":
                out.append(sd[eff[0]])
            else:
                i, j = eff[0]
                out.append(S[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else 0.0)
        return np.asarray(out)

    def Sigma_from_report(self, values):
        """Covariance matrix from SD/correlation values in :meth:`report_params` order."""
        sd = np.zeros(self.q)
        R = np.eye(self.q)
        for (kind, eff), v in zip(self.report_params(), values):
            if kind == "sd":
                sd[list(eff)] = v
            else:
                for i, j in eff:
                    R[i, j] = R[j, i] = v
        return sd[:, None] * R * sd[None, :]

    def theta_from_report(self, values):
        return self.from_Sigma(self.Sigma_from_report(values))

    def labels(self, variance=False):
        """Stata-style labels: sd(x), corr(x,_cons) or var(x), cov(x,_cons)."""
        out = []
        for kind, eff in self.report_params():
            if kind == "sd":
                names = " ".join(self.effect_names[i] for i in eff)
                out.append(f"{'var' if variance else 'sd'}({names})")
            else:
                pairs = " ".join(f"{self.effect_names[i]},{self.effect_names[j]}" for i, j in eff)
                out.append(f"{'cov' if variance else 'corr'}({pairs})")
        return out

    def __repr__(self):
        return f"{type(self).__name__}({self.effect_names})"


class Identity(CovStruct):
    kind, title = "identity", "Identity"
    n_theta = 1

    @property
    def lower(self):
        return np.zeros(1)

    @property
    def upper(self):
        return np.full(1, np.inf)

    def T(self, theta):
        return float(theta[0]) * np.eye(self.q)

    def from_Sigma(self, Sigma):
        return np.array([np.sqrt(max(float(np.mean(np.diag(Sigma))), 0.0))])

    def report_params(self):
        return [("sd", tuple(range(self.q)))]


class Independent(CovStruct):
    kind, title = "independent", "Independent"

    @property
    def n_theta(self):
        return self.q

    @property
    def lower(self):
        return np.zeros(self.q)

    @property
    def upper(self):
        return np.full(self.q, np.inf)

    def T(self, theta):
        return np.diag(np.asarray(theta, dtype=float))

    def from_Sigma(self, Sigma):
        return np.sqrt(np.clip(np.diag(Sigma), 0.0, None))

    def report_params(self):
        return [("sd", (i,)) for i in range(self.q)]


class Exchangeable(CovStruct):
    kind, title = "exchangeable", "Exchangeable"
    n_theta = 2

    @property
    def lower(self):
        return np.array([0.0, -np.inf])

    @property
    def upper(self):
        return np.full(2, np.inf)

    def T(self, theta):
        a, g = float(theta[0]), float(theta[1])
        return a * np.eye(self.q) + g * np.ones((self.q, self.q))

    def from_Sigma(self, Sigma):
        q = self.q
        v = max(float(np.mean(np.diag(Sigma))), 0.0)
        c = float((Sigma.sum() - np.trace(Sigma)) / (q * (q - 1))) if q > 1 else 0.0
        c = min(max(c, -v / (q - 1) if q > 1 else 0.0), v)
        a = np.sqrt(max(v - c, 0.0))
        g = (-a + np.sqrt(max(a * a + q * c, 0.0))) / q
        return np.array([a, g])

    def report_params(self):
        pairs = tuple((i, j) for i in range(self.q) for j in range(i + 1, self.q))
        out = [("sd", tuple(range(self.q)))]
        if pairs:
            out.append(("corr", pairs))
        return out


class Unstructured(CovStruct):
    kind, title = "unstructured", "Unstructured"

    def __init__(self, effect_names):
        super().__init__(effect_names)
        self._rows, self._cols = np.tril_indices(self.q)
        order = np.lexsort((self._rows, self._cols))      # column-major vech (lme4 order)
        self._rows, self._cols = self._rows[order], self._cols[order]

    @property
    def n_theta(self):
        return self.q * (self.q + 1) // 2

    @property
    def lower(self):
        return np.where(self._rows == self._cols, 0.0, -np.inf)

    @property
    def upper(self):
        return np.full(self.n_theta, np.inf)

    def T(self, theta):
        T = np.zeros((self.q, self.q))
        T[self._rows, self._cols] = theta
        return T

    def from_Sigma(self, Sigma):
        S = 0.5 * (Sigma + Sigma.T)
        try:
            T = np.linalg.cholesky(S)
        except np.linalg.LinAlgError:
            w, U = np.linalg.eigh(S)
            w = np.clip(w, 0.0, None)
            # a PSD square root made lower triangular by QR of its transpose
            M = U * np.sqrt(w)
            Q, Rt = np.linalg.qr(M.T)
            T = Rt.T
            T = T * np.where(np.diag(T) < 0, -1.0, 1.0)[None, :]
        return T[self._rows, self._cols].copy()

    def report_params(self):
        out = [("sd", (i,)) for i in range(self.q)]
        out += [("corr", ((i, j),)) for i in range(self.q) for j in range(i + 1, self.q)]
        return out


_CLASSES = {"identity": Identity, "independent": Independent,
            "exchangeable": Exchangeable, "unstructured": Unstructured}


def make_structure(spec, effect_names, correlated=True):
    """Build a structure from a name (or None: the bar's default).

    Defaults follow lme4's bars: ``|`` unstructured, ``||`` independent; a
    single effect is always ``identity`` (Stata labels it so)."""
    q = len(effect_names)
    if spec is None:
        spec = "unstructured" if correlated else "independent"
    if isinstance(spec, CovStruct):
        if spec.q != q:
            raise ValueError(f"covariance structure has {spec.q} effects, the term has {q}")
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"unknown covariance structure {spec!r}; use one of {', '.join(STRUCTURES)}")
    key = spec.strip().lower()
    matches = [s for s in STRUCTURES if s.startswith(key)] if key else []
    if len(matches) != 1:
        raise ValueError(f"unknown covariance structure {spec!r}; use one of {', '.join(STRUCTURES)}")
    key = matches[0]
    if q == 1 or (key == "exchangeable" and q == 1):
        return Identity(effect_names)
    return _CLASSES[key](effect_names)
