"""The image builds see this machine's pip configuration: every local path a setting names is
mounted at the same path, and a path this machine lacks is left out with a warning. Builds
nothing: pip_mounts reads `pip config list` under a temporary PIP_CONFIG_FILE."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from deploy.podman.images import pip_mounts


def mounts_and_conf(workdir: Path) -> tuple[list[str], str]:
    args = pip_mounts(workdir)
    assert args[::2] == ["-v"] * (len(args) // 2)
    return args[1::2], (workdir / "pip.conf").read_text()


@pytest.fixture
def pip_config(tmp_path, monkeypatch):
    """Write a pip configuration file that pip here reads last (it wins over the machine's files);
    PIP_* variables, which would win over it, are cleared."""
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)

    def write(**settings: str) -> None:
        conf = tmp_path / "host-pip.conf"
        conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))

    return write


def test_a_constraint_file_and_a_file_index_are_mounted_at_the_same_path(tmp_path, pip_config):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    pip_config(constraint=str(constraints), **{"index-url": f"file://{index}"}, timeout="180")
    workdir = tmp_path / "build"
    workdir.mkdir()

    mounts, conf = mounts_and_conf(workdir)

    assert f"{workdir / 'pip.conf'}:/etc/pip.conf:ro" in mounts
    assert f"{constraints}:{constraints}:ro" in mounts
    assert f"{index.parent}:{index.parent}:ro" in mounts  # the simple/ folder links to files beside it
    assert f"constraint = {constraints}\n" in conf
    assert f"index-url = file://{index}\n" in conf
    assert "timeout = 180\n" in conf  # not a path: passed on as it is


def test_a_relative_path_is_mounted_and_written_absolute(tmp_path, pip_config, monkeypatch):
    (tmp_path / "wheels").mkdir()
    monkeypatch.chdir(tmp_path)
    pip_config(**{"find-links": "wheels"})

    mounts, conf = mounts_and_conf(tmp_path)

    assert f"{tmp_path / 'wheels'}:{tmp_path / 'wheels'}:ro" in mounts
    assert f"find-links = {tmp_path / 'wheels'}\n" in conf


def test_a_setting_naming_a_missing_path_is_left_out_with_a_warning(tmp_path, pip_config, caplog):
    missing = tmp_path / "absent" / "constraints.txt"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    pip_config(constraint=str(missing), **{"find-links": f"{wheels} {tmp_path / 'gone'}"})

    with caplog.at_level(logging.WARNING):
        mounts, conf = mounts_and_conf(tmp_path)

    assert not any(str(missing) in mount or "gone" in mount for mount in mounts)
    assert "constraint" not in conf and "gone" not in conf
    assert f"find-links = {wheels}\n" in conf  # the setting's other, present path is kept
    warned = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert str(missing) in warned and "constraint" in warned and str(tmp_path / "gone") in warned
