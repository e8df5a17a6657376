"""Command-line interface: ``mlmeta fit DATA.csv "FORMULA" --variance COL``.

::

    mlmeta fit schoolcal.csv "stdmdiff ~ 1 + (1 | district) + (1 | district:school)" --variance var
    mlmeta fit data.csv "y ~ x + (1 + x | a) + (1 | a:b)" --se se --method ml \
        --covariance a=independent
    mlmeta fit --example schoolcal --json
    python -m mlmeta fit --example pupiliq --variance-components

The estimation table is printed on standard output (or the results as JSON with
``--json``). Problems with the input -- a missing file, an unreadable table, an
unknown column, a malformed formula -- are reported on standard error as
``mlmeta: error: ...`` with exit status 2; warnings raised while fitting are
reported as ``mlmeta: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

__all__ = ["main", "EXAMPLES"]

PROG = "mlmeta"

# name -> (formula, sampling option, column, description)
EXAMPLES = {
    "schoolcal": ("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", "variance", "var",
                  "effects of modified school calendars, schools nested in districts"),
    "pupiliq": ("stdmdiff ~ 1 + (1 | study)", "se", "se",
                "effect of teacher expectancy on pupil IQ, one effect per study"),
}


class UsageError(Exception):
    """A command-line usage error (reported like every other error, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # noqa: D401 - argparse hook
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    from mlmeta import __version__

    parser = _Parser(prog=PROG, description="Multilevel meta-regression from the command line.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    examples = "\n".join(f"  {k:<10} {v[0]}  ({v[1]}={v[2]!r})" for k, v in EXAMPLES.items())
    fit = sub.add_parser(
        "fit", help="fit a multilevel meta-regression and print the estimation table",
        description="Fit a multilevel meta-regression (REML by default) and print the "
                    "estimation table.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="bundled examples (--example NAME):\n" + examples + "\n\n"
               "With --example, a single positional argument is taken as a formula that "
               "replaces the example's.")
    fit.add_argument("data", nargs="?", metavar="DATA",
                     help="CSV file with one row per effect size ('-' reads standard input; "
                          ".tsv, .dta and .parquet are read by extension)")
    fit.add_argument("formula", nargs="?", metavar="FORMULA",
                     help='model formula, e.g. "y ~ x + (1 | district) + (1 | district:school)"')
    fit.add_argument("--example", choices=sorted(EXAMPLES), metavar="NAME",
                     help="fit a bundled example: " + ", ".join(sorted(EXAMPLES)))
    samp = fit.add_mutually_exclusive_group()
    samp.add_argument("--variance", metavar="COL", help="column of sampling variances")
    samp.add_argument("--se", metavar="COL", help="column of sampling standard errors")
    fit.add_argument("--method", choices=["reml", "ml"], default="reml", type=str.lower,
                     help="estimation method (default: reml)")
    fit.add_argument("--covariance", action="append", default=[], metavar="TERM=TYPE",
                     help="covariance structure of a grouping term: independent, exchangeable, "
                          "identity or unstructured (repeatable)")
    fit.add_argument("--variance-components", action="store_true",
                     help="report variances and covariances instead of SDs and correlations")
    fit.add_argument("--level", type=float, default=95.0, metavar="PCT",
                     help="confidence level in percent (default: 95)")
    fit.add_argument("--json", action="store_true", help="print the results as JSON")
    fit.add_argument("--verbose", action="store_true",
                     help="print the iteration log (on standard error with --json)")
    return parser


# --------------------------------------------------------------------------- #
# inputs

def _read_table(path: str):
    import pandas as pd

    if path == "-":
        try:
            return pd.read_csv(sys.stdin)
        except (ValueError, OSError) as exc:
            raise ValueError(f"cannot read standard input as CSV: {exc}") from None
    p = Path(path)
    if not p.exists():
        raise ValueError(f"no such file: {path!r}")
    if p.is_dir():
        raise ValueError(f"{path!r} is a directory, not a data file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".tsv", ".tab"):
            df = pd.read_csv(p, sep="\t")
        elif suffix == ".dta":
            df = pd.read_stata(p)
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p)
    except ImportError as exc:
        raise ValueError(f"cannot read {path!r}: {exc}") from None
    except (ValueError, OSError) as exc:   # pandas' ParserError/EmptyDataError are ValueErrors
        msg = str(exc).strip() or type(exc).__name__
        raise ValueError(f"cannot read {path!r}: {msg}") from None
    if df.shape[1] == 0 or df.shape[0] == 0:
        raise ValueError(f"{path!r} has no data rows")
    return df


def _load_example(name: str):
    """The bundled data set ``name`` (through mlmeta.datasets when it offers a loader)."""
    try:
        from mlmeta import datasets

        load = getattr(datasets, "load", None)
    except ImportError:
        load = None
    if load is not None:
        return load(name)
    import pandas as pd

    import mlmeta

    path = Path(mlmeta.__file__).resolve().parent / "datasets" / f"{name}.csv"
    if not path.exists():
        raise ValueError(f"the bundled data set {name!r} is not installed")
    return pd.read_csv(path)


def _covariance(specs) -> dict | None:
    out = {}
    for spec in specs:
        term, sep, kind = spec.rpartition("=")
        term, kind = term.strip(), kind.strip().lower()
        if not sep or not term or not kind:
            raise UsageError(f"--covariance expects TERM=TYPE (e.g. district=unstructured), "
                             f"got {spec!r}")
        if term in out:
            raise UsageError(f"--covariance gives grouping term {term!r} twice")
        out[term] = kind
    return out or None


# --------------------------------------------------------------------------- #
# outputs

def _plain(obj):
    """Recursively convert to JSON-safe Python: numpy scalars/arrays, pandas objects,
    non-finite floats -> None."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_plain(v) for v in obj.tolist()]
    if hasattr(obj, "to_dict"):            # pandas Series / DataFrame
        try:
            return _plain(obj.to_dict())
        except TypeError:
            pass
    try:                                   # pandas NA / NaT and other missing scalars
        import pandas as pd

        if pd.isna(obj):
            return None
    except (TypeError, ValueError):
        pass
    return str(obj)


def _results_json(res, formula: str, level: float, variance: bool) -> str:
    d = res.to_dict()
    d = {"formula": formula, "depvar": res.depvar, **d, "level": level}
    if level != 95.0 or variance:
        ci = res.conf_int(level)
        d["conf_int"] = {k: [ci.loc[k, "lower"], ci.loc[k, "upper"]] for k in ci.index}
        d["re_params"] = res.re_params(variance=variance, level=level).to_dict(orient="records")
    return json.dumps(_plain(d), indent=2, allow_nan=False)


# --------------------------------------------------------------------------- #

def _fit(args) -> int:
    import mlmeta

    if args.example:
        if args.formula is not None:
            raise UsageError("--example takes at most one positional argument (a formula "
                             "replacing the example's), not a data file")
        ex_formula, ex_kind, ex_col, _ = EXAMPLES[args.example]
        formula = args.data if args.data is not None else ex_formula
        data = _load_example(args.example)
        if args.variance is None and args.se is None:
            setattr(args, ex_kind, ex_col)
    else:
        if args.data is None or args.formula is None:
            raise UsageError("fit needs a data file and a formula (or --example NAME)")
        formula = args.formula
        if args.variance is None and args.se is None:
            raise UsageError("give the sampling variances (--variance COL) or standard "
                             "errors (--se COL)")
        data = _read_table(args.data)
    if not (0.0 < args.level < 100.0):
        raise UsageError(f"--level must be between 0 and 100, got {args.level:g}")
    covariance = _covariance(args.covariance)

    log_to = sys.stderr if args.json else sys.stdout
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(log_to):
        warnings.simplefilter("always")
        res = mlmeta.meregress(formula, data, se=args.se, variance=args.variance,
                               method=args.method, covariance=covariance, verbose=args.verbose)
    for w in caught:
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    if args.verbose and not args.json:
        print()

    if args.json:
        out = _results_json(res, formula, args.level, args.variance_components)
    else:
        out = str(res.summary(variance=args.variance_components, level=args.level))
    sys.stdout.write(out.rstrip("\n") + "\n")
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    """Run the command line ``mlmeta ...``; return the exit status."""
    parser = _build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:          # --help / --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else 2
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return _fit(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}\n(see '{PROG} fit --help')", file=sys.stderr)
        return 2
    except BrokenPipeError:                # e.g. `mlmeta fit ... | head`: not an error
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, OSError, FloatingPointError, np.linalg.LinAlgError) as exc:
        msg = str(exc).strip() or type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
