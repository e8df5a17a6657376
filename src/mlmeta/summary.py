"""Estimation summary: one neutral table rendered to text and HTML.

A :class:`Summary` holds already-computed numbers (no model objects) and
renders them in the layout of Stata's ``meta meregress`` output, 78 columns
wide::

    Multilevel REML meta-analysis                   Number of obs     =         56
    ...
    ------------------------------------------------------------------------------
        stdmdiff | Coefficient  Std. err.      z    P>|z|     [95% conf. interval]
    -------------+----------------------------------------------------------------
           _cons |   .1847132   .0845559     2.18   0.029     .0189866    .3504397
    ------------------------------------------------------------------------------
    Test of homogeneity: Q_M = chi2(55) = 578.86              Prob > Q_M = 0.0000

Numbers follow Stata's display formats: ``%10.0g`` for the log likelihood,
``%9.0g`` for table cells (see :func:`fmt_g`), ``%8.2f`` for z, ``%5.3f`` for
P>|z|, two decimals for chi-squared statistics and four for their p-values.
Missing or non-finite values print as ``.`` (Stata's missing value).
"""
from __future__ import annotations

import html
import math
import re
import textwrap
from dataclasses import dataclass, field

from mlmeta.display import Display, Section, Table, TextDisplay

__all__ = [
    "FixedRow", "RandomRow", "RandomBlock", "GroupRow", "Summary",
    "fmt_g", "fmt_f", "abbrev", "t_table", "t_table_lines", "factor_level", "CoefTable",
    "Display", "TextDisplay", "Table", "Section",
]

WIDTH = 78
_LEFT = 48          # right-hand header column starts at column 49
_FOOT_FIXED = "(*) fixed during estimation"
_FOOT_BOUNDARY = "(b) on the boundary of the parameter space"


# --------------------------------------------------------------------------- #
# number and name formatting
# --------------------------------------------------------------------------- #
def _missing(x) -> bool:
    if x is None:
        return True
    try:
        return not math.isfinite(float(x))
    except (TypeError, ValueError):
        return True


def fmt_g(x, width: int = 10, sig: int | None = None) -> str:
    """Format ``x`` like Stata's ``%<width>.0g``, without padding.

    One column is kept for the sign, so at most ``width - 1`` characters
    describe ``|x|`` and at most ``sig`` (default ``width - 2``) significant
    digits are shown; a leading zero before the decimal point is dropped and
    trailing zeros after it are removed (``.0836939``, ``-7.9587239``,
    ``578.86``). Numbers too large to fit, or so small that fixed notation
    would show fewer significant digits than exponent notation, switch to
    exponent notation (``1.23e+08``, ``1.23e-06``). Missing -> ``"."``.
    """
    if _missing(x):
        return "."
    x = float(x)
    if x == 0.0:
        return "0"
    avail = width - 1
    sig = width - 2 if sig is None else sig
    sign = "-" if x < 0 else ""
    a = abs(x)
    e = int(f"{a:.{max(sig - 1, 0)}e}".split("e")[1])   # exponent after rounding

    exp_txt = f"e{e:+03d}"
    mant_len = avail - len(exp_txt)                     # "d.dd" part
    sig_exp = max(mant_len - 1, 1)

    fixed = None
    if e >= 0:
        k = e + 1                                       # digits before the point
        if k <= avail:
            dec = max(0, min(avail - k - 1, sig - k))
            s = f"{a:.{dec}f}"
            if "." in s:
                s = s.rstrip("0").rstrip(".")
            if len(s) <= avail:
                fixed = s
    else:
        lead = -e - 1                                   # zeros right after the point
        dec = min(avail - 1, lead + sig)
        sig_fixed = dec - lead
        if sig_fixed >= 1 and sig_fixed >= min(sig_exp, sig):
            s = f"{a:.{dec}f}".rstrip("0")
            s = s[1:] if s.startswith("0.") else s
            if s not in ("", "."):
                fixed = s
    if fixed is not None:
        return sign + fixed
    nd = max(min(sig_exp, sig) - 1, 0)
    m, ex = f"{a:.{nd}e}".split("e")
    return f"{sign}{m}e{int(ex):+03d}"


def fmt_f(x, decimals: int) -> str:
    """Fixed-point format with ``decimals`` digits; missing -> ``"."``."""
    if _missing(x):
        return "."
    return f"{float(x):.{decimals}f}"


def _fmt_int(x) -> str:
    if _missing(x):
        return "."
    return f"{int(x):,}"


def abbrev(name: str, n: int = 12) -> str:
    """Shorten ``name`` to ``n`` characters the way Stata does (``school_eff~t``)."""
    name = str(name)
    if len(name) <= n:
        return name
    if n < 3:
        return name[:n]
    return name[: n - 2] + "~" + name[-1]


def _abbrev_label(label: str, n: int) -> str:
    """Shorten a parameter label such as ``sd(x)``, keeping the parentheses."""
    if len(label) <= n:
        return label
    m = re.match(r"^(\w+\()(.*)(\))$", label)
    if m and n - len(m.group(1)) - 1 >= 3:
        return m.group(1) + abbrev(m.group(2), n - len(m.group(1)) - 1) + ")"
    return abbrev(label, n)


# --------------------------------------------------------------------------- #
# the neutral table
# --------------------------------------------------------------------------- #
@dataclass
class FixedRow:
    """One fixed-effects coefficient."""
    name: str
    coef: float
    se: float
    z: float
    p: float
    lo: float
    hi: float
    status: str = ""       # "", "omitted" (collinear) or "constrained" (fixed by constraints)


_LEVEL = re.compile(r"^(?P<var>.+)\[(?:T\.)?(?P<level>[^\[\]]*)\]$")
_CALL = re.compile(r"^C\(\s*(?P<var>[^,()]+?)\s*(?:,.*)?\)$")


def _split_top(name: str, sep: str = ":") -> list[str]:
    """``name`` split at ``sep`` outside brackets and parentheses."""
    parts, depth, cur = [], 0, []
    for ch in name:
        depth += (ch in "([") - (ch in ")]")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    return parts + ["".join(cur)]


def factor_level(name: str) -> tuple[str | None, str]:
    """(factor, level) of a coefficient named by formulaic's factor coding, else (None,
    name): ``region[T.north]`` -> ("region", "north"), ``outcome[AL]`` -> ("outcome",
    "AL"), ``C(dose)[T.2]:year`` -> ("dose:year", "2")."""
    heads, levels = [], []
    for part in _split_top(str(name)):
        m = _LEVEL.match(part)
        if m is None:
            heads.append(part)
            continue
        var = m.group("var")
        c = _CALL.match(var)
        heads.append(c.group("var") if c else var)
        levels.append(m.group("level"))
    if not levels:
        return None, str(name)
    return ":".join(heads), ":".join(levels)


def _distinct_at(names, n) -> bool:
    """Whether abbreviating the distinct ``names`` to ``n`` characters keeps them distinct."""
    names = set(names)
    return len({abbrev(x, n) for x in names}) == len(names)


@dataclass
class CoefTable:
    """The coefficient table of every result family (meregress, mixed, OLS, robust,
    two-stage): one row per coefficient, the test statistic's name (``z`` or ``t``),
    per-coefficient df (None: normal tests, no df column) and the confidence level.
    :meth:`text_lines` is its one text renderer: Stata's estimation-table layout, with
    a df column when the tests have df; :meth:`table` the neutral table.

    Factor levels are shown as Stata does: the factor's name on a line of its own and
    its levels under it (``outcome`` above ``AL`` and ``PD``). Labels are abbreviated
    to the 12-character column only while they stay distinct; otherwise the label
    column widens until they are."""
    rows: list[FixedRow]
    stat: str = "z"
    df: list | None = None
    level: float = 95.0

    def entries(self) -> list[tuple[str | None, str, int]]:
        """(factor or None, label, row index) per coefficient, in row order."""
        return [(*factor_level(r.name), k) for k, r in enumerate(self.rows)]

    def label_width(self, base: int = 12) -> int:
        """Width of the label column: ``base`` unless abbreviating would make two
        labels (names and factor names, or two levels of a factor) look the same."""
        entries = self.entries()
        tops = [lab if head is None else head for head, lab, _ in entries]
        blocks = {}
        for head, lab, _ in entries:
            if head is not None:
                blocks.setdefault(head, []).append(lab)
        longest = max([len(t) for t in tops] + [len(x) + 1 for b in blocks.values() for x in b]
                      + [base])
        w = base
        while w < longest and not (_distinct_at(tops, w)
                                   and all(_distinct_at(b, w - 1) for b in blocks.values())):
            w += 1
        return w

    def width(self, width: int = WIDTH) -> int:
        """Total width of the text table (``width`` unless the label column widens)."""
        return width + self.label_width() - 12

    def _blocks(self):
        """Runs of rows: (factor or None, [(label, row index), ...])."""
        out = []
        for head, lab, k in self.entries():
            if head is not None and out and out[-1][0] == head:
                out[-1][1].append((lab, k))
            else:
                out.append((head, [(lab, k)]))
        return out

    def text_lines(self, depvar: str, width: int = WIDTH) -> list[str]:
        """Header, rule and one line per coefficient (no closing rule); each factor's
        name on a line above its levels, set off by blank lines from other rows."""
        w = self.label_width()
        name = f"{abbrev(depvar or '', w):>{w}} |"
        if self.df is None:
            st = self.stat
            ci = f"[{self.level:g}% conf. interval]"
            lines = [f"{name[:-1]}| Coefficient  Std. err.      {st}    P>|{st}|{ci:>25}"]
        else:
            lines = [f"{name}{'Coef.':>10}{'Std. err.':>10}{self.stat:>8}{'df':>8}"
                     f"{'P>|' + self.stat + '|':>7}{f'[{self.level:g}% conf.':>12}{'interval]':>10}"]
        lines.append("-" * (w + 1) + "+" + "-" * (width - 14))
        blank = " " * w + " |"
        blocks = self._blocks()
        for b, (head, items) in enumerate(blocks):
            if head is None:
                lines += [self._text_row(f"{abbrev(lab, w):>{w}} |", k) for lab, k in items]
                continue
            if b > 0 and lines[-1] != blank:
                lines.append(blank)
            lines.append(f"{abbrev(head, w):>{w}} |")
            lines += [self._text_row(f"{abbrev(lab, w - 1):>{w - 1}}  |", k) for lab, k in items]
            if b < len(blocks) - 1:
                lines.append(blank)
        return lines

    def _text_row(self, label: str, k: int) -> str:
        r = self.rows[k]
        if r.status:
            return f"{label}{fmt_g(r.coef, 9):>11}  ({r.status})"
        if self.df is None:
            return (f"{label}{fmt_g(r.coef, 9):>11}{fmt_g(r.se, 9):>11}"
                    f"{fmt_f(r.z, 2):>9}{fmt_f(r.p, 3):>8}"
                    f"{fmt_g(r.lo, 9):>13}{fmt_g(r.hi, 9):>12}")
        t, d = r.z, self.df[k]
        t = fmt_f(t, 2) if math.isfinite(t) and abs(t) < 1e4 else fmt_g(t, 7)
        d = ("inf" if math.isinf(d) else fmt_f(d, 2) if math.isfinite(d) and d < 1e4
             else fmt_g(d, 8))
        return (f"{label}{fmt_g(r.coef, 9):>10}{fmt_g(r.se, 9):>10}"
                f"{t:>8}{d:>8}{fmt_f(r.p, 3):>7}"
                f"{fmt_g(r.lo, 9):>11}{fmt_g(r.hi, 9):>11}")

    def columns(self, depvar: str) -> list[str]:
        st = self.stat
        df = [] if self.df is None else ["df"]
        return [depvar or "", "Coefficient", "Std. err.", st, *df, f"P>|{st}|",
                f"[{self.level:g}% conf.", "interval]"]

    def cells(self, k: int) -> list[str]:
        """The formatted cells of row ``k`` after its label."""
        r = self.rows[k]
        n = 6 if self.df is None else 7
        if r.status:
            return [fmt_g(r.coef, 9), f"({r.status})"] + [""] * (n - 2)
        df = [] if self.df is None else [
            "inf" if math.isinf(self.df[k]) else fmt_f(self.df[k], 2)]
        return [fmt_g(r.coef, 9), fmt_g(r.se, 9), fmt_f(r.z, 2), *df, fmt_f(r.p, 3),
                fmt_g(r.lo, 9), fmt_g(r.hi, 9)]

    def table_rows(self) -> list:
        """Neutral rows: each factor as a :class:`~mlmeta.display.Section` above its
        levels, labels in full."""
        out = []
        for head, items in self._blocks():
            if head is not None:
                out.append(Section(head))
            out += [[lab, *self.cells(k)] for lab, k in items]
        return out

    def table(self, depvar: str, caption: str = "", notes=()) -> Table:
        return Table(self.columns(depvar), self.table_rows(), caption, list(notes))


@dataclass
class RandomRow:
    """One random-effects parameter (``sd(_cons)``, ``corr(year_c,_cons)``, ...).

    ``fixed`` rows carry a trailing ``*`` (footnote "fixed during estimation");
    ``boundary`` rows carry ``(b)`` (estimate on the boundary of the parameter
    space). A missing ``se`` leaves the error and interval columns blank.
    """
    label: str
    estimate: float
    se: float | None = None
    lo: float | None = None
    hi: float | None = None
    fixed: bool = False
    boundary: bool = False

    @property
    def marker(self) -> str:
        return "*" if self.fixed else ("(b)" if self.boundary else "")


@dataclass
class RandomBlock:
    """Random-effects parameters of one grouping level and its structure name."""
    level: str
    structure: str
    rows: list[RandomRow]


@dataclass
class GroupRow:
    """Group count and group sizes of one grouping level."""
    name: str
    n_groups: int
    min: int
    avg: float
    max: int
    crossed: bool = False     # crossed with the nested levels (not nested in the one above)


@dataclass(repr=False)
class Summary(Display):
    """Everything an estimation summary shows, ready to render.

    ``as_text()`` gives Stata's plain-text layout (also its ``repr``, so the REPL
    shows the table), ``as_html()`` the same content as HTML tables (notebooks),
    ``as_markdown()`` and ``as_latex()`` the parts as Markdown and LaTeX tables. The
    ``show_*`` switches drop sections (Stata's ``noheader``, ``nogroup``,
    ``nofetable``, ``noretable``, ``nohomtest``).
    """
    title: str
    depvar: str
    nobs: int
    groups: list[GroupRow]
    wald_chi2: float | None
    wald_df: int
    wald_p: float | None
    ll_label: str
    llf: float
    fixed: list[FixedRow]
    Q_M: float | None
    Q_M_df: int
    Q_M_p: float | None
    random: list[RandomBlock]
    level: float = 95.0
    notes: list[str] = field(default_factory=list)
    show_header: bool = True
    show_groups: bool = True
    show_fixed: bool = True
    show_random: bool = True
    show_homtest: bool = True
    constraints: list[str] = field(default_factory=list)
    stat: str = "z"        # "z" (normal) or "t" (t statistics on stated df)

    # ---- shared pieces ---------------------------------------------------- #
    def _ci_label(self) -> str:
        return f"[{self.level:g}% conf. interval]"

    def _wald(self) -> tuple[str, str, str]:
        df = int(self.wald_df) if not _missing(self.wald_df) else 0
        chi2 = "." if df == 0 else fmt_f(self.wald_chi2, 2)
        p = "." if df == 0 else fmt_f(self.wald_p, 4)
        return f"Wald chi2({df})", chi2, p

    def _homtest(self) -> tuple[str, str]:
        df = int(self.Q_M_df) if not _missing(self.Q_M_df) else 0
        return (f"Q_M = chi2({df}) = {fmt_f(self.Q_M, 2)}",
                f"Prob > Q_M = {fmt_f(self.Q_M_p, 4)}")

    def _footnotes(self) -> list[str]:
        rows = [r for b in self.random for r in b.rows] if self.show_random else []
        out = []
        if any(r.fixed for r in rows):
            out.append(_FOOT_FIXED)
        if any(r.boundary and not r.fixed for r in rows):
            out.append(_FOOT_BOUNDARY)
        return out

    # ---- text ------------------------------------------------------------- #
    def as_text(self) -> str:
        parts: list[list[str]] = []
        if self.show_header:
            parts.append(self._text_header())
        if self.show_fixed and self.fixed:
            table = self._text_fixed()
            if self.show_homtest:
                table.append(self._text_homtest())
            parts.append(table)
        elif self.show_homtest:
            parts.append([self._text_homtest()])
        if self.show_random and self.random:
            parts.append(self._text_random() + self._footnotes())
        if self.notes:
            parts.append([ln for note in self.notes for ln in _wrap_note(note)])
        text = "\n\n".join("\n".join(p) for p in parts if p)
        return text + "\n" if text else ""

    def _text_header(self) -> list[str]:
        lines = _pair(self.title, _kv("Number of obs", _fmt_int(self.nobs)))
        groups = self.groups if self.show_groups else []
        if len(groups) == 1:
            g = groups[0]
            lines += _pair(f"Group variable: {g.name}",
                           _kv("Number of groups", _fmt_int(g.n_groups)))
            lines += ["", " " * _LEFT + "Obs per group:"]
            for lab, val in (("min", _fmt_int(g.min)),
                             ("avg", fmt_f(g.avg, 1)),
                             ("max", _fmt_int(g.max))):
                lines.append(" " * _LEFT + _kv(lab, val, right=True))
        elif len(groups) > 1:
            lines += ["", "Grouping information"] + _text_groups(groups)
        label, chi2, p = self._wald()
        lines += ["", " " * _LEFT + _kv(label, chi2)]
        lines += _pair(f"{self.ll_label} = {fmt_g(self.llf, 10)}",
                       _kv("Prob > chi2", p))
        return lines

    def _coef_table(self) -> CoefTable:
        return CoefTable(self.fixed, stat=self.stat, level=self.level)

    def _text_fixed(self) -> list[str]:
        table = self._coef_table()
        rule = "-" * table.width()
        lines = [rule] + table.text_lines(self.depvar) + [rule]
        if self.constraints:
            cons = [f" ({k + 1:>2})  {c}" for k, c in enumerate(self.constraints)]
            lines = ["Constraints:"] + cons + [""] + lines
        return lines

    def _text_homtest(self) -> str:
        left, right = self._homtest()
        left = "Test of homogeneity: " + left
        gap = WIDTH - len(left) - len(right)
        return left + " " * max(gap, 4) + right

    def _random_label_width(self, base: int = 27) -> int:
        """Labels are abbreviated to ``base`` characters while those of each level stay
        distinct; otherwise the label column widens until they are."""
        blocks = [{r.label for r in b.rows} for b in self.random]
        longest = max([len(x) for b in blocks for x in b] + [base])
        # a level's title keeps its structure's name whole (the level name abbreviated to
        # no fewer than 4 characters): long names such as "Spatial exponential (SPEXP)"
        base = max([base] + [min(len(b.level), 4) + len(b.structure) + 1 for b in self.random])
        longest = max(longest, base)
        w = base
        while w < longest and not all(len({_abbrev_label(x, w) for x in b}) == len(b) for b in blocks):
            w += 1
        return w

    def _text_random(self) -> list[str]:
        with_se = any(not _missing(r.se) for b in self.random for r in b.rows)
        lw = self._random_label_width()
        extra = lw - 27
        rest = WIDTH - 30 if with_se else 14
        rule = "-" * (30 + extra + rest)
        mid = "-" * (29 + extra) + "+" + "-" * rest
        head = " " * extra + "  Random-effects parameters  |   Estimate"
        if with_se:
            head += f"   Std. err.{self._ci_label():>25}"
        lines = [rule, head]
        for b in self.random:
            lines.append(mid)
            lines.append(f"{_level_title(b.level, b.structure, 28 + extra):<{29 + extra}}|")
            for r in b.rows:
                cells = f"{fmt_g(r.estimate, 9):>11}"
                if with_se:
                    se = "" if _missing(r.se) else fmt_g(r.se, 9)
                    gap = max(11 - len(r.marker) - len(se), 1 if r.marker and se else 0)
                    cells += r.marker + " " * gap + se
                    ci = not (_missing(r.lo) and _missing(r.hi))
                    cells += (f"{fmt_g(r.lo, 9):>14}{fmt_g(r.hi, 9):>12}"
                              if ci else "")
                else:
                    cells += r.marker
                lines.append(f"{_abbrev_label(r.label, lw):>{lw + 1}} |{cells}".rstrip())
        lines.append(rule)
        return lines

    # ---- neutral tables (Markdown, LaTeX) --------------------------------- #
    def tables(self) -> list[Table]:
        """The summary's parts as neutral tables: header, grouping information,
        fixed effects (with the homogeneity test and constraints as notes), random
        effects (with footnotes); the notes go under the last part."""
        out = []
        groups = self.groups if self.show_groups else []
        if self.show_header:
            label, chi2, p = self._wald()
            rows = [["Dependent variable", self.depvar], ["Number of obs", _fmt_int(self.nobs)]]
            rows += [[label, chi2], ["Prob > chi2", p], [self.ll_label, fmt_g(self.llf, 10)]]
            out.append(Table(["", ""], rows, self.title))
            if groups:
                out.append(Table(["Group variable", "No. of groups", "Minimum", "Average", "Maximum"],
                                 [[g.name, _fmt_int(g.n_groups), _fmt_int(g.min), fmt_f(g.avg, 1),
                                   _fmt_int(g.max)] for g in groups], "Grouping information"))
        homtest = ["Test of homogeneity: " + ", ".join(self._homtest())] if self.show_homtest else []
        if self.show_fixed and self.fixed:
            cons = [f"Constraint ({k + 1}): {c}" for k, c in enumerate(self.constraints)]
            out.append(self._coef_table().table(self.depvar, "Fixed effects", homtest + cons))
        elif homtest:
            out.append(Table(["", ""], [["Test of homogeneity", ", ".join(self._homtest())]]))
        if self.show_random and self.random:
            with_se = any(not _missing(r.se) for b in self.random for r in b.rows)
            cols = ["Random-effects parameters", "Estimate"]
            cols += ["Std. err.", f"[{self.level:g}% conf.", "interval]"] if with_se else []
            rows = []
            for b in self.random:
                rows.append(Section(f"{b.level}: {b.structure}" if b.structure else b.level))
                for r in b.rows:
                    cells = [r.label, fmt_g(r.estimate, 9) + r.marker]
                    if with_se:
                        cells += ["" if _missing(v) else fmt_g(v, 9) for v in (r.se, r.lo, r.hi)]
                    rows.append(cells)
            out.append(Table(cols, rows, "Random effects", self._footnotes()))
        if self.notes:
            if not out:
                out.append(Table(["", ""], []))
            out[-1].notes = list(out[-1].notes) + [f"Note: {n}" for n in self.notes]
        return out

    # ---- HTML ------------------------------------------------------------- #
    def _repr_html_(self) -> str:
        return self.as_html()

    def as_html(self) -> str:
        out = ['<div class="mlmeta-summary">', _CSS]
        if self.show_header:
            out += self._html_header()
        if self.show_fixed and self.fixed:
            out += self._html_fixed()
        if self.show_homtest:
            left, right = self._homtest()
            out += ['<table class="mlmeta-homtest"><tbody><tr>',
                    "<th>Test of homogeneity</th>",
                    f"<td>{_e(left)}</td><td>{_e(right)}</td>",
                    "</tr></tbody></table>"]
        if self.show_random and self.random:
            out += self._html_random()
            out += [f'<p class="mlmeta-footnote">{_e(f)}</p>' for f in self._footnotes()]
        out += [f'<p class="mlmeta-note">Note: {_e(n)}</p>' for n in self.notes]
        out.append("</div>")
        return "\n".join(out)

    def _html_header(self) -> list[str]:
        label, chi2, p = self._wald()
        rows = [("Dependent variable", self.depvar),
                ("Number of obs", _fmt_int(self.nobs))]
        groups = self.groups if self.show_groups else []
        if len(groups) == 1:
            g = groups[0]
            rows += [("Group variable", g.name),
                     ("Number of groups", _fmt_int(g.n_groups)),
                     ("Obs per group: min", _fmt_int(g.min)),
                     ("Obs per group: avg", fmt_f(g.avg, 1)),
                     ("Obs per group: max", _fmt_int(g.max))]
        rows += [(label, chi2), ("Prob > chi2", p),
                 (self.ll_label, fmt_g(self.llf, 10))]
        out = ['<table class="mlmeta-header">', f"<caption>{_e(self.title)}</caption>",
               "<tbody>"]
        out += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows]
        out.append("</tbody></table>")
        if len(groups) > 1:
            out += ['<table class="mlmeta-groups">',
                    "<caption>Grouping information</caption>",
                    "<thead><tr><th>Group variable</th><th>No. of groups</th>"
                    "<th>Minimum</th><th>Average</th><th>Maximum</th></tr></thead>",
                    "<tbody>"]
            out += [_html_row(g.name, [_fmt_int(g.n_groups), _fmt_int(g.min),
                                       fmt_f(g.avg, 1), _fmt_int(g.max)])
                    for g in groups]
            out.append("</tbody></table>")
        return out

    def _html_fixed(self) -> list[str]:
        table = self._coef_table()
        out = ['<table class="mlmeta-fixed">',
               f"<thead><tr><th>{_e(self.depvar)}</th><th>Coefficient</th>"
               f"<th>Std. err.</th><th>{self.stat}</th><th>P&gt;|{self.stat}|</th>"
               f'<th colspan="2">{_e(self._ci_label())}</th></tr></thead>',
               "<tbody>"]
        for row in table.table_rows():
            if isinstance(row, Section):
                out.append(f'<tr><th colspan="7" class="mlmeta-factor">{_e(row.label)}</th></tr>')
            else:
                out.append(_html_row(row[0], row[1:]))
        out.append("</tbody></table>")
        return out

    def _html_random(self) -> list[str]:
        with_se = any(not _missing(r.se) for b in self.random for r in b.rows)
        ncol = 5 if with_se else 2
        head = "<th>Random-effects parameters</th><th>Estimate</th>"
        if with_se:
            head += f'<th>Std. err.</th><th colspan="2">{_e(self._ci_label())}</th>'
        out = ['<table class="mlmeta-random">', f"<thead><tr>{head}</tr></thead>"]
        for b in self.random:
            out += ["<tbody>", f'<tr><th colspan="{ncol}" class="mlmeta-level">'
                    f"{_e(b.level)}: {_e(b.structure)}</th></tr>"]
            for r in b.rows:
                cells = [fmt_g(r.estimate, 9) + r.marker]
                if with_se:
                    cells += ["" if _missing(v) else fmt_g(v, 9)
                              for v in (r.se, r.lo, r.hi)]
                out.append(_html_row(r.label, cells))
            out.append("</tbody>")
        out.append("</table>")
        return out


# --------------------------------------------------------------------------- #
# text helpers
# --------------------------------------------------------------------------- #
def _kv(label: str, value: str, right: bool = False) -> str:
    """Right-hand header item: label (col 49), '=' (col 67), value (cols 69-78)."""
    lab = f"{label:>17} " if right else f"{label:<18}"
    return f"{lab}= {value:>10}"


def _pair(left: str, right: str) -> list[str]:
    if len(left) < _LEFT:
        return [f"{left:<{_LEFT}}{right}"]
    return [left, " " * _LEFT + right]


def _text_groups(groups: list[GroupRow]) -> list[str]:
    rule = "-" * 61
    lines = [rule,
             "                |     No. of       Observations per group",
             " Group variable |     groups    Minimum    Average    Maximum",
             "-" * 16 + "+" + "-" * 44]
    for g in groups:
        lines.append(f"{abbrev(g.name, 15):>15} |{_fmt_int(g.n_groups):>11}"
                     f"{_fmt_int(g.min):>11}{fmt_f(g.avg, 1):>11}{_fmt_int(g.max):>11}")
    lines.append(rule)
    crossed = [g.name for g in groups if g.crossed]
    if crossed:
        nested = [g.name for g in groups if not g.crossed]
        lines += textwrap.wrap(f"Crossed: {', '.join(crossed)} crossed with "
                               f"{' > '.join(nested)}", WIDTH)
    return lines


def _level_title(level: str, structure: str, n: int) -> str:
    text = f"{level}: {structure}"
    if len(text) <= n:
        return text
    return f"{abbrev(level, max(n - len(structure) - 2, 4))}: {structure}"[:n]


def _wrap_note(note: str) -> list[str]:
    return textwrap.wrap("Note: " + note, WIDTH, subsequent_indent=" " * 6,
                         break_long_words=False, break_on_hyphens=False) or ["Note:"]


# --------------------------------------------------------------------------- #
# HTML helpers
# --------------------------------------------------------------------------- #
def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _html_row(name: str, cells: list[str]) -> str:
    tds = "".join(f"<td>{_e(c)}</td>" for c in cells)
    return f"<tr><th>{_e(name)}</th>{tds}</tr>"


_CSS = """<style>
.mlmeta-summary table { border-collapse: collapse; margin: 0.4em 0; }
.mlmeta-summary caption { text-align: left; font-weight: bold; }
.mlmeta-summary th, .mlmeta-summary td { padding: 0.1em 0.6em; }
.mlmeta-summary td { text-align: right; font-variant-numeric: tabular-nums; }
.mlmeta-summary tbody th { text-align: right; font-weight: normal; }
.mlmeta-summary thead th { border-bottom: 1px solid; }
.mlmeta-summary th.mlmeta-level { text-align: left; font-weight: bold; }
.mlmeta-summary th.mlmeta-factor { text-align: left; }
.mlmeta-summary .mlmeta-header th { text-align: left; }
</style>"""


def confidence_level(level=95.0, alpha=None) -> float:
    """The confidence level in percent. ``level`` is the one spelling across mlmeta
    (Stata's ``level()``, 10 to 99.99); ``alpha`` (statsmodels) is accepted as
    ``level = 100 (1 - alpha)``."""
    if alpha is not None:
        level = 100.0 * (1.0 - float(alpha))
    try:
        level = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"level must be a percentage such as 95, got {level!r}") from None
    if not 10.0 <= level < 100.0:
        raise ValueError(f"level must be a percentage between 10 and 99.99 (95 for a 95% "
                         f"interval; statsmodels' alpha=0.05 is level=95), got {level!r}")
    return level


def t_table(names, params, bse, tvalues, df, pvalues, ci, level=95.0) -> CoefTable:
    """The :class:`CoefTable` of t tests with per-coefficient df (OLS, robust inference,
    two-stage); ``ci`` is a DataFrame with columns lower/upper indexed by ``names``."""
    rows = [FixedRow(nm, params[nm], bse[nm], tvalues[nm], pvalues[nm], ci.loc[nm, "lower"],
                     ci.loc[nm, "upper"]) for nm in names]
    return CoefTable(rows, stat="t", df=[df[nm] for nm in names], level=level)


def t_table_lines(depvar, names, params, bse, tvalues, df, pvalues, ci, level=95.0, width=WIDTH):
    """:func:`t_table` rendered as text, with its closing rule."""
    table = t_table(names, params, bse, tvalues, df, pvalues, ci, level)
    return table.text_lines(depvar, width) + ["-" * table.width(width)]
