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
* ``custom``:        T = D chol(R)                  theta = (free SDs, free correlations)
      with fixed values and equality labels (Stata's ``covariance(custom matname)``);
      R_ij = rho_c^(d_ij) with lags d (d = 1: a pattern; metafor's AR, HAR and CAR are
      powers, see :mod:`mlmeta.covfactor`)
* ``AR``, ``HAR``, ``CAR``, ``HCS``: metafor's structures over a factor's levels, custom
      patterns (:class:`FactorLevels`) with theta = (SDs, rho)
"""

from __future__ import annotations

import numpy as np

from mlmeta.covfactor import FACTOR_STRUCTURES, level_structure

__all__ = ["CovStruct", "Custom", "AR", "HAR", "CAR", "HCS", "make_structure", "STRUCTURES"]

STRUCTURES = ("independent", "exchangeable", "identity", "unstructured")


#: CovStruct.dT's constant derivatives per (structure type, q, n_theta)
_LINEAR_DT: dict = {}


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
        """(n_theta, q, q) derivatives; every structure using this method is linear in
        theta with T a function of theta and the number of effects only, so the constant
        derivatives are made once per structure type and size (a read-only array)."""
        key = (type(self), self.q, self.n_theta)
        out = _LINEAR_DT.get(key)
        if out is None:
            out = np.zeros((self.n_theta, self.q, self.q))
            zero = np.zeros(self.n_theta)
            for i in range(self.n_theta):
                e = zero.copy()
                e[i] = 1.0
                out[i] = self.T(e) - self.T(zero)
            out.flags.writeable = False
            _LINEAR_DT[key] = out
        return out

    def Sigma(self, theta):
        T = self.T(theta)
        return T @ T.T

    def engine_spec(self) -> dict:
        """What the fitting engine needs: the kind and, for structures linear in theta,
        the constant derivatives dT/dtheta (T = sum_k theta_k dT_k)."""
        return {"kind": self.kind, "q": self.q, "n_theta": self.n_theta,
                "dT": self.dT(np.zeros(self.n_theta))}

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


#: below this |rho|, d rho^(d - 1) with d < 1 (infinite at rho = 0) is taken at it
RHO_FLOOR = 1e-8


def dpower(rho, d):
    """d rho^d / d rho = d rho^(d - 1), taken at ``RHO_FLOOR`` when d < 1 and |rho| is below
    it (the one-sided derivative at 0 is infinite); d = 1 gives 1 (a pattern)."""
    if d < 1.0 and abs(rho) < RHO_FLOOR:
        rho = RHO_FLOOR
    return 1.0 if d == 1.0 else float(d * np.power(rho, d - 1.0))


def _chol_lower(R):
    """Cholesky factor of a correlation matrix; FloatingPointError if not positive definite."""
    try:
        return np.linalg.cholesky(R)
    except np.linalg.LinAlgError:
        raise FloatingPointError("correlation matrix is not positive definite") from None


class Custom(CovStruct):
    """Stata's ``covariance(custom matname)``: a square pattern over the effects.

    The diagonal holds standard deviations, the off-diagonal correlations. A number
    fixes the element, ``None``/NaN leaves it free, and a string label used at two
    or more places constrains those elements to one common value (SDs with SDs,
    correlations with correlations). With ``D = diag(sd)`` and ``R`` the correlation
    matrix, ``Sigma = D R D`` and ``T = D chol(R)``; theta holds the distinct free
    SDs (>= 0) then the distinct free correlation parameters rho (in (-1, 1), or
    [0, 1) when ``nonnegative``).

    ``lags``: a symmetric matrix d > 0 that makes a free correlation a power,
    ``R_ij = rho^(d_ij)`` (metafor's AR: d_ij = |i - j|; CAR: |t_i - t_j|); the default
    d = 1 is the pattern itself. Non-integer lags need ``nonnegative``.
    """

    kind, title = "custom", "Custom"
    CORR_BOUND = 1.0 - 1e-9

    def __init__(self, effect_names, pattern, lags=None, nonnegative=False):
        super().__init__(effect_names)
        P = self._validate(pattern)
        q = self.q
        self._lags = self._validate_lags(lags, nonnegative)
        self._rho_lower = 0.0 if nonnegative else -self.CORR_BOUND
        # positions of each parameter: list of (kind, [(i, j), ...], fixed value or None)
        sd_groups, corr_groups = {}, {}
        self.params = []
        self._fixed_sd = np.full(q, np.nan)
        self._fixed_corr = np.full((q, q), np.nan)
        for i in range(q):
            v = P[i][i]
            if isinstance(v, str):
                sd_groups.setdefault(v, []).append(i)
            elif v is None:
                sd_groups[("free", i)] = [i]
            else:
                self._fixed_sd[i] = v
        for i in range(q):
            for j in range(i + 1, q):
                v = P[i][j]
                if isinstance(v, str):
                    corr_groups.setdefault(v, []).append((i, j))
                elif v is None:
                    corr_groups[("free", i, j)] = [(i, j)]
                else:
                    self._fixed_corr[i, j] = self._fixed_corr[j, i] = v
        for label, where in list(sd_groups.items()) + list(corr_groups.items()):
            if isinstance(label, str) and len(where) < 2:
                raise ValueError(f"custom covariance: label {label!r} is used only once; a label "
                                 f"constrains two or more elements to be equal")
        self._sd_free = list(sd_groups.values())
        self._corr_free = list(corr_groups.values())
        self._validate_fixed_psd()

    # -- validation ----------------------------------------------------------
    def _validate(self, pattern):
        q = self.q
        arr = np.asarray(pattern, dtype=object)
        if arr.ndim != 2 or arr.shape != (q, q):
            raise ValueError(f"custom covariance must be a {q} x {q} matrix over the effects "
                             f"{self.effect_names}; got shape {arr.shape}")

        def norm(v):
            if v is None:
                return None
            if isinstance(v, str):
                v = v.strip()
                if not v or v == ".":
                    return None
                return v.lstrip(".")
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"custom covariance: element {v!r} is neither a number, "
                                 f"None/NaN nor a label") from None
            return None if np.isnan(f) else f

        P = [[norm(arr[i, j]) for j in range(q)] for i in range(q)]
        for i in range(q):
            for j in range(i + 1, q):
                if P[i][j] != P[j][i]:
                    raise ValueError(f"custom covariance must be symmetric: element ({i + 1},{j + 1}) "
                                     f"is {P[i][j]!r} but ({j + 1},{i + 1}) is {P[j][i]!r}")
        diag_labels = {P[i][i] for i in range(q) if isinstance(P[i][i], str)}
        off_labels = {P[i][j] for i in range(q) for j in range(q) if i != j and isinstance(P[i][j], str)}
        both = diag_labels & off_labels
        if both:
            raise ValueError(f"custom covariance: label(s) {sorted(both)} used for both a standard "
                             f"deviation and a correlation")
        for i in range(q):
            v = P[i][i]
            if isinstance(v, float) and v < 0:
                raise ValueError(f"custom covariance: fixed standard deviation of "
                                 f"{self.effect_names[i]!r} is negative ({v})")
            for j in range(i + 1, q):
                v = P[i][j]
                if isinstance(v, float) and not (-1.0 < v < 1.0):
                    raise ValueError(f"custom covariance: fixed correlation between "
                                     f"{self.effect_names[i]!r} and {self.effect_names[j]!r} must "
                                     f"lie in (-1, 1), got {v}")
        return P

    def _validate_lags(self, lags, nonnegative):
        q = self.q
        if lags is None:
            return np.ones((q, q))
        d = np.asarray(lags, dtype=float)
        off = ~np.eye(q, dtype=bool)
        if d.shape != (q, q) or not np.isfinite(d).all() or not (d[off] > 0).all():
            raise ValueError(f"custom covariance: lags must be a {q} x {q} matrix of positive "
                             f"numbers off the diagonal")
        if not np.array_equal(d, d.T):
            raise ValueError("custom covariance: lags must be symmetric")
        if not nonnegative and (d[off] != np.round(d[off])).any():
            raise ValueError("custom covariance: rho^d with a non-integer lag d needs rho >= 0 "
                             "(nonnegative=True)")
        d = d.copy()
        np.fill_diagonal(d, 1.0)
        return d

    def _validate_fixed_psd(self):
        """Every principal submatrix of fully fixed correlations must be PSD."""
        q = self.q
        fixed = ~np.isnan(self._fixed_corr) | np.eye(q, dtype=bool)
        # greedy: grow sets of effects whose pairwise correlations are all fixed
        for i in range(q):
            members = [i]
            for j in range(q):
                if j != i and all(fixed[j, m] for m in members):
                    members.append(j)
            if len(members) > 2:
                R = np.eye(len(members))
                for a, x in enumerate(members):
                    for b, y in enumerate(members):
                        if a != b:
                            R[a, b] = self._fixed_corr[x, y]
                if np.linalg.eigvalsh(R).min() < -1e-12:
                    names = [self.effect_names[m] for m in members]
                    raise ValueError(f"custom covariance: the fixed correlations among {names} do "
                                     f"not form a positive semi-definite matrix")

    # -- parameterisation ----------------------------------------------------
    @property
    def n_theta(self):
        return len(self._sd_free) + len(self._corr_free)

    @property
    def lower(self):
        return np.concatenate([np.zeros(len(self._sd_free)),
                               np.full(len(self._corr_free), self._rho_lower)])

    @property
    def upper(self):
        return np.concatenate([np.full(len(self._sd_free), np.inf),
                               np.full(len(self._corr_free), self.CORR_BOUND)])

    def _sd_R(self, theta):
        theta = np.asarray(theta, dtype=float)
        sd = self._fixed_sd.copy()
        R = np.where(np.isnan(self._fixed_corr), 0.0, self._fixed_corr)
        np.fill_diagonal(R, 1.0)
        k = len(self._sd_free)
        for t, where in zip(theta[:k], self._sd_free):
            sd[where] = t
        for t, where in zip(theta[k:], self._corr_free):
            for i, j in where:
                d = self._lags[i, j]
                R[i, j] = R[j, i] = t if d == 1.0 else np.power(t, d)
        return sd, R

    def T(self, theta):
        sd, R = self._sd_R(theta)
        return sd[:, None] * _chol_lower(R)

    def Sigma(self, theta):
        """D R D, so fixed and equal elements hold exactly."""
        sd, R = self._sd_R(theta)
        return sd[:, None] * R * sd[None, :]

    def dT(self, theta):
        """dT = dD L + D dL with dL = L Phi(L^-1 dR L^-T), Phi = lower part, half diagonal;
        dR_ij / d rho = d_ij rho^(d_ij - 1) (:func:`dpower`)."""
        theta = np.asarray(theta, dtype=float)
        sd, R = self._sd_R(theta)
        L = _chol_lower(R)
        Li = np.linalg.inv(L)
        out = np.zeros((self.n_theta, self.q, self.q))
        k = len(self._sd_free)
        for a, where in enumerate(self._sd_free):
            dD = np.zeros(self.q)
            dD[where] = 1.0
            out[a] = dD[:, None] * L
        for b, where in enumerate(self._corr_free):
            dR = np.zeros((self.q, self.q))
            for i, j in where:
                dR[i, j] = dR[j, i] = dpower(theta[k + b], self._lags[i, j])
            M = Li @ dR @ Li.T
            Phi = np.tril(M, -1) + 0.5 * np.diag(np.diag(M))
            out[k + b] = sd[:, None] * (L @ Phi)
        return out

    def engine_spec(self) -> dict:
        """The pattern as the engine's maps: sd_map[i] / corr_map[i, j] = index of the
        free parameter in theta (-1 where the value is fixed, then read from
        sd_fixed / corr_fixed); the n_sd free SDs come first; corr_lag = the lags d."""
        q = self.q
        sd_map = np.full(q, -1, dtype=np.intp)
        corr_map = np.full((q, q), -1, dtype=np.intp)
        for a, where in enumerate(self._sd_free):
            sd_map[where] = a
        k = len(self._sd_free)
        for b, where in enumerate(self._corr_free):
            for i, j in where:
                corr_map[i, j] = corr_map[j, i] = k + b
        return {"kind": "custom", "q": q, "n_theta": self.n_theta, "n_sd": k, "sd_map": sd_map,
                "corr_map": corr_map, "sd_fixed": self._fixed_sd.copy(),
                "corr_fixed": self._fixed_corr.copy(), "corr_lag": self._lags.copy()}

    def from_Sigma(self, Sigma, corr_bound=0.95, theta_prev=None):
        """theta of Sigma: each free SD the mean of its elements' SDs, each free
        correlation parameter projected by :meth:`_project_rho` and clipped to its lower
        bound and corr_bound (0.95 keeps starting values off the boundary; CORR_BOUND
        gives the exact parameters of an attainable Sigma), the correlations then kept
        feasible (:meth:`_feasible`, anchored at ``theta_prev`` when given)."""
        sd_all = np.sqrt(np.clip(np.diag(Sigma), 0.0, None))
        theta = [float(np.mean(sd_all[where])) for where in self._sd_free]
        lo = max(self._rho_lower, -corr_bound)
        for where in self._corr_free:
            theta.append(float(np.clip(self._project_rho(Sigma, sd_all, where), lo, corr_bound)))
        return self._feasible(np.asarray(theta), theta_prev)

    def _project_rho(self, Sigma, sd, where):
        """rho of one correlation parameter from the correlations r_ij of Sigma over its
        pairs (r = 0 where an SD is 0). With rho >= 0 (``nonnegative``): the least-squares
        fit of log r_ij = d_ij log rho over the pairs with r_ij > 0 (0 if there are none);
        otherwise the mean r of the pairs at the smallest lag d_min, as
        sign(r) |r|^(1 / d_min) (for a pattern, d = 1: the mean correlation). The
        engine's EM projection is the same."""
        r = np.array([Sigma[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else 0.0
                      for i, j in where])
        d = np.array([self._lags[i, j] for i, j in where])
        if self._rho_lower >= 0.0:
            pos = r > 0
            sxx = float(np.sum(d[pos] * d[pos]))
            return float(np.exp(np.sum(d[pos] * np.log(r[pos])) / sxx)) if sxx > 0 else 0.0
        dmin = d.min()
        m = float(np.mean(r[d == dmin]))
        return m if dmin == 1.0 else float(np.copysign(abs(m) ** (1.0 / dmin), m))

    def _min_pivot(self, theta):
        """Smallest Cholesky pivot of the correlation matrix at theta (-1: not PD)."""
        try:
            return float(np.diag(np.linalg.cholesky(self._sd_R(theta)[1])).min())
        except np.linalg.LinAlgError:
            return -1.0

    def rho_range(self, theta, index):
        """(lo, hi): the values of correlation parameter ``theta[index]`` within its bounds
        for which R stays positive definite, the other entries as in theta (which must be
        feasible): a bound where R is positive definite there, else the last feasible
        point of a bisection from theta[index] (an exchangeable pattern over q effects:
        rho > -1 / (q - 1))."""
        th = np.array(theta, dtype=float)
        x0 = th[index]
        out = []
        for lim in (self.lower[index], self.upper[index]):
            th[index] = lim
            a, b = x0, lim
            if self._min_pivot(th) > 0:
                a = lim
            else:
                for _ in range(60):
                    th[index] = 0.5 * (a + b)
                    a, b = (th[index], b) if self._min_pivot(th) > 0 else (a, th[index])
            out.append(float(a))
        return out[0], out[1]

    def _feasible(self, theta, theta_prev=None):
        """theta with its free correlations kept feasible (the engine's EM projection does
        the same): averaged correlations need not form a positive definite matrix with the
        fixed ones; then they move from an anchor towards these targets, halving the step
        until it is. The anchor is ``theta_prev``'s correlations when feasible, else the
        common value of all free correlations on the grid -0.95, -0.90, ..., 0.95 with the
        largest smallest Cholesky pivot."""
        k = len(self._sd_free)
        theta = np.array(theta, dtype=float)
        if theta.size == k or self._min_pivot(theta) > 0:
            return theta
        target = theta[k:].copy()
        anchor = (np.asarray(theta_prev, dtype=float)[k:].copy() if theta_prev is not None
                  else np.zeros(target.size))
        theta[k:] = anchor
        if not self._min_pivot(theta) > 0:
            best = -1.0
            for g in range(39):
                rho = -0.95 + 0.05 * g
                theta[k:] = rho
                m = self._min_pivot(theta)
                if m > best:
                    best, anchor = m, np.full(target.size, rho)
            theta[k:] = anchor
            if not best > 0:
                return theta
        lam = 1.0
        for _ in range(50):
            lam *= 0.5
            theta[k:] = anchor + lam * (target - anchor)
            if self._min_pivot(theta) > 0:
                return theta
        theta[k:] = anchor
        return theta

    def theta_from_report(self, values):
        """Exact inverse of :meth:`report_values` (fixed entries are ignored)."""
        out = []
        for (kind, eff), v in zip(self.report_params(), values):
            key = ("sd", eff) if kind == "sd" else ("corr", eff)
            if key in self._free_keys():
                out.append(v)
        return np.asarray(out, dtype=float)

    @property
    def sd_groups(self) -> list:
        """The free SDs: for each, the effect indices that share it."""
        return [list(w) for w in self._sd_free]

    @property
    def corr_groups(self) -> list:
        """The free correlations: for each, the (i, j) pairs that share it."""
        return [list(w) for w in self._corr_free]

    def _free_keys(self):
        return [("sd", tuple(w)) for w in self._sd_free] + [("corr", tuple(w)) for w in self._corr_free]

    # -- reporting -------------------------------------------------------------
    def report_params(self):
        out = []
        seen = set()
        for where in self._sd_free:
            out.append(("sd", tuple(where)))
            seen.update(where)
        sd_entries = [("sd", tuple(w)) for w in self._sd_free]
        fixed_sd = [("sd", (i,)) for i in range(self.q) if not np.isnan(self._fixed_sd[i])]
        entries = sd_entries + fixed_sd
        entries.sort(key=lambda e: e[1][0])
        corr_entries = [("corr", tuple(w)) for w in self._corr_free]
        corr_entries += [("corr", ((i, j),)) for i in range(self.q) for j in range(i + 1, self.q)
                         if not np.isnan(self._fixed_corr[i, j])]
        corr_entries.sort(key=lambda e: e[1][0])
        return entries + corr_entries

    def report_values(self, theta):
        """SDs and correlations read off the pattern (fixed values exactly as given)."""
        sd, R = self._sd_R(theta)
        return np.asarray([sd[eff[0]] if kind == "sd" else R[eff[0]]
                           for kind, eff in self.report_params()])

    def is_fixed(self, index):
        kind, eff = self.report_params()[index]
        if kind == "sd":
            return len(eff) == 1 and not np.isnan(self._fixed_sd[eff[0]])
        i, j = eff[0]
        return not np.isnan(self._fixed_corr[i, j])


class FactorLevels(Custom):
    """metafor's AR, HAR, CAR and HCS (:mod:`mlmeta.covfactor`): a custom pattern whose
    theta is its report, the free SDs then rho, labelled ``sd(C(time))`` (one SD for all
    levels) or ``sd(C(time)[1])``, ... and ``rho(C(time))``. ``term`` names the grouping
    term in error messages."""

    name = ""

    def __init__(self, effect_names, term=None):
        spec = level_structure(self.name, effect_names, term)
        super().__init__(effect_names, spec["pattern"], spec["lags"], spec["nonnegative"])
        self.factor = spec["factor"]

    def report_params(self):
        """("sd", effects sharing it) per free SD, then ("rho", every pair): rho is a
        structure parameter (the lag-1 correlation of AR and HAR), reported as itself in
        both metrics."""
        pairs = tuple(p for w in self._corr_free for p in w)
        return [("sd", tuple(w)) for w in self._sd_free] + [("rho", pairs)]

    def report_values(self, theta):
        return np.array(theta, dtype=float)

    def theta_from_report(self, values):
        return np.array(values, dtype=float)

    def Sigma_from_report(self, values):
        return self.Sigma(values)

    def is_fixed(self, index):
        return False

    def labels(self, variance=False):
        out = []
        for kind, eff in self.report_params():
            if kind == "rho":
                out.append(f"rho({self.factor})")
            else:
                what = self.factor if len(eff) > 1 else self.effect_names[eff[0]]
                out.append(f"{'var' if variance else 'sd'}({what})")
        return out


class AR(FactorLevels):
    """metafor's ``struct="AR"``: Sigma_ij = tau^2 rho^|i - j| over the levels in order."""

    name, title = "AR", "AR(1)"


class HAR(FactorLevels):
    """metafor's ``struct="HAR"``: Sigma_ij = tau_i tau_j rho^|i - j|."""

    name, title = "HAR", "HAR(1)"


class CAR(FactorLevels):
    """metafor's ``struct="CAR"``: Sigma_ij = tau^2 rho^|t_i - t_j| over the numeric
    levels t (the times), rho in [0, 1)."""

    name, title = "CAR", "CAR(1)"


class HCS(FactorLevels):
    """metafor's ``struct="HCS"``: Sigma_ii = tau_i^2, Sigma_ij = tau_i tau_j rho."""

    name, title = "HCS", "HCS"


_CLASSES = {"identity": Identity, "independent": Independent,
            "exchangeable": Exchangeable, "unstructured": Unstructured}
#: metafor's names: CS = exchangeable, UN = unstructured, ID = identity, DIAG = independent
_ALIASES = {"cs": "exchangeable", "un": "unstructured", "id": "identity", "diag": "independent"}
_FACTOR_CLASSES = {"ar": AR, "har": HAR, "car": CAR, "hcs": HCS}
_NAMES = (f"{', '.join(STRUCTURES)} (or a prefix), or metafor's CS, UN, ID, DIAG, "
          f"{', '.join(FACTOR_STRUCTURES)}")


def make_structure(spec, effect_names, correlated=True, term=None):
    """Build a structure from a name (or None: the bar's default), case-insensitive:
    ``independent``, ``exchangeable``, ``identity``, ``unstructured`` or a prefix of one,
    metafor's ``CS``, ``UN``, ``ID``, ``DIAG`` (the same four) and ``AR``, ``HAR``,
    ``CAR``, ``HCS`` (:class:`FactorLevels`); a square array is a :class:`Custom`
    pattern. ``term`` names the grouping term in error messages.

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
        if np.ndim(spec) == 2 or (isinstance(spec, (list, tuple)) and spec and
                                  isinstance(spec[0], (list, tuple, np.ndarray))):
            return Custom(effect_names, spec)
        raise ValueError(f"unknown covariance structure {spec!r}; use one of {_NAMES}")
    key = spec.strip().lower()
    if key in _FACTOR_CLASSES:
        return _FACTOR_CLASSES[key](effect_names, term=term)
    key = _ALIASES.get(key, key)
    matches = [s for s in STRUCTURES if s.startswith(key)] if key else []
    if len(matches) != 1:
        raise ValueError(f"unknown covariance structure {spec!r}; use one of {_NAMES}")
    key = matches[0]
    if q == 1:
        return Identity(effect_names)
    return _CLASSES[key](effect_names)
