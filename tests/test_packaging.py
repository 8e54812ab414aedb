"""The wheel installs exactly one top-level package, ``uembed``, with every package of the tree in it: an editable
install hides a missing one, an image does not; and a second top-level name (``model``, ``service``...) would
collide with any other package of that common name."""

import subprocess
import zipfile
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_one_top_level_package_holding_every_package_of_the_tree(uembed_wheel):
    # Built from a copy of what the images install: a build/ folder left in the checkout would add stale modules.
    wheel = uembed_wheel
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["uembed"]
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"uembed"}, f"the wheel installs {sorted(tops)} at the top of site-packages"
    packaged = {name.rsplit("/", 1)[0].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert packaged == set(find_packages(ROOT, include=["uembed", "uembed.*"]))
    tracked = subprocess.run(["git", "ls-files", "uembed/*.py", "uembed/**/*.py"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:  # a git checkout: the wheel's modules are exactly the tracked ones
        assert {n for n in names if n.endswith(".py")} == set(tracked.stdout.split())
