"""Neutral tables and their renderers: how every printed result of mlmeta shows itself.

A result that prints (an estimation summary, a test, a comparison of models) says two
things: its plain-text layout (``as_text()``, Stata's) and its content as a list of
neutral :class:`Table` objects (``tables()``): a caption, column headers, rows of
already formatted cells, :class:`Section` rows (a factor's name above its levels, a
grouping level above its parameters) and notes. :class:`Display` turns these into what
users see:

* ``repr(obj)`` / ``print(obj)`` -- the text table (at the REPL, not a dataclass dump);
* ``_repr_html_()`` -- HTML tables in notebooks;
* ``as_markdown()`` -- pipe tables (GitHub, Quarto, Jupyter markdown cells);
* ``as_latex()`` -- booktabs ``tabular`` environments (``\\usepackage{booktabs}``).

Labels are never abbreviated in HTML, Markdown or LaTeX.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

__all__ = ["Table", "Section", "Display", "TextDisplay", "to_html", "to_markdown", "to_latex"]


@dataclass
class Section:
    """A row spanning the table: the name of the rows under it (a factor, a level)."""
    label: str


@dataclass
class Table:
    """A neutral table. ``columns``: header cells (the first heads the row labels);
    ``rows``: lists of formatted cells (one per column) or :class:`Section` rows;
    ``notes``: lines shown under the table."""
    columns: list
    rows: list
    caption: str = ""
    notes: list = field(default_factory=list)


class Display:
    """What every printed result of mlmeta can show: text, HTML, Markdown and LaTeX.

    Summaries (:meth:`MeregressResults.summary`), tests (``wald_test``, ``t_test``,
    :func:`lrtest`, robust tests), comparisons (:func:`estimates_table`) and
    heterogeneity statistics are ``Display`` objects: ``print(obj)`` and the REPL show
    the text table (Stata's layout), notebooks the HTML tables, and ``as_markdown()``
    and ``as_latex()`` export the same content for reports. Subclasses give
    ``as_text()`` and ``tables()`` (a list of neutral :class:`Table` objects); labels
    are never abbreviated outside the text layout.

    Examples
    --------
    >>> import mlmeta
    >>> df = mlmeta.datasets.load("schoolcal")
    >>> res = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
    ...                        df, variance="var")
    >>> test = res.wald_test("year_c = 0")
    >>> print(test)
     ( 1)  year_c = 0
    <BLANKLINE>
                 chi2(1) =     0.32
             Prob > chi2 =   0.5735
    >>> print(test.as_markdown())
    **Wald test**
    ...
    """

    def as_text(self) -> str:          # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def tables(self) -> list[Table]:   # pragma: no cover
        raise NotImplementedError

    def __str__(self) -> str:
        return self.as_text()

    def __repr__(self) -> str:
        return self.as_text().rstrip("\n")

    def _repr_html_(self) -> str:
        return to_html(self.tables())

    def as_html(self) -> str:
        """HTML tables (what notebooks show).

        Returns
        -------
        str
            One ``<table class="mlmeta-table">`` per part, in a
            ``<div class="mlmeta-display">``, notes as paragraphs.
        """
        return self._repr_html_()

    def as_markdown(self) -> str:
        """Markdown pipe tables, one per part, with captions in bold and notes as text.

        Numbers are right-aligned, the label column left-aligned; Markdown's special
        characters are escaped.

        Returns
        -------
        str
            The tables, separated by blank lines (GitHub, Quarto and Jupyter render
            them).

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                        df, variance="var")
        >>> print(res.summary(header=False, group=False, random=False).as_markdown())
        **Fixed effects**
        <BLANKLINE>
        | stdmdiff | Coefficient | Std. err. | z | P\\>\\|z\\| | \\[95% conf. | interval\\] |
        |:---|---:|---:|---:|---:|---:|---:|
        | \\_cons | .1847132 | .0845559 | 2.18 | 0.029 | .0189866 | .3504397 |
        <BLANKLINE>
        Test of homogeneity: Q\\_M = chi2(55) = 578.86, Prob \\> Q\\_M = 0.0000
        """
        return to_markdown(self.tables())

    def as_latex(self) -> str:
        """LaTeX ``tabular`` environments with booktabs rules, one per part.

        Needs ``\\usepackage{booktabs}``; captions are bold rows spanning the table,
        sections italic rows, notes ``\\footnotesize`` paragraphs; LaTeX's special
        characters are escaped.

        Returns
        -------
        str
            The environments, separated by blank lines.

        Examples
        --------
        >>> import mlmeta
        >>> df = mlmeta.datasets.load("schoolcal")
        >>> full = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
        ...                         df, variance="var")
        >>> reduced = mlmeta.meregress("stdmdiff ~ 1 + (1 | district)", df, variance="var")
        >>> print(mlmeta.lrtest(full, reduced).as_latex())
        \\begin{tabular}{lr}
        \\multicolumn{2}{l}{\\textbf{Likelihood-ratio test}} \\\\
        \\toprule
        LR chi2(1) & 48.52 \\\\
        Prob \\textgreater{} chi2 & 0.0000 \\\\
        ...
        \\end{tabular}
        ...
        """
        return to_latex(self.tables())


class TextDisplay(str, Display):
    """A rendered text table that is also a ``str`` (``"x" in res.summary()``, ``print``),
    shown as text at the REPL and rendered from its neutral ``tables`` elsewhere."""

    def __new__(cls, text: str, tables=()):
        obj = super().__new__(cls, text)
        obj._tables = list(tables)
        return obj

    def __reduce__(self):
        return (type(self), (str(self), self._tables))

    def as_text(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:          # str's own would show a quoted string
        return Display.__repr__(self)

    def tables(self) -> list[Table]:
        return list(self._tables)


# --------------------------------------------------------------------------- #
# HTML
# --------------------------------------------------------------------------- #
def _e(s) -> str:
    return html.escape(str(s), quote=True)


def to_html(tables) -> str:
    out = ['<div class="mlmeta-display">']
    for t in tables:
        out.append('<table class="mlmeta-table">')
        if t.caption:
            out.append(f"<caption>{_e(t.caption)}</caption>")
        if any(str(c) for c in t.columns):
            out.append("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in t.columns)
                       + "</tr></thead>")
        out.append("<tbody>")
        for r in t.rows:
            if isinstance(r, Section):
                out.append(f'<tr><th colspan="{len(t.columns)}" style="text-align:left">'
                           f"{_e(r.label)}</th></tr>")
            else:
                out.append(f"<tr><th>{_e(r[0])}</th>" + "".join(f"<td>{_e(c)}</td>" for c in r[1:])
                           + "</tr>")
        out.append("</tbody></table>")
        out += [f"<p>{_e(n)}</p>" for n in t.notes]
    out.append("</div>")
    return "\n".join(out)


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #
_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_|[]<>"})


def _md(s) -> str:
    return str(s).translate(_MD_SPECIAL)


def to_markdown(tables) -> str:
    parts = []
    for t in tables:
        lines = []
        if t.caption:
            lines += [f"**{_md(t.caption)}**", ""]
        n = len(t.columns)
        lines.append("| " + " | ".join(_md(c) for c in t.columns) + " |")
        lines.append("|" + "|".join([":---"] + ["---:"] * (n - 1)) + "|")
        for r in t.rows:
            if isinstance(r, Section):
                lines.append(f"| **{_md(r.label)}** |" + " |" * (n - 1))
            else:
                lines.append("| " + " | ".join(_md(c) for c in r) + " |")
        if t.notes:
            lines += [""] + [_md(note) + "  " for note in t.notes]
        parts.append("\n".join(lines).rstrip())
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- #
# LaTeX
# --------------------------------------------------------------------------- #
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
                "|": r"\textbar{}", "[": "{[}", "]": "{]}"}


def _tex(s) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(s))


def to_latex(tables) -> str:
    parts = []
    for t in tables:
        n = len(t.columns)
        lines = [r"\begin{tabular}{l" + "r" * (n - 1) + "}"]
        if t.caption:
            lines.append(rf"\multicolumn{{{n}}}{{l}}{{\textbf{{{_tex(t.caption)}}}}} \\")
        lines.append(r"\toprule")
        if any(str(c) for c in t.columns):
            lines += [" & ".join(_tex(c) for c in t.columns) + r" \\", r"\midrule"]
        for r in t.rows:
            if isinstance(r, Section):
                lines.append(rf"\multicolumn{{{n}}}{{l}}{{\textit{{{_tex(r.label)}}}}} \\")
            else:
                lines.append(" & ".join(_tex(c) for c in r) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [rf"{{\footnotesize {_tex(note)}}}\par" for note in t.notes]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
