"""Which values a feature had in training, so the service can count the ones it had not (drift).

Stored in a bundle as ``known/<feature>.npy`` (uint8 bits) with ``{"bits", "hashes"}`` in the
feature's manifest entry; the service counts unseen values in ``uembed_unseen_values_total``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from uembed.contract.hashing import compiled_extension, hash_canonical, lookup_seed


class KnownValues:
    """Which values a feature had in training: a Bloom filter over their keys (false "known" at about 1%).

    Keys are ``xxh3_64(canonical bytes, seed=lookup_seed(feature, 0))``. Four bit positions per key
    from the key's two 32-bit halves (``(low + i * high) % bits``); 10 bits per training value.
    """

    HASHES = 4  # bit positions per key
    BITS_PER_VALUE = 10

    def __init__(self, bits: np.ndarray, size: int) -> None:
        self.bits = bits  # uint8, little-endian bit order within a byte
        self.size = size  # bits

    @classmethod
    def build(cls, keys: np.ndarray) -> KnownValues:
        size = max(64, int(keys.size) * cls.BITS_PER_VALUE)
        bits = np.zeros((size + 7) // 8, dtype=np.uint8)
        for position in cls._positions(keys, size):
            np.bitwise_or.at(bits, position >> 3, (1 << (position & 7)).astype(np.uint8))
        return cls(bits, size)

    @classmethod
    def _positions(cls, keys: np.ndarray, size: int):
        low = keys & np.uint64(0xFFFFFFFF)
        high = keys >> np.uint64(32)
        for i in range(cls.HASHES):
            yield ((low + np.uint64(i) * high) % np.uint64(size)).astype(np.int64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        known = np.ones(keys.shape, dtype=bool)
        for position in self._positions(keys, self.size):
            known &= ((self.bits[position >> 3] >> (position & 7)) & 1).astype(bool)
        return known

    @staticmethod
    def keys(feature: str, values: Sequence[bytes]) -> np.ndarray:
        return hash_canonical(values, lookup_seed(feature, 0), count=len(values))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"bits": self.bits, "size": np.array([self.size], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, bits: np.ndarray, size: int) -> KnownValues:
        if bits.dtype != np.uint8 or bits.size * 8 < size or size <= 0:
            raise ValueError(f"a known-values filter of {size} bits needs {(size + 7) // 8} bytes, got {bits.size}")
        return cls(bits, int(size))


class KnownSets:
    """Several features' filters asked at once: ``contains`` of keys [F, n], row f against filter f, in a few numpy
    passes over all of them (the service's one-value features: one pass each cost more than hashing their values).
    The filters' bits side by side, each from a whole byte; the same bits and positions as each
    :meth:`KnownValues.contains`."""

    PROBES = np.arange(KnownValues.HASHES, dtype=np.uint64)[:, None, None]

    def __init__(self, filters: Sequence[KnownValues]) -> None:
        starts = np.cumsum([0] + [f.bits.size for f in filters])
        self.bits = np.concatenate([f.bits for f in filters]) if filters else np.zeros(0, dtype=np.uint8)
        self.offsets = (starts[:-1].astype(np.uint64) * np.uint64(8))[:, None]  # bits before each filter's
        self.sizes = np.array([[f.size] for f in filters], dtype=np.uint64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        extension = compiled_extension()
        if extension is not None:  # one C loop over the keys' probes
            return extension.filters_contain(self.bits, self.offsets.ravel(), self.sizes.ravel(),
                                             np.ascontiguousarray(keys, dtype=np.uint64), KnownValues.HASHES)  # fmt: skip
        low = keys & np.uint64(0xFFFFFFFF)
        high = keys >> np.uint64(32)
        position = (low + self.PROBES * high) % self.sizes + self.offsets  # [probes, F, n]
        return ((self.bits[position >> np.uint64(3)] >> (position & np.uint64(7)).astype(np.uint8)) & 1).all(axis=0)


    def unseen(self, keys: np.ndarray, which: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """How many keys of each asked row no filter holds, int64 [K]: row ``which[k]`` of ``keys`` [F, n] against
        filter k, the missing value's key (``missing[k]``) never counted."""
        which = np.asarray(which, dtype=np.intp)
        missing = np.ascontiguousarray(missing, dtype=np.uint64).ravel()
        extension = compiled_extension()
        if extension is not None:  # counted in the probes' pass (which checks what follows there)
            return extension.filters_unseen(self.bits, self.offsets.ravel(), self.sizes.ravel(),
                                            np.ascontiguousarray(keys, dtype=np.uint64), which, missing, KnownValues.HASHES)  # fmt: skip
        if len(which) != len(self.sizes) or len(missing) != len(self.sizes):
            raise ValueError(f"{len(which)} rows asked for {len(self.sizes)} filters and {len(missing)} missing keys")
        if ((which < 0) | (which >= len(keys))).any():
            raise IndexError(f"row {which[(which < 0) | (which >= len(keys))][0]} of {len(keys)} rows of keys")
        asked = keys[which]
        return (~self.contains(asked) & (asked != missing[:, None])).sum(axis=1)


def save_known_values(path: Path, keys: Mapping[str, np.ndarray]) -> None:
    """``known_values.npz`` of a training run from each feature's training keys (feature -> uint64 keys under
    ``lookup_seed(feature, 0)``: a streamed run's statistics hold exactly these), built one feature at a time."""
    arrays = {}
    for name in keys:
        for part, array in KnownValues.build(np.asarray(keys[name], dtype=np.uint64)).to_arrays().items():
            arrays[f"{name}.{part}"] = array
    np.savez(path, **arrays)


def training_keys(columns) -> dict[str, np.ndarray]:
    """Per feature, the keys of its present training values (``columns``: feature -> FeatureColumn)."""
    return {name: KnownValues.keys(name, column.present_values()) for name, column in columns.items()}


def load_known_values(path: Path) -> dict[str, KnownValues]:
    """A training run's ``known_values.npz`` (none for runs made before it existed)."""
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as stored:
        names = {key.rsplit(".", 1)[0] for key in stored.files}
        return {name: KnownValues.from_arrays(stored[f"{name}.bits"], int(stored[f"{name}.size"][0])) for name in names}
