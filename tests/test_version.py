"""One version number: project(version:) in meson.build, read into the package metadata
by meson-python (``dynamic = ["version"]``) and from there into ``mlmeta.__version__``."""

import re
from importlib.metadata import version
from pathlib import Path

import pytest

import mlmeta

MESON_BUILD = Path(__file__).resolve().parents[1] / "meson.build"


def test_version_is_the_installed_metadata():
    assert mlmeta.__version__ == version("mlmeta")
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", mlmeta.__version__)


@pytest.mark.skipif(not MESON_BUILD.exists(), reason="tests run outside the source tree")
def test_version_is_meson_builds():
    m = re.search(r"project\([^)]*?version\s*:\s*'([^']+)'", MESON_BUILD.read_text(), re.S)
    assert m is not None, "meson.build has no project(..., version: '...')"
    assert mlmeta.__version__ == m.group(1)


def test_pyproject_does_not_repeat_the_version():
    pyproject = MESON_BUILD.with_name("pyproject.toml")
    if not pyproject.exists():
        pytest.skip("tests run outside the source tree")
    text = pyproject.read_text()
    assert re.search(r'^dynamic\s*=\s*\[[^\]]*"version"', text, re.M)
    assert not re.search(r"^version\s*=", text, re.M)
