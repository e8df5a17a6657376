"""Model formulas: lme4-style random-effects bars on top of formulaic.

A formula such as ::

    stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)

is split into a response, a fixed part (handed to formulaic as written) and a
tuple of random terms, outermost level first. :func:`build_model_frame` then
evaluates all parts on the data with one common set of rows, so that ``y``,
``X``, every ``Z^(l)``, the group codes and any extra columns (sampling
variances, standard errors) stay aligned.

Missing values follow Stata and metafor (rows are dropped with a
:class:`~mlmeta._errors.MissingDataWarning`); infinite values are errors.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.linalg
from formulaic import Formula
from formulaic.formula import SimpleFormula
from formulaic.transforms import TRANSFORMS
from formulaic.utils.variables import get_required_variables

from mlmeta._errors import MissingDataWarning, warn
from mlmeta.gram import is_tall, well_conditioned_gram
from mlmeta.groups import GroupLabels, factorize, group_codes
from mlmeta.nesting import arrange_terms
from mlmeta.plain_terms import (CONTEXT, FORMULAIC_INTERCEPT, DeferredSpec, for_formulaic, plain_columns,
                                plain_design)
from mlmeta.validate import aligned, reserved_name

__all__ = ["RandomTerm", "ParsedFormula", "ModelFrame", "parse_formula", "build_model_frame"]

INTERCEPT = "_cons"
_RANK_TOL = 1e-10
_NAME = re.compile(r"(?:[^\W\d]|\.)[\w.]*|`[^`]+`")
_Q_CALL = re.compile(r"""(?<![\w.])Q\(\s*(['"])(.*?)\1\s*\)""")  # Q('my x') reads column 'my x'
_OPEN, _CLOSE = "([{", ")]}"
_QUOTES = "'\"`"


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term ``(rhs | group)`` or ``(rhs || group)``.

    Attributes:
        group: the grouping term as written (nesting expanded), e.g. ``"district:school"``.
        group_vars: the data columns whose combination identifies a group.
        rhs: the formula inside the bar, e.g. ``"1 + year_c"``.
        correlated: True for ``|`` (unstructured), False for ``||`` (independent).
    """

    group: str
    group_vars: tuple[str, ...]
    rhs: str
    correlated: bool


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into response, fixed part and random terms (outermost first)."""

    response: str
    fixed_rhs: str
    random: tuple[RandomTerm, ...]


class _SpecSlot:
    """Dataclass field holding a ModelSpec (or a list of them) that may still be a
    :class:`~mlmeta.plain_terms.DeferredSpec`; it is built, and stored, when the field is read."""

    def __set_name__(self, owner, name):
        self.key = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return None  # the field's default
        value = obj.__dict__[self.key]
        if isinstance(value, DeferredSpec):
            value = obj.__dict__[self.key] = value.build()
        elif isinstance(value, list) and any(isinstance(v, DeferredSpec) for v in value):
            value = obj.__dict__[self.key] = [v.build() if isinstance(v, DeferredSpec) else v for v in value]
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.key] = value


@dataclass
class ModelFrame:
    """Aligned arrays of one model, rows in original data order restricted to ``sample``.

    Attributes:
        y: response, shape (n_obs,).
        X: fixed-effects design, shape (n_obs, n_fe), Fortran order.
        fe_names: names of the columns of X; the intercept ``_cons`` comes last.
        Z: per level l (outermost first), the design Z^(l), shape (n_obs, q_l), Fortran order.
        re_names: per level, the names of the columns of Z^(l); ``_cons`` last.
        groups: per level, int64 group codes 0..G_l-1 (a group is a combination of group_vars).
        group_labels: per level, the label of each code (a scalar, or a tuple for several vars).
        terms: the random terms, one per level.
        response: name of the response column.
        sample: boolean mask over the original rows: True where the row is used.
        n_dropped: number of rows dropped for missing values.
        extra: requested extra columns, restricted to ``sample``.
        fixed_spec: formulaic ModelSpec of the fixed part (re-applied by predictions).
        re_specs: formulaic ModelSpec of each random term's rhs.
        omitted: fixed-effect columns omitted because of collinearity (Stata's rule:
            a column that is a linear combination of earlier ones is dropped).
        notes: messages about the frame (omitted columns, crossed terms).
        n_tree: the first ``n_tree`` terms form a chain, each nested in the one before
            (the engine's tree); the others are crossed with it (:mod:`mlmeta.nesting`).
            Terms are reordered so: the chain first (outermost first), then the crossed
            terms in formula order.
        nesting: per term, the group of the term it is nested in, None for the top of
            the chain, or "crossed".
        crossing: notes on crossed terms listed after a term they are not nested in (ids
            that repeat across outer groups: nested only if written ``a:b``).
    """

    y: np.ndarray
    X: np.ndarray
    fe_names: list[str]
    Z: list[np.ndarray]
    re_names: list[list[str]]
    groups: list[np.ndarray]
    group_labels: list[GroupLabels]
    terms: tuple[RandomTerm, ...]
    response: str
    sample: np.ndarray
    n_dropped: int
    extra: dict[str, np.ndarray]
    fixed_spec: object = _SpecSlot()
    re_specs: list = _SpecSlot()
    omitted: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    data_index: object = None       # index of the data's rows (per-row outputs use it)
    n_tree: int = 0                 # the first n_tree terms are nested (the tree); the rest crossed
    nesting: list = field(default_factory=list)   # per term: the term it is nested in, None, "crossed"
    crossing: list = field(default_factory=list)  # notes on crossed terms (shown with the results)


# Parsing ------------------------------------------------------------------


def _scan(text: str) -> tuple[list[int], list[int], list[bool]]:
    """Bracket structure of ``text``.

    Returns, per character, its depth (brackets strictly enclosing it), the
    index of the innermost enclosing opening bracket (-1 at top level) and
    whether it lies inside a quoted string or backtick name.
    """
    depth, opener, quoted = [], [], []
    stack: list[int] = []
    quote, start = None, -1
    for i, ch in enumerate(text):
        if quote is None and ch in _CLOSE:
            if not stack or text[stack[-1]] != _OPEN[_CLOSE.index(ch)]:
                raise ValueError(f"unbalanced parentheses: unexpected {ch!r} at position {i} in {text!r}")
            stack.pop()
        depth.append(len(stack))
        opener.append(stack[-1] if stack else -1)
        quoted.append(quote is not None or ch in _QUOTES)
        if quote is not None:
            if ch == quote == "`" and start == i - 1:
                raise ValueError(f"empty backtick name at position {start} in {text!r}")
            quote = None if ch == quote else quote
        elif ch in _QUOTES:
            quote, start = ch, i
        elif ch in _OPEN:
            stack.append(i)
    if quote is not None:
        raise ValueError(f"unterminated quote {quote} in {text!r}")
    if stack:
        raise ValueError(f"unbalanced parentheses: {text[stack[-1]]!r} at position {stack[-1]} "
                         f"is never closed in {text!r}")
    return depth, opener, quoted


def _is_bare_paren(text: str, i: int) -> bool:
    """True if the '(' at ``text[i]`` groups (is not a call or an index)."""
    before = text[:i].rstrip()
    return not before or not (before[-1].isalnum() or before[-1] in "_.)]}`'\"")


def _strip_group(text: str) -> str | None:
    """The contents of ``text`` if it is one bare parenthesised group, else None."""
    text = text.strip()
    if not text.startswith("("):
        return None
    depth, _, quoted = _scan(text)
    for i in range(1, len(text)):
        if not quoted[i] and text[i] == ")" and depth[i] == 0:
            return text[1:-1] if i == len(text) - 1 else None
    return None


def _split_top(text: str) -> list[tuple[str, str]]:
    """Split a right-hand side at top-level ``+`` / ``-`` into (operator, chunk) pairs."""
    depth, _, quoted = _scan(text)
    chunks, op, start = [], "", 0
    for i, ch in enumerate(text):
        if ch in "+-" and depth[i] == 0 and not quoted[i]:
            chunks.append((op, text[start:i].strip()))
            op, start = ch, i + 1
    chunks.append((op, text[start:].strip()))
    return chunks


def _clean_message(exc: Exception) -> str:
    """An exception message without terminal colour codes and highlight marks."""
    msg = re.sub(r"\x1b\[[0-9;]*m|[⧛⧚]", "", str(exc))
    return " ".join(msg.split())


@functools.lru_cache(maxsize=256)
def _parse_rhs(rhs: str, where: str) -> Formula:
    """Parse a one-sided formula with formulaic; raise ValueError quoting ``rhs``.
    (Cached: formulaic formulas are immutable and parsing costs ~0.2 ms.)"""
    try:
        formula = Formula(rhs)
    except Exception as exc:  # formulaic raises several exception types
        raise ValueError(f"cannot parse {where} {rhs!r}: {_clean_message(exc)}") from None
    if not isinstance(formula, SimpleFormula):
        raise ValueError(f"cannot parse {where} {rhs!r}: it is not a single one-sided formula")
    return formula


def _parse_name(piece: str, what: str, context: str) -> str:
    piece = piece.strip()
    if not _NAME.fullmatch(piece):
        raise ValueError(f"bad {what} {piece!r} in {context!r}: expected a column name")
    return piece[1:-1] if piece.startswith("`") else piece


def _top_bars(text: str) -> list[int]:
    """Positions of ``|`` outside any bracket or quote."""
    depth, _, quoted = _scan(text)
    return [i for i, ch in enumerate(text) if ch == "|" and depth[i] == 0 and not quoted[i]]


def _parse_bar(inner: str, chunk: str) -> list[RandomTerm]:
    """Parse the inside of ``(lhs | groups)``; expand ``a/b/c`` into nested terms."""
    bars = _top_bars(inner)
    correlated = not (len(bars) == 2 and bars[1] == bars[0] + 1)
    if not correlated:
        bars = bars[:1]
    if len(bars) != 1:
        raise ValueError(f"random term {chunk!r} must contain exactly one '|' or '||'")
    lhs = inner[: bars[0]].strip()
    rhs_start = bars[0] + (1 if correlated else 2)
    group_text = inner[rhs_start:].strip()
    if not lhs:
        raise ValueError(f"empty left side of the bar in random term {chunk!r}; "
                         "write (1 | g) for a random intercept")
    if not group_text:
        raise ValueError(f"empty grouping term (right side of the bar) in random term {chunk!r}")
    _parse_rhs(lhs, f"the random-effects formula of {chunk}:")
    lhs = " ".join(lhs.split())
    terms, prefix = [], ()
    for level in group_text.split("/"):
        names = tuple(_parse_name(p, "grouping variable", chunk) for p in level.split(":"))
        group_vars = prefix + names
        if len(set(group_vars)) != len(group_vars):
            raise ValueError(f"bad grouping term {group_text!r} in {chunk!r}: a variable is repeated")
        terms.append(RandomTerm(":".join(group_vars), group_vars, lhs, correlated))
        prefix = group_vars
    return terms


def parse_formula(formula: str) -> ParsedFormula:
    """Split ``response ~ fixed + (rhs | group) + ...`` into its parts (cached per string).

    Random terms are parenthesised lme4 bars: ``|`` correlated, ``||``
    independent, ``a/b`` expands to ``a`` and ``a:b`` (outermost first), ``a:b``
    is one grouping term identified by both columns. Everything else on the
    right-hand side is the fixed part, in formulaic syntax ("1" if empty).

    Raises:
        ValueError: a malformed formula; the message quotes the offending piece.
    """
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a string, not {type(formula).__name__}")
    return _parse_formula(formula)


@functools.lru_cache(maxsize=256)
def _parse_formula(formula: str) -> ParsedFormula:
    """:func:`parse_formula` for a string, cached."""
    depth, _, quoted = _scan(formula)
    tildes = [i for i, ch in enumerate(formula) if ch == "~" and depth[i] == 0 and not quoted[i]]
    if not tildes:
        raise ValueError(f"formula {formula!r} has no '~': write it as 'response ~ moderators + (1 | group)'")
    if len(tildes) > 1:
        raise ValueError(f"formula {formula!r} has more than one '~'")
    lhs, rhs = formula[: tildes[0]].strip(), formula[tildes[0] + 1 :]
    if not lhs:
        raise ValueError(f"formula {formula!r} has an empty response (left of '~')")
    if "|" in lhs:
        raise ValueError(f"'|' outside parentheses in the response {lhs!r}")
    if not _NAME.fullmatch(lhs):
        raise ValueError(f"response {lhs!r} must be a single column name")
    response = lhs[1:-1] if lhs.startswith("`") else lhs

    fixed: list[tuple[str, str]] = []
    random: list[RandomTerm] = []
    chunks = _split_top(rhs)
    for k, (op, chunk) in enumerate(chunks):
        if not chunk:
            if k == 0 and len(chunks) > 1:
                continue  # leading unary operator, e.g. "y ~ -1 + x"
            raise ValueError(f"empty term after {op or '~'!r} in {formula!r}")
        inner = _strip_group(chunk)
        while inner is not None and _strip_group(inner) is not None:
            inner = _strip_group(inner)
        if inner is not None and _top_bars(inner):
            if op == "-":
                raise ValueError(f"random term {chunk!r} cannot be subtracted; add it with '+'")
            random.extend(_parse_bar(inner, chunk))
            continue
        c_depth, c_opener, c_quoted = _scan(chunk)
        for i in (i for i, ch in enumerate(chunk) if ch == "|" and not c_quoted[i]):
            if c_depth[i] == 0:
                raise ValueError(f"'|' outside parentheses in {chunk!r}; random terms are written (x | g)")
            if _is_bare_paren(chunk, c_opener[i]):
                raise ValueError(f"random term inside {chunk!r} must be added on its own with '+', "
                                 "e.g. y ~ x + (1 | g)")
        fixed.append((op, chunk))

    # the first fixed chunk keeps only a '-' sign; the others keep their operator
    parts = [f"{op} {chunk}" if k else f"-{chunk}" if op == "-" else chunk
             for k, (op, chunk) in enumerate(fixed)]
    fixed_rhs = " ".join(" ".join(parts).split()) if fixed else "1"
    _parse_rhs(fixed_rhs, "the fixed part")

    seen: dict[frozenset, RandomTerm] = {}
    for term in random:
        key = frozenset(term.group_vars)
        if key in seen:
            raise ValueError(
                f"grouping term {term.group!r} appears in more than one random term "
                f"(({seen[key].rhs} | {seen[key].group}) and ({term.rhs} | {term.group})); "
                f"put all effects of one grouping in a single term, e.g. (1 + x || {term.group}) "
                f"for independent or (1 + x | {term.group}) for correlated effects")
        seen[key] = term
    return ParsedFormula(response, fixed_rhs, tuple(random))


# Model frame ------------------------------------------------------------------


def _formula_columns(formula: Formula, columns: pd.Index, where: str) -> list[str]:
    """Data columns a formulaic formula reads; unknown names raise ValueError."""
    names: list[str] = []
    for term in formula:
        for factor in term.factors:
            method = factor.eval_method.value
            if method == "lookup":
                found = [str(factor.expr)]
            elif method == "python":
                found = sorted(str(v) for v in get_required_variables(factor.expr)
                               if any(r.value == "value" for r in v.roles))
                found += [m[1] for m in _Q_CALL.findall(str(factor.expr))]  # Q('my x')
            else:
                continue
            for name in found:
                reserved_name(name, where)
                if name in columns:
                    names.append(name)
                elif name.split(".", 1)[0] not in CONTEXT and name.split(".", 1)[0] not in TRANSFORMS:
                    raise _unknown_column(name, columns, where)
    return list(dict.fromkeys(names))


def _unknown_column(name: str, columns: pd.Index, where: str) -> ValueError:
    shown = ", ".join(repr(c) for c in list(columns)[:10])
    more = f", ... ({len(columns)} columns)" if len(columns) > 10 else ""
    return ValueError(f"unknown column {name!r} in {where}; available columns: {shown}{more}")


def _as_frame(data) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        frame = data
    elif isinstance(data, Mapping):
        frame = pd.DataFrame(dict(data))
    else:
        raise TypeError(f"data must be a pandas DataFrame or a mapping of columns, not {type(data).__name__}")
    if not frame.columns.is_unique:
        dup = frame.columns[frame.columns.duplicated()].unique().tolist()
        raise ValueError(f"data has duplicated column names: {dup}")
    return frame


def _is_numeric(dtype) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _numeric_values(values, name: str) -> np.ndarray:
    """Float64 values of a numeric column/array with missing values as NaN."""
    if isinstance(values, pd.Series) and isinstance(values.dtype, np.dtype) and values.dtype.kind in "iuf":
        return values.to_numpy(dtype=np.float64)  # nothing to fill
    if not isinstance(values, pd.Series):
        values = pd.Series(values, copy=False)
    if values.dtype == object:
        values = values.infer_objects()
    if not _is_numeric(values.dtype):
        raise ValueError(f"{name} must be numeric, got dtype {values.dtype}")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _extra_values(key: str, spec, frame: pd.DataFrame) -> tuple[str, np.ndarray]:
    """Resolve one ``extra`` entry to (label, values over all rows)."""
    if isinstance(spec, str):
        if spec not in frame.columns:
            raise _unknown_column(spec, frame.columns, f"{key}={spec!r}")
        return spec, _numeric_values(frame[spec], f"column {spec!r} ({key})")
    values = np.asarray(aligned(spec, frame.index, key))
    if values.ndim != 1:
        raise ValueError(f"{key} must be one-dimensional, got shape {values.shape}")
    if values.shape[0] != len(frame):
        raise ValueError(f"{key} has length {values.shape[0]} but data has {len(frame)} rows")
    label = f"{key} (array)" if key in frame.columns else key
    return label, _numeric_values(values, key)


def _used_values(column: pd.Series, rows: np.ndarray | None):
    """A column over the used rows (all when ``rows`` is None): a numpy array for plain
    numpy dtypes, else a Series on a fresh index with unused categories removed."""
    dtype = column.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "biufO":
        values = column.to_numpy()
        return values if rows is None else values[rows]
    column = (column if rows is None else column.iloc[rows]).reset_index(drop=True)
    if isinstance(dtype, pd.CategoricalDtype):
        column = column.cat.remove_unused_categories()
    return column


def _design(formula: Formula, sub: pd.DataFrame, where: str):
    """Evaluate a formulaic formula; return (float matrix, names, spec, has_intercept)."""
    try:
        mm = formula.get_model_matrix(sub, context=CONTEXT, na_action="ignore")
    except Exception as exc:  # formulaic/pandas raise many types
        raise ValueError(f"cannot evaluate {where}: {_clean_message(exc)}") from None
    names = [str(c) for c in mm.columns]
    try:
        M = mm.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where} produced non-numeric columns") from None
    bad = ~np.isfinite(M).all(axis=0)
    if bad.any():
        cols = ", ".join(repr(n) for n, b in zip(names, bad) if b)
        raise ValueError(f"{where} produced non-finite values in column(s) {cols}")
    return M, names, mm.model_spec, FORMULAIC_INTERCEPT in names


def _intercept_last(M: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Rename formulaic's intercept to ``_cons`` and move it to the last column (F order)."""
    order = [j for j, n in enumerate(names) if n != FORMULAIC_INTERCEPT]
    order += [j for j, n in enumerate(names) if n == FORMULAIC_INTERCEPT]
    renamed = [INTERCEPT if names[j] == FORMULAIC_INTERCEPT else names[j] for j in order]
    return np.asfortranarray(M[:, order]), renamed


def _dependent_columns(X: np.ndarray) -> list[int]:
    """Columns of X that are (numerically) linear combinations of earlier columns.

    The rank comes from a pivoted QR of the column-normalised X with relative
    tolerance 1e-10. If it is deficient, an unpivoted QR gives, for each
    column, |R_kk| = distance of the unit column from the span of the earlier
    ones; the ``p - rank`` smallest are reported.
    """
    n_obs, n_fe = X.shape
    if n_fe == 0:
        return []
    if is_tall(X, min_rows=0) and well_conditioned_gram(X) is not None:
        return []       # clearly independent: no rank test at tolerance 1e-10 can miss it
    norms = np.linalg.norm(X, axis=0)
    if n_fe == 1 and 0 < norms[0] < np.inf:
        return []  # one column of positive norm is independent (unit |R_00| in the QR below)
    Xs = X / np.where(norms > 0, norms, 1.0)
    R, _ = scipy.linalg.qr(Xs, mode="r", pivoting=True)
    d = np.abs(np.diag(R))
    rank = int(np.sum(d > _RANK_TOL * d[0])) if d.size and d[0] > 0 else 0
    if rank == n_fe:
        return []
    (R0,) = scipy.linalg.qr(Xs, mode="r")
    d0 = np.zeros(n_fe)
    d0[: min(n_obs, n_fe)] = np.abs(np.diag(R0))
    return sorted(np.argsort(d0, kind="stable")[: n_fe - rank].tolist())


def _rank_problems(X: np.ndarray, names: list[str], has_intercept: bool) -> list[tuple[int, str]]:
    """(column, reason) for each column that is a linear combination of earlier ones."""
    out = []
    for j in _dependent_columns(X):
        name = INTERCEPT if names[j] == FORMULAIC_INTERCEPT else names[j]
        if has_intercept and names[j] != FORMULAIC_INTERCEPT and np.ptp(X[:, j]) == 0:
            out.append((j, f"{name!r} is constant"))
        else:
            out.append((j, f"{name!r} is a linear combination of earlier columns"))
    return out


def _check_fixed_rank(X: np.ndarray, names: list[str], has_intercept: bool, collinear: str = "omit"):
    """Stata's rule: omit collinear moderators with a note (``collinear="omit"``),
    or raise (``"error"``). Returns (X, names, omitted, notes)."""
    problems = _rank_problems(X, names, has_intercept)
    if not problems:
        return X, names, [], []
    if collinear == "error" or len(problems) == X.shape[1]:
        raise ValueError(
            f"fixed-effects design is rank deficient ({X.shape[1] - len(problems)} of {X.shape[1]} "
            f"columns independent): {'; '.join(p for _, p in problems)}. Remove or recode the "
            f"collinear moderator(s).")
    drop = [j for j, _ in problems]
    keep = [j for j in range(X.shape[1]) if j not in drop]
    omitted = [INTERCEPT if names[j] == FORMULAIC_INTERCEPT else names[j] for j in drop]
    notes = [f"{nm} omitted because of collinearity ({why.split(' is ', 1)[1]})"
             for nm, (_, why) in zip(omitted, problems)]
    return np.asfortranarray(X[:, keep]), [names[j] for j in keep], omitted, notes


def _check_random_rank(term: RandomTerm, Z: np.ndarray, names: list[str], collinear: bool):
    """Collinear random-effect columns are an error unless ``collinear=True`` (Stata)."""
    problems = [] if collinear else _rank_problems(Z, names, INTERCEPT in names)
    if problems:
        raise ValueError(
            f"random-effects columns of ({term.rhs} | {term.group}) are collinear: "
            f"{'; '.join(p for _, p in problems)}. Drop them, or pass collinear=True when the "
            f"covariance structure identifies the model.")


def _check_slopes(term: RandomTerm, Z: np.ndarray, names: list[str], codes: np.ndarray, first: np.ndarray):
    """With a random intercept, each slope must vary within at least one group."""
    slopes = [j for j, n in enumerate(names) if n != INTERCEPT]
    if INTERCEPT not in names or not slopes:
        return
    Zs = Z[:, slopes]
    scale = np.abs(Zs).max(axis=0)
    within = np.abs(Zs - Zs[first][codes]).max(axis=0)
    flat = [names[j] for j, w, s in zip(slopes, within, scale) if w <= 1e-12 * max(s, 1e-300)]
    if flat:
        which = ", ".join(repr(n) for n in flat)
        raise ValueError(
            f"random slope on {which} at level {term.group!r} has no variation within its groups; "
            f"it cannot be separated from the random intercept")


def _missing(name: str, values) -> np.ndarray | None:
    """Missing-value mask of a column (None: none can be missing); infinite values raise ValueError."""
    na = None
    if isinstance(values, pd.Series):
        dtype = values.dtype
        if isinstance(dtype, np.dtype) and dtype.kind in "biu":
            return None
        if isinstance(dtype, np.dtype) and dtype.kind == "f":
            values = values.to_numpy()
        else:
            na = np.asarray(pd.isna(values), dtype=bool)
            if not _is_numeric(dtype):
                return na
            values = values.to_numpy(dtype=np.float64, na_value=np.nan)
    if values.dtype.kind == "f" and np.isinf(values).any():
        row = np.flatnonzero(np.isinf(values))[0]
        raise ValueError(f"column {name!r} contains infinite values (row {row})")
    if na is None:
        na = np.isnan(values) if values.dtype.kind == "f" else np.asarray(pd.isna(values), dtype=bool)
    return na


def build_model_frame(parsed: ParsedFormula, data, extra: Mapping | None = None, *,
                      collinear_fixed: str = "omit", collinear_random: bool = False,
                      crossed=()) -> ModelFrame:
    """Evaluate a parsed formula on ``data`` and return aligned model arrays.

    Args:
        parsed: output of :func:`parse_formula`.
        data: a DataFrame or a mapping of column name to values.
        extra: maps a key (e.g. ``"variance"``) to a column name, to an array with one
            value per row of ``data`` (taken by position; a pandas Series is aligned on
            the data's index, see :func:`mlmeta.validate.aligned`), or to None (ignored).
        collinear_fixed: "omit" (Stata: drop a moderator that is a linear
            combination of earlier columns, with a note) or "error".
        collinear_random: keep collinear random-effect columns (Stata's collinear).
        crossed: grouping terms (as written, e.g. ``"phylogeny"``) kept out of the nested
            tree whatever their ids say (their groups are correlated with each other).

    Rows with a missing value (NaN, None, pd.NA) in the response, in any
    variable of the fixed or random parts, in a grouping variable or in an
    extra are dropped and counted in ``n_dropped``; a MissingDataWarning says
    how many and where.

    Raises:
        ValueError: unknown or non-numeric columns, infinite values, arrays of
            the wrong length, no usable rows, a rank-deficient fixed design, a
            random term without columns, fewer than 2 groups at a level, or a random
            slope constant within every group.
    """
    frame = _as_frame(data)
    columns, n_rows = frame.columns, len(frame)
    fixed_formula = _parse_rhs(parsed.fixed_rhs, "the fixed part")
    re_formulas = [_parse_rhs(t.rhs, f"random term ({t.rhs} | {t.group})") for t in parsed.random]

    # Columns of each part, in a stable order: response, fixed, random, groups.
    if parsed.response not in columns:
        raise _unknown_column(parsed.response, columns, "the response")
    used = [parsed.response] + _formula_columns(fixed_formula, columns, "the fixed part")
    for term, formula in zip(parsed.random, re_formulas):
        where = f"random term ({term.rhs} | {term.group})"
        used += _formula_columns(formula, columns, where)
        for var in term.group_vars:
            if var not in columns:
                raise _unknown_column(var, columns, f"the grouping term {term.group!r}")
        used += list(term.group_vars)
    used = list(dict.fromkeys(used))

    cols = {name: frame[name] for name in used}
    y_all = _numeric_values(cols[parsed.response], f"response {parsed.response!r}")
    extras = {key: _extra_values(key, spec, frame) for key, spec in (extra or {}).items() if spec is not None}

    # Missing values (dropped) and infinities (errors).
    missing = np.zeros(n_rows, dtype=bool)
    counts: dict[str, int] = {}
    checks = cols | dict(extras.values()) | {parsed.response: y_all}
    for name, values in checks.items():
        na = _missing(name, values)
        if na is not None and na.any():
            counts[name] = int(na.sum())
            missing |= na
    sample = ~missing
    n_dropped = int(missing.sum())
    if n_dropped:
        where = ", ".join(f"{name!r} ({k})" for name, k in counts.items())
        warn(f"dropped {n_dropped} of {n_rows} rows with missing values in: {where}",
             MissingDataWarning)
    if n_rows - n_dropped == 0:
        raise ValueError(f"no rows to fit: data has {n_rows} rows and {n_dropped} have missing values")

    rows, sub = np.flatnonzero(sample), None

    def design(formula: Formula, where: str):
        nonlocal sub
        plain = plain_columns(formula, cols)
        built = None if plain is None else plain_design(formula, plain, cols, rows, n_dropped)
        if built is not None:
            return built
        if sub is None:  # the used columns over the used rows, on a fresh index
            sub = (frame[used] if not n_dropped else frame[used].iloc[rows]).reset_index(drop=True)
            for name in used:
                if isinstance(sub[name].dtype, pd.CategoricalDtype):
                    sub[name] = sub[name].cat.remove_unused_categories()
            sub = for_formulaic(sub)
        return _design(formula, sub, where)

    y = y_all[rows] if n_dropped else y_all
    X, fx_names, fixed_spec, fx_intercept = design(fixed_formula, f"the fixed part {parsed.fixed_rhs!r}")
    X, fx_names, omitted, notes = _check_fixed_rank(X, fx_names, fx_intercept, collinear_fixed)
    X, fe_names = _intercept_last(X, fx_names)

    Z, re_names, re_specs, groups, group_labels = [], [], [], [], []
    designs: dict[str, tuple] = {}
    coded: dict[str, tuple] = {}  # grouping variable -> (values, codes, count)
    for term, formula in zip(parsed.random, re_formulas):
        where = f"random term ({term.rhs} | {term.group})"
        if term.rhs not in designs:
            designs[term.rhs] = design(formula, where)
        M, names, spec, _ = designs[term.rhs]
        if M.shape[1] == 0:
            raise ValueError(f"{where} has no columns; use (1 | {term.group}) for a random intercept")
        Z_l, names_l = _intercept_last(M, names)
        for var in term.group_vars:
            if var not in coded:
                values = _used_values(cols[var], rows if n_dropped else None)
                coded[var] = (values, *factorize(values))
        codes, labels, first = group_codes([coded[var] for var in term.group_vars])
        if len(labels) < 2:
            raise ValueError(
                f"level {term.group!r} has only {len(labels)} group; a random effect needs at least 2 groups")
        _check_slopes(term, Z_l, names_l, codes, first)
        _check_random_rank(term, Z_l, names_l, collinear_random)
        Z.append(Z_l)
        re_names.append(names_l)
        re_specs.append(spec)
        groups.append(codes)
        group_labels.append(labels)

    # nested by the ids, crossed otherwise: the tree's chain first, then the crossed terms
    order, n_tree, nesting, crossing = arrange_terms(parsed.random, groups, [z.shape[1] for z in Z],
                                                     crossed)
    terms = tuple(parsed.random[i] for i in order)
    Z, re_names, re_specs, groups, group_labels = ([v[i] for i in order] for v in
                                                   (Z, re_names, re_specs, groups, group_labels))

    return ModelFrame(
        y=y, X=X, fe_names=fe_names, Z=Z, re_names=re_names, groups=groups, group_labels=group_labels,
        terms=terms, response=parsed.response, sample=sample, n_dropped=n_dropped,
        extra={key: values[rows] if n_dropped else values for key, (_, values) in extras.items()},
        fixed_spec=fixed_spec, re_specs=re_specs, omitted=omitted, notes=notes,
        data_index=frame.index, n_tree=n_tree, nesting=nesting, crossing=crossing)
