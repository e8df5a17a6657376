"""The public API's docstrings: their examples run (doctest) and every public function
and class has the numpydoc sections the API reference promises.

With an editable install the same examples run with
``python -m pytest --doctest-modules src/mlmeta``.
"""

import doctest
import importlib
import inspect
import re

import pytest

PUBLIC_MODULES = ["mlmeta", "mlmeta.datasets", "mlmeta.plots", "mlmeta.simulate", "mlmeta.simstudy"]
# modules whose docstrings hold the examples of the public names (where they are defined)
EXAMPLE_MODULES = [
    "mlmeta", "mlmeta.api", "mlmeta.mixed", "mlmeta.batch", "mlmeta.results",
    "mlmeta.postestimation", "mlmeta.robust", "mlmeta.vcalc", "mlmeta.compare", "mlmeta.ols",
    "mlmeta.twostage", "mlmeta.satterthwaite", "mlmeta.datasets",
    "mlmeta.plots", "mlmeta.simulate", "mlmeta.simstudy", "mlmeta._errors", "mlmeta.marginal_means",
    "mlmeta.inference_methods", "mlmeta.profile_likelihood", "mlmeta.robust_results", "mlmeta.display",
    "mlmeta.pubbias",
]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public_objects():
    out = []
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{modname}.{name}", obj))
    return out


def _sections(doc):
    return set(re.findall(r"^\s*(\w[\w ]*)\n\s*-{3,}\s*$", doc or "", re.M))


@pytest.mark.parametrize("modname", EXAMPLE_MODULES)
def test_examples_run(modname):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mod = importlib.import_module(modname)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    # the finder keeps objects defined in this module: re-exports are tested where defined
    tests = [t for t in finder.find(mod, modname, globs={}) if t.examples]
    assert tests, f"{modname} has no examples"
    for t in tests:
        runner.run(t)
    plt.close("all")
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {modname}"


@pytest.mark.parametrize("qualname,obj", _public_objects(), ids=lambda x: x if isinstance(x, str) else "")
def test_public_docstrings_have_numpydoc_sections(qualname, obj):
    doc = inspect.getdoc(obj)
    assert doc, f"{qualname} has no docstring"
    found = _sections(doc)
    assert "Examples" in found, f"{qualname}: no Examples section"
    if inspect.isfunction(obj):
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if params:
            assert "Parameters" in found, f"{qualname}: no Parameters section"
        assert "Returns" in found, f"{qualname}: no Returns section"
        # "a : type", "a, b : type" and "a, b" (no type) lines document parameters
        names = set()
        for line in re.findall(r"^([\w, ]+?)\s*(?::|$)", doc, re.M):
            names.update(x.strip() for x in line.split(","))
        missing = [p.name for p in params if p.name not in names]
        assert not missing, f"{qualname}: parameters not documented: {missing}"
