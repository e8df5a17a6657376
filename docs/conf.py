"""Sphinx configuration of mlmeta's documentation.

Build (from the repository root)::

    pip install ".[docs]" && sphinx-build -W -b html docs docs/_build/html

Every guide (``docs/guides/*.md``, MyST notebooks run by myst-nb) and every gallery
example (``docs/gallery/plot_*.py``, run by sphinx-gallery) is executed at each build;
an exception in any of them, a broken cross-reference or a public name missing from
the API reference fails the build.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import mlmeta  # noqa: E402

HERE = Path(__file__).resolve().parent

project = "mlmeta"
author = "The mlmeta developers"
copyright = "The mlmeta developers"
version = release = mlmeta.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_nb",
    "sphinx_gallery.gen_gallery",
]

exclude_patterns = [
    "_build", "jupyter_execute", "gallery/*", "auto_gallery/*.ipynb", "auto_gallery/*.py",
    "auto_gallery/*.zip", "**/.ipynb_checkpoints",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
root_doc = "index"
nitpicky = False
default_role = "py:obj"

# -- API reference --------------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True

# -- executed guides (myst-nb) ---------------------------------------------------
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# -- gallery (sphinx-gallery) ----------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "gallery",
    "gallery_dirs": "auto_gallery",
    "filename_pattern": r"/plot_",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "plot_gallery": "True",
}

# -- HTML ---------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"mlmeta {release}"
html_static_path = ["_static"]
html_css_files = ["mlmeta.css"]
html_show_sourcelink = False
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}


# -- every public name is in the API reference ------------------------------------
PUBLIC_MODULES = ["mlmeta", "mlmeta.datasets", "mlmeta.plots", "mlmeta.simulate", "mlmeta.simstudy"]
_DIRECTIVE = re.compile(
    r"^\.\.\s+auto(?:function|class|data|exception)::\s+(?P<name>mlmeta\.[\w.]+)\s*$", re.M)


def public_names() -> list[str]:
    """Qualified names of everything a user can import: ``__all__`` of the public modules."""
    out = []
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if name == "__version__" or (modname == "mlmeta" and hasattr(obj, "__spec__")):
                continue                     # submodules have pages of their own
            out.append(f"{modname}.{name}")
    return out


def documented_names() -> set[str]:
    names = set()
    for path in (HERE / "api").glob("*.rst"):
        names.update(m.group("name") for m in _DIRECTIVE.finditer(path.read_text()))
    return names


def _check_api_reference(app):
    missing = [n for n in public_names() if n not in documented_names()]
    if missing:
        raise RuntimeError("public names missing from docs/api/*.rst: " + ", ".join(missing))


def setup(app):
    app.connect("builder-inited", _check_api_reference)
    os.environ.setdefault("MPLBACKEND", "Agg")
