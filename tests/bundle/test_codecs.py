"""The row codecs (uembed/bundle/codecs.py): bit order against hand-packed bytes, the quantiser's error bound,
records that round-trip, row files written in the codec and the manifest's test rows."""

import json
import os

import numpy as np
import pytest

from uembed.bundle.codecs import (
    ROWWISE_BITS,
    decode_records,
    dequantise_rows,
    encode_records,
    pack_codes,
    pq_decode,
    pq_encode,
    quantisation_range,
    quantise_rows,
    row_width,
    squared_errors,
    tree_sum,
    unpack_codes,
)
from uembed.bundle.format import write_table_rows
from uembed.bundle.loader import TableRows, _check_test_rows, load_bundle
from uembed.bundle.synthetic import write_synthetic_bundle
from uembed.contract.errors import BundleError
from uembed.contract.features import FeatureSpec


def test_int4_packs_two_values_a_byte_low_nibble_first():
    codes = np.array([[1, 2, 15, 0, 7]], dtype=np.uint8)  # 5 values: the last byte's high nibble is padding
    packed = pack_codes(codes, 4)
    assert packed.tolist() == [[0x21, 0x0F, 0x07]]
    assert unpack_codes(packed, 4, 5).tolist() == [[1.0, 2.0, 15.0, 0.0, 7.0]]


def test_int2_packs_four_values_a_byte_low_bits_first():
    codes = np.array([[3, 0, 1, 2, 1, 3]], dtype=np.uint8)  # 6 values: two padding codes in the second byte
    packed = pack_codes(codes, 2)
    assert packed.tolist() == [[0b10_01_00_11, 0b00_00_11_01]]
    assert unpack_codes(packed, 2, 6).tolist() == [[3.0, 0.0, 1.0, 2.0, 1.0, 3.0]]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_and_unpack_are_inverse_for_every_code(bits):
    rng = np.random.default_rng(bits)
    for dim in (1, 3, 16, 17):
        codes = rng.integers(0, 1 << bits, size=(50, dim)).astype(np.uint8)
        packed = pack_codes(codes, bits)
        assert packed.shape == (50, -(-dim * bits // 8)) == (50, row_width({8: "int8", 4: "int4", 2: "int2"}[bits], dim))
        assert np.array_equal(unpack_codes(packed, bits, dim), codes.astype(np.float32))


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_and_int4_rows_span_their_min_and_max_within_half_a_step(bits):
    rows = np.random.default_rng(1).normal(size=(500, 13)).astype(np.float32) * np.float32(3)
    codes, scale_bias = quantise_rows(rows, bits)
    levels = (1 << bits) - 1
    assert (codes.max(axis=1) == levels).all() and (codes.min(axis=1) == 0).all()
    assert np.allclose(scale_bias[:, 0], (rows.max(axis=1) - rows.min(axis=1)) / levels, rtol=1e-6)
    assert np.array_equal(scale_bias[:, 1], rows.min(axis=1))
    error = np.abs(dequantise_rows(codes, scale_bias) - rows)
    assert (error <= scale_bias[:, :1] / 2 * (1 + 1e-5) + 1e-6).all()


def test_int2_rows_take_the_range_of_least_squared_error_within_min_and_max():
    bits = 2
    rng = np.random.default_rng(bits)
    rows = np.concatenate([rng.normal(size=(5000, 16)), rng.laplace(size=(5000, 16))]).astype(np.float32)
    rows[0, 3] = 40.0  # an outlier
    rows[1] = 0.0
    codes, scale_bias = quantise_rows(rows, bits)
    levels = (1 << bits) - 1
    low, high = quantisation_range(rows, bits)
    assert np.array_equal(scale_bias, np.concatenate([(high - low) / np.float32(levels), low], axis=1))
    assert (rows.min(axis=1, keepdims=True) <= low).all() and (high <= rows.max(axis=1, keepdims=True)).all()
    assert codes.max() <= levels
    error = ((dequantise_rows(codes, scale_bias) - rows) ** 2).sum(axis=1)
    min_max = rows.min(axis=1, keepdims=True), rows.max(axis=1, keepdims=True)
    min_max_error = tree_sum(squared_errors(rows, *min_max, bits))
    assert (error <= min_max_error * (1 + 1e-5)).all()  # the search starts from min and max and keeps the best
    assert error.sum() < 0.9 * min_max_error.sum()
    assert error[0] < min_max_error[0] and scale_bias[1].tolist() == [0.0, 0.0] and not codes[1].any()
    # searched in blocks of rows: a row's range is its own, wherever the block starts
    assert np.array_equal(np.concatenate(quantisation_range(rows[4001:4200], bits), axis=1), np.concatenate([low, high], axis=1)[4001:4200])


@pytest.mark.parametrize("dim", [1, 3, 16, 32, 33])
def test_the_compiled_int2_range_search_gives_numpys_ranges_bit_for_bit(dim):
    """_ranges.search_ranges (the export's path where it is built) against the numpy passes it replaces: rows of
    every scale, constant rows, zeros of both signs, values on the search's own steps; a row that is not finite
    takes the numpy passes."""
    from uembed.bundle import codecs

    if codecs._ranges is None:
        if os.environ.get("UEMBED_REQUIRE_EXTENSION") == "1":
            pytest.fail("the int2 range search extension uembed.bundle._ranges is not built or is switched off")
        pytest.skip("the int2 range search extension uembed.bundle._ranges is not built (UEMBED_REQUIRE_EXTENSION=1 "
                    "makes this a failure)")  # fmt: skip
    rng = np.random.default_rng(dim)
    scales = rng.choice([1e-6, 1e-3, 1.0, 1e3, 1e6], size=(3000, 1))
    rows = np.concatenate([rng.normal(size=(1500, dim)), rng.laplace(size=(1500, dim))]) * scales
    rows = rows.astype(np.float32)
    rows[:10] = 0.0
    rows[10:20] = -0.0
    rows[20:30] = 1.5
    rows[30:40] = np.linspace(0, 1, dim, dtype=np.float32) if dim > 1 else 0.25  # on the grid of the 64 steps
    rows[40:50, 0] = -0.0
    rows[50:60] = np.where(rng.random((10, dim)) < 0.5, np.float32(0.0), np.float32(-0.0))  # zeros of both signs
    rows[60:70] = np.where(rng.random((10, dim)) < 0.5, np.float32(1.0), np.float32(-0.0))  # a min of -0 or +0
    want = codecs._search_range(rows, 2)
    # every build of the search this machine runs (baseline x86-64, AVX2, AVX-512), and the one picked by default
    builds = codecs._ranges.instruction_sets()
    assert builds[0] == "baseline"
    for build in [*builds, "auto"]:
        got = codecs._ranges.search_ranges(rows, 2, *codecs.RANGE_SEARCH[2], build)
        for ours, numpys in zip(got, want):
            assert ours.dtype == np.float32 and ours.shape == (len(rows), 1)
            assert np.array_equal(ours.view(np.uint32), numpys.view(np.uint32)), build
    assert all(np.array_equal(a, b) for a, b in zip(quantisation_range(rows, 2), want))
    odd = rows[:8].copy()
    odd[0, 0], odd[1, 0] = np.nan, np.inf
    with np.errstate(invalid="ignore"):  # the numpy passes, as before: the finite rows' ranges alike
        low, high = quantisation_range(odd, 2)
    assert np.array_equal(low[2:], want[0][:8][2:]) and np.array_equal(high[2:], want[1][:8][2:])
    wide = rows.astype(np.float64)  # rows of another dtype keep numpy's passes in that dtype, as before
    assert all(a.dtype == np.float64 for a in quantisation_range(wide, 2))


def test_the_int2_range_search_names_a_build_it_cannot_run():
    from uembed.bundle import codecs

    if codecs._ranges is None:
        pytest.skip("the int2 range search extension uembed.bundle._ranges is not built")
    rows = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="instruction_set must be one of auto, baseline, avx2, avx512f, got 'sse9'"):
        codecs._ranges.search_ranges(rows, 2, 64, 32, "sse9")
    lacking = [name for name in ("avx2", "avx512f") if name not in codecs._ranges.instruction_sets()]
    for name in lacking:  # a machine without AVX-512 (or AVX2) says so rather than crash on an illegal instruction
        with pytest.raises(ValueError, match=f"does not run the {name} build"):
            codecs._ranges.search_ranges(rows, 2, 64, 32, name)
    empty = codecs._ranges.search_ranges(np.ones((0, 4), dtype=np.float32), 2, 64, 32)
    assert [a.shape for a in empty] == [(0, 1), (0, 1)]


def test_the_int2_range_search_has_a_worked_example():
    """[0, 1.5, 0.3]: min and max decode 0.3 to 0.5 (squared error 0.04); the high end 3 of 64 steps down, at
    1.4296875, decodes 0.3 to 0.4765625 (0.0361 in all), and a 4th step costs more at 1.5 than it saves at 0.3."""
    codes, scale_bias = quantise_rows(np.array([[0.0, 1.5, 0.3]], dtype=np.float32), 2)
    assert codes.tolist() == [[0, 3, 1]] and scale_bias.tolist() == [[0.4765625, 0.0]]
    record = encode_records(np.array([[0.0, 1.5, 0.3]], dtype=np.float32), "int2")  # docs/EXPORT.md's example
    assert record.tobytes().hex(" ") == "1c 00 00 f4 3e 00 00 00 00"
    assert quantise_rows(np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32), 2)[1].tolist() == [[1.0, 0.0]]  # exact: kept


def test_tree_sum_adds_halves_and_ignores_trailing_zeros():
    values = np.array([[1e8, 1.0, -1e8, 1.0, 0.5]], dtype=np.float32)
    # Padded to 8, value j is added to value j + 4 first: 1e8 + 0.5 rounds to 1e8, so the sum is 2 (left to right: 2.5).
    assert tree_sum(values).tolist() == [2.0]
    assert tree_sum(np.zeros((3, 0), dtype=np.float32)).tolist() == [0.0] * 3
    assert np.array_equal(tree_sum(np.pad(values, ((0, 0), (0, 11)))), tree_sum(values))


def test_a_constant_row_quantises_to_its_value():
    codes, scale_bias = quantise_rows(np.full((2, 5), -0.75, dtype=np.float32), 2)
    assert not codes.any() and scale_bias.tolist() == [[0.0, -0.75]] * 2
    assert (dequantise_rows(codes, scale_bias) == -0.75).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", *ROWWISE_BITS])
def test_records_decode_to_the_rows_the_codec_keeps(dtype):
    rows = np.random.default_rng(2).normal(size=(40, 10)).astype(np.float32)
    records = encode_records(rows, dtype)
    bits = ROWWISE_BITS.get(dtype)
    width = row_width(dtype, 10) * (np.dtype(dtype).itemsize if bits is None else 1)
    assert records.dtype == np.uint8 and records.shape == (40, width + (8 if bits else 0))
    decoded = decode_records(records, dtype, 10)
    if bits is None:
        assert np.array_equal(decoded, rows.astype(dtype).astype(np.float32))
        return
    codes, scale_bias = quantise_rows(rows, bits)
    assert np.array_equal(records[:, width:].copy().view(np.float32), scale_bias)  # scale, then bias, after the codes
    assert np.array_equal(decoded, dequantise_rows(codes, scale_bias))
    assert decoded.dtype == np.float32


def test_an_int8_record_is_what_it_was_before_int4_and_int2():
    """int8 bundles keep their bytes: codes as they are, then the float32 scale and offset."""
    rows = np.array([[0.0, 1.0, 0.25]], dtype=np.float32)
    record = encode_records(rows, "int8")
    assert record[0, :3].tolist() == [0, 255, 64] and record[0, 3:].view(np.float32).tolist() == [np.float32(1 / 255), 0.0]


@pytest.mark.parametrize("dtype", ["int4", "int2"])
def test_row_files_stream_in_the_codec_and_record_test_rows(tmp_path, dtype):
    (tmp_path / "tables").mkdir()
    rows = np.random.default_rng(3).normal(size=(1000, 12)).astype(np.float32)
    asked = []

    def chunks(start, stop):
        asked.append((start, stop))
        return rows[start:stop]

    entry = write_table_rows(tmp_path, "t", 1000, 12, dtype, chunks)
    assert asked == [(0, 1000)] and entry["dtype"] == dtype
    data = np.load(tmp_path / "tables" / "t.npy")
    scale_bias = np.load(tmp_path / "tables" / "t.scale_bias.npy")
    assert data.dtype == np.uint8 and data.shape == (1000, 12 * ROWWISE_BITS[dtype] // 8) and scale_bias.shape == (1000, 2)
    assert np.array_equal(np.concatenate([data, scale_bias.view(np.uint8)], axis=1), encode_records(rows, dtype))
    table = TableRows("t", 1000, 12, dtype, data, scale_bias)
    assert [t["row"] for t in entry["test_rows"]] == [0, 1, 500, 999]
    test_rows = json.loads(json.dumps(entry["test_rows"]))  # as a manifest holds them
    for test in test_rows:
        assert np.array_equal(np.asarray(test["values"], dtype=np.float32), table.gather(np.array([test["row"]]))[0])
    _check_test_rows(tmp_path, table, test_rows)
    test_rows[2]["values"][0] += 1e-3
    with pytest.raises(BundleError, match="row 500 decodes"):
        _check_test_rows(tmp_path, table, test_rows)


def test_a_bundle_whose_rows_decode_to_other_floats_than_its_test_rows_is_refused(tmp_path):
    path = write_synthetic_bundle(tmp_path, "m", (FeatureSpec("user"), FeatureSpec("item")), 300, dtype="int2", progress=False)
    bundle = load_bundle(path)
    assert bundle.manifest["tables"][0]["test_rows"][-1]["row"] == 299
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tables"][0]["test_rows"][1]["values"][3] *= 1.0001
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="row 1 decodes"):
        load_bundle(path)
    deferred = load_bundle(path, defer_row_checks=True)  # the decode is checked after the sha256 of the row files
    with pytest.raises(BundleError, match="row 1 decodes"):
        deferred.row_checks.wait(30)


def hand_codebooks() -> np.ndarray:
    """M=2 codebooks of 2-value sub-vectors: centroid c of sub-vector m is (c + 1000 m, -c)."""
    centroids = np.arange(256, dtype=np.float32)
    return np.stack([np.stack([centroids + 1000 * m, -centroids], axis=1) for m in range(2)])


def test_pq_codes_are_each_sub_vectors_nearest_centroid_and_decode_to_it():
    codebooks = hand_codebooks()
    rows = np.array([[7.2, -7.0, 1003.0, -2.9], [0.5, -0.5, 1255.0, -300.0]], dtype=np.float32)
    codes = pq_encode(rows, codebooks)
    assert codes.dtype == np.uint8 and codes.tolist() == [[7, 3], [0, 255]]  # (0.5, -0.5): a tie, the lower index
    assert pq_decode(codes, codebooks).tolist() == [[7, -7, 1003, -3], [0, 0, 1255, -255]]
    records = encode_records(rows, "pq", codebooks)
    assert records.tolist() == codes.tolist()
    assert np.array_equal(decode_records(records, "pq", 4, codebooks), pq_decode(codes, codebooks))


def test_pq_row_files_hold_codes_and_codebooks_and_their_test_rows(tmp_path):
    (tmp_path / "tables").mkdir()
    rows = np.random.default_rng(4).normal(size=(600, 12)).astype(np.float32)
    with pytest.raises(ValueError, match="divides the table's dim 12; got 5"):
        write_table_rows(tmp_path, "t", 600, 12, "pq", lambda a, b: rows[a:b], subvectors=5)
    entry = write_table_rows(tmp_path, "t", 600, 12, "pq", lambda a, b: rows[a:b], subvectors=4)
    codes = np.load(tmp_path / "tables" / "t.npy")
    codebooks = np.load(tmp_path / "tables" / "t.codebooks.npy")
    assert codes.dtype == np.uint8 and codes.shape == (600, 4) and codebooks.shape == (4, 256, 3)
    assert entry["subvectors"] == 4 and entry["codebooks"]["file"] == "tables/t.codebooks.npy"
    assert np.array_equal(codes, pq_encode(rows, codebooks))
    table = TableRows("t", 600, 12, "pq", codes, codebooks=codebooks)
    assert table.record_bytes == 4 and table.nbytes == 600 * 4 + codebooks.nbytes
    _check_test_rows(tmp_path, table, json.loads(json.dumps(entry["test_rows"])))
    error = np.abs(table.gather(np.arange(600)) - rows).mean()
    assert error < 0.5 * np.abs(rows).mean()  # 256 centroids of 3 values learn something of 600 rows
