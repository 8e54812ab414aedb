"""Synthetic power-law data: small in-memory datasets (``synthetic``), and the Criteo-shaped
generator that streams Parquet shards of any size (``write_criteo_shards``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uembed.contract.columns import Dataset, FeatureColumn
from uembed.contract.errors import DataError
from uembed.contract.features import DatasetSpec, FeatureSpec, LabelSpec
from uembed.contract.hashing import MISSING

CRITEO_VOCABULARY = (676, 533, 17447, 19995, 180, 13, 9693, 337, 3, 14637, 4378, 17795, 3067, 26, 6504, 18679, 10, 3102, 1557, 3, 18230, 10, 14, 13079, 56, 10581)  # fmt: skip
AVAZU_VOCABULARY = {
    "C1": 8, "C14": 2309, "C15": 9, "C16": 10, "C17": 405, "C18": 5, "C19": 66, "C20": 167, "C21": 56,
    "app_category": 29, "app_domain": 277, "app_id": 4438, "banner_pos": 8, "device_conn_type": 5,
    "device_id": 67767, "device_ip": 163804, "device_model": 6217, "device_type": 6, "site_category": 24,
    "site_domain": 3887, "site_id": 3317, "hour": 24,
}  # fmt: skip
SYNTHETIC_PRESETS = {
    "criteo": {f"C{i + 14}": v for i, v in enumerate(CRITEO_VOCABULARY)},
    "avazu": AVAZU_VOCABULARY,
    "small": {"user": 2000, "item": 1000, "city": 50, "device": 5},
}


def synthetic(
    vocabulary: dict[str, int],
    examples: int,
    seed: int = 0,
    zipf: float = 1.1,
    noise_features: Sequence[str] = (),
) -> Dataset:
    """Power-law categorical data with a planted logistic label.

    Each feature draws values with probability proportional to ``rank ** -zipf``; each
    (feature, value) carries a random weight, and the label is Bernoulli of the sigmoid
    of the summed weights of the features not listed in ``noise_features`` (those carry
    no signal at all). Values are the strings ``"0"`` .. ``str(V - 1)``.
    """
    if examples <= 0:
        raise DataError("a synthetic dataset needs at least one example")
    unknown = set(noise_features) - set(vocabulary)
    if unknown:
        raise DataError(f"noise feature(s) {', '.join(sorted(unknown))} are not in the vocabulary")
    rng = np.random.default_rng(seed)
    columns, logit = {}, np.full(examples, 0.0)
    for name, size in vocabulary.items():
        if size < 1:
            raise DataError(f"feature {name!r}: vocabulary size must be positive, got {size}")
        probabilities = np.arange(1, size + 1, dtype=np.float64) ** -zipf
        values = rng.choice(size, size=examples, p=probabilities / probabilities.sum())
        if name not in noise_features:
            logit += rng.normal(0.0, 1.0, size=size)[values]
        uniques = [MISSING] + [str(v).encode() for v in range(size)]
        columns[name] = FeatureColumn(uniques=uniques, codes=(values + 1).astype(np.int32)[:, None])
    labels = (rng.random(examples) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    spec = DatasetSpec(features=tuple(FeatureSpec(name=n) for n in vocabulary), label=LabelSpec(column="label"))
    return Dataset(name="synthetic", spec=spec, columns=columns, labels=labels)


# --- the Criteo-shaped generator: Parquet shards of any size, streamed --------------------------

# Distinct values of C1..C26 in the Criteo Kaggle (Display Advertising Challenge) train.txt, as
# DLRM's preprocessing counts them: 33,762,577 in all, the largest 10,131,227.
CRITEO_KAGGLE_VOCABULARY = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
CRITEO_INTEGER_COLUMNS = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL_COLUMNS = tuple(f"C{i}" for i in range(1, 27))
GENERATOR_VERSION = 1
BLOCK_ROWS = 65_536  # the unit of generation: block b of seed s is the same in every run
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of uint64 values: a cheap, well-mixed 64-bit hash (wraps mod 2**64)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _unit(x: np.ndarray) -> np.ndarray:
    """Uniform floats in (0, 1) from uint64 hashes (53 bits)."""
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(2**53)


def _gaussian(x: np.ndarray) -> np.ndarray:
    """A standard normal deviate per uint64 input (Box-Muller of two derived hashes)."""
    a, b = _unit(splitmix64(x)), _unit(splitmix64(x ^ np.uint64(0xD6E8FEB86659FD93)))
    return np.sqrt(-2.0 * np.log(a)) * np.cos(2.0 * np.pi * b)


def _permute32(x: np.ndarray, key: int) -> np.ndarray:
    """A bijection of 32-bit values keyed by ``key`` (xor-multiply rounds), so ranks map to distinct ids."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        for multiplier in (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35):
            x = ((x ^ np.uint64(key & 0xFFFFFFFF)) * np.uint64(multiplier)) & np.uint64(0xFFFFFFFF)
            x ^= x >> np.uint64(15)
    return x


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_strings(ids: np.ndarray, present: np.ndarray):
    """An Arrow string array of 8 lower-case hex digits per id (as in Criteo's files); null where absent."""
    import pyarrow as pa

    n = ids.shape[0]
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    chars = _HEX[((ids[:, None] >> shifts) & np.uint64(0xF)).astype(np.intp)]
    offsets = np.arange(0, 8 * (n + 1), 8, dtype=np.int32)
    validity = np.packbits(present, bitorder="little")
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars).tobytes()), pa.py_buffer(validity),
        int(n - present.sum()),
    )  # fmt: skip


@dataclass(frozen=True)
class CriteoShape:
    """The Criteo-shaped generator's settings: vocabulary sizes of C1..C26, value skew, signal.

    Each categorical feature draws its value's rank from a bounded power law
    (``P(rank r) ~ (r + 1) ** -zipf``), writes it as 8 hex digits (a keyed bijection of the
    rank, so the vocabulary is exactly the preset's size) and is missing with its own rate.
    Each (feature, value) carries a planted weight ``strength_f * N(0, 1)`` (a hash of the
    pair, so no table of weights is held); each integer column is a lognormal count whose
    latent normal adds ``strength * z`` (or a U-shaped ``z**2 - 1`` term) to the logit.
    The label is Bernoulli of the sigmoid of the sum plus ``bias``. Nothing depends on the
    number of examples: memory is that of one block of rows.
    """

    vocabulary: tuple[int, ...] = CRITEO_KAGGLE_VOCABULARY
    # Heavier-tailed than zipf 1: Criteo's largest features show most of their values within
    # tens of millions of rows (C3: 10.1 M distinct in the Kaggle file's 45.8 M rows).
    zipf: float = 0.8
    signal: float = 0.35
    bias: float = -1.45
    seed: int = 0

    def to_dict(self) -> dict:
        return {"vocabulary": list(self.vocabulary), "zipf": self.zipf, "signal": self.signal, "bias": self.bias,
                "seed": self.seed, "generator_version": GENERATOR_VERSION}  # fmt: skip

    def feature_settings(self) -> list[dict]:
        """Per categorical feature: missing rate and signal strength (fixed by the seed)."""
        rng = np.random.default_rng([self.seed, 7])
        out = []
        for size in self.vocabulary:
            missing = float(rng.choice([0.0, 0.0, 0.02, 0.1, 0.4]))
            strength = float(self.signal * rng.choice([0.0, 0.5, 1.0, 1.0, 1.5]))
            out.append({"size": int(size), "missing": missing, "strength": strength})
        return out

    def integer_settings(self) -> list[dict]:
        rng = np.random.default_rng([self.seed, 11])
        return [
            {"mu": float(rng.uniform(0.0, 3.0)), "sigma": float(rng.uniform(0.5, 2.0)),
             "missing": float(rng.choice([0.0, 0.05, 0.2, 0.45])),
             "strength": float(self.signal * rng.choice([0.0, 0.5, 1.0])), "u_shape": bool(rng.random() < 0.3)}
            for _ in CRITEO_INTEGER_COLUMNS
        ]  # fmt: skip

    def block(self, index: int, rows: int = BLOCK_ROWS):
        """Block ``index`` (the first ``rows`` of its BLOCK_ROWS rows) as an Arrow table."""
        import pyarrow as pa

        rng = np.random.default_rng([self.seed, 1, index])
        logit = np.full(BLOCK_ROWS, self.bias)
        columns = {}
        for k, (name, s) in enumerate(zip(CRITEO_INTEGER_COLUMNS, self.integer_settings())):
            z = rng.standard_normal(BLOCK_ROWS)
            present = rng.random(BLOCK_ROWS) >= s["missing"]
            values = np.floor(np.expm1(np.clip(s["mu"] + s["sigma"] * z, 0.0, 20.0))).astype(np.int64)
            logit += np.where(present, s["strength"] * ((z * z - 1.0) if s["u_shape"] else z), 0.0)
            columns[name] = pa.array(values[:rows], mask=~present[:rows])
        for f, (name, s) in enumerate(zip(CRITEO_CATEGORICAL_COLUMNS, self.feature_settings())):
            u = rng.random(BLOCK_ROWS)
            size, a = s["size"], 1.0 - self.zipf
            rank = np.floor((((size + 1.0) ** a - 1.0) * u + 1.0) ** (1.0 / a)) - 1.0 if a else np.floor((size + 1.0) ** u) - 1.0
            rank = np.clip(rank, 0, size - 1).astype(np.uint64)
            present = rng.random(BLOCK_ROWS) >= s["missing"]
            if s["strength"]:
                key = (rank << np.uint64(8)) ^ np.uint64(f * 0x9E3779B97F4A7C1 + self.seed * 0x2545F4914F6CDD1D & 0xFFFFFFFFFFFFFFFF)
                logit += np.where(present, s["strength"] * _gaussian(key), 0.0)
            ids = _permute32(rank, self.seed * 1_000_003 + f)
            columns[name] = _hex_strings(ids[:rows], present[:rows])
        label = (rng.random(BLOCK_ROWS) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
        return pa.table({"label": label[:rows], **columns})


CRITEO_PRESETS = {
    "criteo-kaggle": CRITEO_KAGGLE_VOCABULARY,
    # The same shape with every vocabulary a thousand times smaller (at least 3 values): for tests.
    "criteo-tiny": tuple(max(3, v // 1000) for v in CRITEO_KAGGLE_VOCABULARY),
}


def criteo_spec_text(quantiles: int = 16) -> str:
    """The spec (TOML) of Criteo-shaped data: the label, I1..I13 bucketised by quantiles, C1..C26."""
    lines = ['# Criteo click logs: label, 13 integer columns, 26 hashed categorical columns.', "", "[label]",
             'column = "label"', ""]  # fmt: skip
    for name in CRITEO_INTEGER_COLUMNS:
        lines += ["[[features]]", f'name = "{name}"', 'kind = "numeric"', f'boundaries = "quantiles:{quantiles}"', ""]
    for name in CRITEO_CATEGORICAL_COLUMNS:
        lines += ["[[features]]", f'name = "{name}"', ""]
    return "\n".join(lines)


def write_criteo_shards(
    out: Path,
    examples: int,
    shape: CriteoShape,
    shard_rows: int = 2_000_000,
    row_group_rows: int = 4 * BLOCK_ROWS,
    text_format: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``examples`` Criteo-shaped rows as Parquet shards (``part-00000.parquet``...), or as
    one Criteo-format text file (``train.txt``, tab-separated, no header, missing fields empty) with
    ``text_format``, plus ``spec.toml`` and ``dataset.json``. Memory: one row group.

    The rows depend only on the shape (its seed included), never on ``examples`` or the shard
    size: a smaller dataset is a prefix of a larger one.
    """
    import json
    import sys

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if examples <= 0:
        raise DataError("the generator needs at least one example")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("part-*.parquet")) or (out / "train.txt").exists():
        raise DataError(f"{out} already holds generated data; choose an empty folder")
    row_group_rows = max(BLOCK_ROWS, row_group_rows // BLOCK_ROWS * BLOCK_ROWS)
    shard_rows = max(row_group_rows, shard_rows // row_group_rows * row_group_rows)
    bar = tqdm(total=examples, unit="ex", unit_scale=True, desc="generating", disable=not progress, file=sys.stderr)
    written, positives, shards, writer, text = 0, 0, [], None, None
    try:
        block = 0
        while written < examples:
            parts = []
            while sum(p.num_rows for p in parts) < row_group_rows and written + sum(p.num_rows for p in parts) < examples:
                left = examples - written - sum(p.num_rows for p in parts)
                parts.append(shape.block(block, min(BLOCK_ROWS, left)))
                block += 1
            import pyarrow as pa

            table = pa.concat_tables(parts)
            if text_format:
                if text is None:
                    text = (out / "train.txt").open("wb")
                options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
                pacsv.write_csv(table, text, options)
            else:
                if writer is None or written % shard_rows == 0:
                    if writer is not None:
                        writer.close()
                    shards.append(out / f"part-{len(shards):05d}.parquet")
                    writer = pq.ParquetWriter(shards[-1], table.schema, compression="zstd")
                writer.write_table(table, row_group_size=row_group_rows)
            positives += int(pa.compute.sum(table["label"]).as_py())
            written += table.num_rows
            bar.update(table.num_rows)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if text is not None:
            text.close()
    (out / "spec.toml").write_text(criteo_spec_text())
    info = {"format": "criteo-text" if text_format else "parquet", "examples": written, "positive_rate": positives / written,
            "shape": shape.to_dict(), "distinct_values_in_vocabulary": int(sum(shape.vocabulary))}  # fmt: skip
    (out / "dataset.json").write_text(json.dumps(info, indent=2))
    return info
