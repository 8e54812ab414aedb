"""The wheel holds every package of the product: an editable install hides a missing one, an image does not."""

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_product_package_is_in_the_wheel():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    tops = sorted({name.split(".")[0] for name in listed})
    found = find_packages(ROOT, include=[pattern for top in tops for pattern in (top, f"{top}.*")])
    assert sorted(found) == sorted(listed), f"pyproject.toml [tool.setuptools] packages misses {sorted(set(found) - set(listed))}"
