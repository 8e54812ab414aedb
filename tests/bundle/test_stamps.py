"""Verification stamps (uembed/bundle/stamps.py): a bundle file's sha256 read once per file, a changed file refused."""

import json
import os

import pytest

from uembed.bundle import stamps as stamps_module
from uembed.bundle.loader import load_bundle
from uembed.bundle.stamps import STAMP_FILE, cache_file
from uembed.bundle.synthetic import criteo_features, write_synthetic_bundle
from uembed.contract.errors import BundleError


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return write_synthetic_bundle(tmp_path / "store", "stamped", criteo_features(3), 4096, hidden=(8,), progress=False)


@pytest.fixture
def hashed(monkeypatch):
    """The files whose bytes the loader reads to hash them, in order (the real hashing, counted)."""
    files = []
    real = stamps_module.sha256_file

    def counting(path, *args, **kwargs):
        files.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(stamps_module, "sha256_file", counting)
    return files


def row_file(bundle):
    return bundle / json.loads((bundle / "manifest.json").read_text())["tables"][0]["file"]


@pytest.mark.parametrize("defer", [False, True], ids=["at-load", "row-checks"])
def test_a_second_load_reads_no_file_to_check_it(bundle, hashed, defer):
    first = load_bundle(bundle, defer_row_checks=defer)
    if defer:
        first.row_checks.wait()
    assert row_file(bundle).name in hashed and "dense.onnx" in hashed
    assert (bundle / STAMP_FILE).is_file()
    hashed.clear()
    again = load_bundle(bundle, defer_row_checks=defer)  # a restart, or another worker
    if defer:
        again.row_checks.wait()
        assert again.row_checks.passed and again.row_checks.checked_bytes == again.row_checks.total_bytes
    assert hashed == []


def test_verify_always_reads_every_file_again(bundle, hashed):
    load_bundle(bundle)
    hashed.clear()
    load_bundle(bundle, verify="always")
    assert row_file(bundle).name in hashed


def change_a_byte_in_place(path):
    """Flip one byte, keeping the size: the file's mtime and ctime move (to now)."""
    with path.open("r+b") as handle:
        handle.seek(-7, os.SEEK_END)
        byte = handle.read(1)[0]
        handle.seek(-7, os.SEEK_END)
        handle.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("mtime", ["bumped", "set-back"])
@pytest.mark.parametrize("defer", [False, True], ids=["at-load", "row-checks"])
def test_a_stamped_file_changed_since_is_read_again_and_refused(bundle, mtime, defer):
    load_bundle(bundle)
    table = row_file(bundle)
    before = table.stat()
    change_a_byte_in_place(table)
    if mtime == "bumped":
        os.utime(table, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    else:  # the mtime the stamp saw: utime moves ctime to now, which the stamp's key holds too
        os.utime(table, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert table.stat().st_size == before.st_size and (mtime == "bumped") == (table.stat().st_mtime_ns != before.st_mtime_ns)
    with pytest.raises(BundleError, match=f"file tables/{table.name} fails its sha256 checksum"):
        loaded = load_bundle(bundle, defer_row_checks=defer)
        loaded.row_checks.wait()


def test_a_replaced_file_with_the_same_bytes_and_times_is_read_again(bundle, hashed):
    load_bundle(bundle)
    table = row_file(bundle)
    before = table.stat()
    copy = table.with_name("copy.npy")
    copy.write_bytes(table.read_bytes())
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(copy, table)  # another inode
    hashed.clear()
    load_bundle(bundle)
    assert hashed == [table.name]


def test_a_bundle_folder_that_cannot_be_written_keeps_its_stamps_in_the_users_cache(bundle, hashed):
    # Read-only for its owner; and since root (a container's user) writes through modes, the stamp's own name is
    # taken by a folder too, which no user can replace with a file.
    (bundle / STAMP_FILE).mkdir()
    bundle.chmod(0o555)
    try:
        load_bundle(bundle)
        assert cache_file(bundle).is_file() and not (bundle / STAMP_FILE).is_file()
        hashed.clear()
        load_bundle(bundle)
        assert hashed == []
    finally:
        bundle.chmod(0o755)


def test_nowhere_to_write_stamps_still_loads_and_checks_every_time(bundle, hashed, tmp_path, monkeypatch):
    (bundle / STAMP_FILE).mkdir()
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    load_bundle(bundle)
    hashed.clear()
    load_bundle(bundle)
    assert row_file(bundle).name in hashed


def test_a_moved_bundle_keeps_its_stamps(bundle, hashed, tmp_path):
    load_bundle(bundle)
    moved = bundle.rename(tmp_path / "elsewhere")  # the same files: the key is the file's, not its path's
    hashed.clear()
    load_bundle(moved)
    assert hashed == []
