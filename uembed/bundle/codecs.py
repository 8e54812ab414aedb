"""Row codecs: how a table stores its float32 rows, byte for byte, and how every tier decodes them (numpy only).

A table's ``dtype`` names its codec. Its row file ``tables/<name>.npy`` holds ``[rows, width]`` values; every
serving tier (the row files, the update overlay, Redis, row updates) holds one row as the same *record*: the
row's values, then for the rowwise codecs its float32 scale and bias. docs/EXPORT.md says it byte by byte.

========== ================ ============================================ =====================================
codec      row file          record (bytes of one row)                    decoded value ``j``
========== ================ ============================================ =====================================
float32    float32 [r, d]    ``4d``: the values, little-endian              the value
float16    float16 [r, d]    ``2d``                                         float32 of the value
int8       uint8 [r, d]      ``d`` codes, then float32 scale, bias          ``float32(code_j) * scale + bias``
int4       uint8 [r, ⌈d/2⌉]  packed codes (2 a byte), then scale, bias      ``float32(code_j) * scale + bias``
int2       uint8 [r, ⌈d/4⌉]  packed codes (4 a byte), then scale, bias      ``float32(code_j) * scale + bias``
pq         uint8 [r, M]      ``M`` codes, one per sub-vector                ``codebooks[j // s, code_{j//s}, j % s]``
========== ================ ============================================ =====================================

Packing (int4, int2): value ``j`` of a row is in byte ``j // (8 // bits)`` at bit ``(j % (8 // bits)) * bits``,
low bits first (int4: value 0 in the low nibble); a row whose dim is not a multiple of ``8 // bits`` ends with
zero codes. The scale and bias (``tables/<name>.scale_bias.npy``, float32 ``[rows, 2]``) come from
:func:`quantise_rows`, the one quantiser the export and quantization-aware training share: int8 spans each row's
min and max as int8 and int4 do, int2 the range of least squared error (:func:`quantisation_range`). A decoded value is
the float32 product ``code * scale`` rounded, plus ``bias`` rounded (no fused multiply-add).

PQ (``s = dim / M`` values a sub-vector): ``tables/<name>.codebooks.npy`` float32 ``[M, 256, s]``, trained by
:func:`train_codebooks` (faiss, the ``train`` extra); a sub-vector's code is its nearest centroid
(:func:`pq_encode`, numpy: the export and row updates encode alike).

>>> codes, scale_bias = quantise_rows(np.array([[0.0, 1.5, 0.3]], dtype=np.float32), bits=2)
>>> codes.tolist(), scale_bias.tolist(), pack_codes(codes, 2).tolist()  # 0 | 3 << 2 | 1 << 4
([[0, 3, 1]], [[0.4765625, 0.0]], [[28]])
"""

from __future__ import annotations

import os

import numpy as np

try:  # the int2 range search a row at a time in C (_ranges.pyx), built by the install; numpy's passes without it
    from uembed.bundle import _ranges
except ImportError:
    _ranges = None
if os.environ.get("UEMBED_PURE_PYTHON", "") not in ("", "0"):
    _ranges = None

ROW_DTYPES = ("float32", "float16", "int8", "int4", "int2", "pq")
NUMPY_ROW_DTYPE = {"float32": "float32", "float16": "float16", "int8": "uint8", "int4": "uint8", "int2": "uint8", "pq": "uint8"}
ROWWISE_BITS = {"int8": 8, "int4": 4, "int2": 2}  # codecs with a per-row scale and bias, by bits a value
SCALE_BIAS_BYTES = 8  # float32 scale, then float32 bias, after a rowwise record's codes
PQ_CENTROIDS = 256
# Bits a value -> (bins, shrink_steps) of :func:`quantisation_range`'s search: int2 may shrink its range by up to
# half. int8 and int4 keep min and max: the search changed no AUC measurably there and costs an export's time.
RANGE_SEARCH = {2: (64, 32)}
RANGE_SEARCH_ROWS = 4096  # rows searched at a time: their candidates' errors stay in cache
PQ_ENCODE_ROWS = 4096  # rows encoded at a time: their distances to one codebook are [rows, 256] float64


def _unpack_table(bits: int) -> np.ndarray:
    """float32 ``[256, 8 // bits]``: the codes a byte holds, in row order (low bits first)."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    table = (np.arange(256, dtype=np.uint8)[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    table = table.astype(np.float32)
    table.setflags(write=False)
    return table


# A take from these turns packed bytes into float32 codes in one vectorised step (no shifts per value).
UNPACK = {bits: _unpack_table(bits) for bits in (4, 2)}


def row_width(dtype: str, dim: int, subvectors: int | None = None) -> int:
    """Columns of the row file (values of its numpy dtype) a row takes."""
    if dtype in ROWWISE_BITS:
        return -(-dim * ROWWISE_BITS[dtype] // 8)
    if dtype == "pq":
        return int(subvectors)
    return dim


def tree_sum(values: np.ndarray) -> np.ndarray:
    """float32 sums over the last axis in one fixed order: the halves of the axis (zero-padded to a power of two)
    added elementwise until one value is left. Elementwise float32 adds round alike in numpy and torch, so
    :mod:`uembed.model.qat` gets the same sums bit for bit (a library's sum picks its own order); trailing zeros
    change no sum, so a row with its pruned columns zeroed at the end sums as the narrowed row."""
    width = values.shape[-1]
    padded = 1 << max(width - 1, 0).bit_length()
    if padded != width:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (padded - width,), dtype=values.dtype)], axis=-1)
    while values.shape[-1] > 1:
        half = values.shape[-1] // 2
        values = values[..., :half] + values[..., half:]
    return values[..., 0]


def squared_errors(rows: np.ndarray, low: np.ndarray, high: np.ndarray, bits: int) -> np.ndarray:
    """float32 ``(decoded - x)**2`` of each value of ``rows [..., dim]`` quantised over the range ``[low, high]``
    (``[..., 1]`` each): the quantiser of :func:`quantise_rows` and the decoder, in the same float32 operations."""
    levels = np.float32((1 << bits) - 1)
    scale = (high - low) / levels
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint((rows - low) / safe), np.float32(0), levels)
    errors = codes * scale + low - rows
    return errors * errors


def quantisation_range(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[k, 1]`` each: the range ``[low, high]`` a row's codes span. int8, int4: the row's min and max. int2
    (:data:`RANGE_SEARCH`): the range whose quantised row is nearest the row in squared error, found as FBGEMM's
    n-bit rowwise quantiser finds it: cut ``[min, max]`` into ``bins`` steps, then ``shrink_steps`` times move by
    one step whichever end leaves the smaller error (the high end on a tie), and keep the best range seen, min and
    max included. With few levels, clipping a row's outer values often costs less than the coarser step that
    covers them. The errors are float32 and summed by :func:`tree_sum`, so torch's mirror makes the same choices."""
    if bits not in RANGE_SEARCH:
        return row_ends(rows)
    # the compiled search for float32 rows whose every range is finite (a NaN or an infinity anywhere sends the call
    # to numpy's passes, whose comparisons it does not follow there)
    if _ranges is not None and rows.dtype == np.float32 and rows.size and np.isfinite(rows.max(axis=1) - rows.min(axis=1)).all():
        return _ranges.search_ranges(np.ascontiguousarray(rows), bits, *RANGE_SEARCH[bits])
    if len(rows) <= RANGE_SEARCH_ROWS:
        return _search_range(rows, bits)
    ranges = [_search_range(rows[start : start + RANGE_SEARCH_ROWS], bits) for start in range(0, len(rows), RANGE_SEARCH_ROWS)]
    return np.concatenate([low for low, _ in ranges]), np.concatenate([high for _, high in ranges])


def row_ends(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's min and max ``[k, 1]``, a zero among them +0: which of two equal zeros a reduction returns depends
    on numpy's vector path (and torch's on its own), and the sign reaches an exported scale or bias."""
    low, high = rows.min(axis=1, keepdims=True), rows.max(axis=1, keepdims=True)
    low += 0  # -0 + 0 is +0; any other value is unchanged
    high += 0
    return low, high


def _search_range(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    low, high = row_ends(rows)
    bins, shrink_steps = RANGE_SEARCH[bits]
    step = (high - low) / np.float32(bins)
    best_error = tree_sum(squared_errors(rows, low, high, bits))[:, None]
    raised, lowered = np.zeros_like(low), np.zeros_like(low)  # steps the low end moved up, the high end down
    best_raised, best_lowered = raised, lowered
    moves = np.array([1, 0], dtype=np.float32)[:, None, None]  # candidate 0 raises the low end, 1 lowers the high
    for _ in range(shrink_steps):
        candidate_raised, candidate_lowered = raised + moves, lowered + (1 - moves)
        errors = tree_sum(squared_errors(rows, low + candidate_raised * step, high - candidate_lowered * step, bits))
        errors = errors[..., None]
        raise_low = errors[0] < errors[1]
        raised = np.where(raise_low, candidate_raised[0], raised)
        lowered = np.where(raise_low, lowered, candidate_lowered[1])
        error = np.where(raise_low, errors[0], errors[1])
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_raised, best_lowered = np.where(better, raised, best_raised), np.where(better, lowered, best_lowered)
    return low + best_raised * step, high - best_lowered * step


def quantise_rows(rows: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Rowwise quantisation: uint8 codes ``[k, dim]`` in ``[0, 2**bits - 1]`` and float32 ``[k, 2]`` (scale, bias)
    with ``scale = (high - low) / (2**bits - 1)``, ``bias = low`` and ``code = clip(rint((x - bias) / scale))``
    (to nearest, ties to even; a constant row has scale 0 and codes 0), for the range ``[low, high]`` of
    :func:`quantisation_range`: int8 the row's min and max, so ``x ~ code * scale + bias`` within half a step;
    int2 the range of least squared error, so values outside it decode to its ends."""
    rows = np.asarray(rows, dtype=np.float32)
    levels = np.float32((1 << bits) - 1)
    low, high = quantisation_range(rows, bits)
    scale = (high - low) / levels
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint((rows - low) / safe), np.float32(0), levels).astype(np.uint8)
    return codes, np.concatenate([scale, low], axis=1)


def dequantise_rows(codes: np.ndarray, scale_bias: np.ndarray) -> np.ndarray:
    """float32 rows of rowwise codes ``[k, dim]`` (unpacked): ``code * scale + bias``."""
    return codes.astype(np.float32) * scale_bias[:, :1] + scale_bias[:, 1:]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``[k, ⌈dim * bits / 8⌉]``: ``8 // bits`` codes a byte, value ``j`` at bit ``(j % per_byte) * bits``."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per_byte = 8 // bits
    k, dim = codes.shape
    padded = np.zeros((k, -(-dim // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :dim] = codes
    groups = padded.reshape(k, -1, per_byte)
    packed = np.zeros(groups.shape[:2], dtype=np.uint8)
    for position in range(per_byte):
        packed |= groups[:, :, position] << np.uint8(position * bits)
    return packed


def unpack_codes(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """float32 codes ``[k, dim]`` of packed rows (the inverse of :func:`pack_codes`; padding dropped)."""
    if bits == 8:
        return packed.astype(np.float32)
    return np.take(UNPACK[bits], packed, axis=0).reshape(len(packed), -1)[:, :dim]


def pq_tie_margin(width: int) -> float:
    """How close, relative to ``(|x| + max |c|)^2``, two centroids' distances from a sub-vector of ``width`` values
    may be before the matrix-product ranking is not trusted: twice the float64 rounding bound of the product form
    ``|c|^2 - 2 x.c`` plus that of the summed squares, with room to spare (Higham's gamma_n, n = width + 2)."""
    return (4 * width + 16) * 2.0**-53


def pq_nearest_in_order(parts: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each float64 sub-vector in ``parts [k, s]`` among ``centroids [256, s]`` by
    ``sum_j (x_j - c_j)^2`` added up in column order, element by element: operations that round alike in numpy and
    torch (:func:`uembed.model.qat.pq_nearest_in_order` does the same ones), the first of equal sums winning."""
    distances = np.zeros((len(parts), len(centroids)))
    for column in range(parts.shape[1]):
        difference = parts[:, column, None] - centroids[None, :, column]
        distances += difference * difference
    return distances.argmin(axis=1)


def pq_encode(rows: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """uint8 codes ``[k, M]``: each sub-vector's nearest centroid (squared L2).

    Training (``uembed.model.qat.pq_codes``) must pick the codes the export picks, but two libraries' float64
    matrix products round differently (and one library's differently for one row and for a block), so near-equal
    distances, exact ties and rows far from the origin (where ``|c|^2 - 2 x.c`` cancels) could rank either way.
    So: the product ranks each sub-vector, and a sub-vector whose two nearest are within :func:`pq_tie_margin` is
    ranked again by :func:`pq_nearest_in_order`, whose operations round alike everywhere. Outside the margin the
    product's nearest is the exact one, and the one the ordered sums find; inside it, both libraries use the ordered
    sums. So the codes do not depend on the library, the block or the batch a row comes in."""
    rows = np.asarray(rows, dtype=np.float32)
    subvectors, _, width = codebooks.shape
    wide = np.asarray(codebooks, dtype=np.float64)
    codes = np.empty((len(rows), subvectors), dtype=np.uint8)
    norms = np.einsum("mcs,mcs->mc", wide, wide)
    reach = np.sqrt(norms.max(axis=1))  # the farthest centroid's norm, a codebook
    scaled = -2 * wide  # exact: x.(-2c) is -2 x.c to the bit, and the norms are added in place (one pass fewer)
    margin = pq_tie_margin(width)
    for start in range(0, len(rows), PQ_ENCODE_ROWS):
        block = rows[start : start + PQ_ENCODE_ROWS].reshape(-1, subvectors, width).astype(np.float64)
        for m in range(subvectors):
            parts = np.ascontiguousarray(block[:, m])
            distances = parts @ scaled[m].T  # the row's own norm ranks nothing
            distances += norms[m]
            nearest = np.argmin(distances, axis=1)
            bound = distances[np.arange(len(parts)), nearest] + margin * (np.sqrt((parts * parts).sum(axis=1)) + reach[m]) ** 2
            close = np.count_nonzero(distances <= bound[:, None], axis=1) > 1  # a second centroid within the margin
            if close.any():
                nearest[close] = pq_nearest_in_order(parts[close], wide[m])
            codes[start : start + len(block), m] = nearest
    return codes


def pq_decode(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """float32 rows ``[k, M * s]``: each code's centroid, sub-vector after sub-vector."""
    subvectors = codebooks.shape[0]
    return codebooks[np.arange(subvectors), codes.astype(np.intp)].reshape(len(codes), -1)


def default_subvectors(dim: int, subvectors: int | None = None) -> int:
    """The pq sub-vectors of a row of ``dim`` values: as given, else two values a sub-vector (a byte for 8 of
    float32's)."""
    return subvectors or max(dim // 2, 1)


def check_subvectors(dim: int, subvectors: int | None) -> None:
    """ValueError (one line) unless ``subvectors`` splits a row of ``dim`` values into equal sub-vectors."""
    if subvectors is None or subvectors < 1 or dim % subvectors:
        raise ValueError(f"pq needs a number of sub-vectors that divides the table's dim {dim}; got {subvectors}")


def train_codebooks(sample: np.ndarray, subvectors: int, seed: int = 0) -> np.ndarray:
    """float32 codebooks ``[M, 256, dim / M]`` trained by k-means on ``sample`` rows ``[n, dim]`` (faiss's
    ProductQuantizer). Fewer distinct sample rows than 256 leave centroids repeated, never missing."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("the pq row codec trains its codebooks with faiss: pip install 'uembed[train]' (faiss-cpu)") from exc
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    dim = sample.shape[1]
    check_subvectors(dim, subvectors)
    if len(sample) < PQ_CENTROIDS:  # k-means needs a point per centroid: repeat the rows there are
        sample = np.resize(sample, (PQ_CENTROIDS, dim))
    quantiser = faiss.ProductQuantizer(dim, subvectors, 8)
    quantiser.cp.seed = seed
    quantiser.cp.min_points_per_centroid = 1  # a small table is not a reason to refuse or to warn
    quantiser.verbose = False
    quantiser.train(sample)
    return faiss.vector_to_array(quantiser.centroids).reshape(subvectors, PQ_CENTROIDS, dim // subvectors).astype(np.float32)


def encode_rows(rows: np.ndarray, dtype: str, codebooks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 rows ``[k, dim]`` as a ``dtype`` row file stores them: (values ``[k, width]``, float32 scale and
    bias ``[k, 2]`` for the rowwise codecs, else None)."""
    rows = np.asarray(rows, dtype=np.float32)
    if dtype in ROWWISE_BITS:
        codes, scale_bias = quantise_rows(rows, ROWWISE_BITS[dtype])
        return pack_codes(codes, ROWWISE_BITS[dtype]), scale_bias
    if dtype == "pq":
        return pq_encode(rows, codebooks), None
    return rows.astype(NUMPY_ROW_DTYPE[dtype], copy=False), None


def decode_rows(values: np.ndarray, dtype: str, dim: int, scale_bias: np.ndarray | None = None,
                codebooks: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """float32 rows ``[k, dim]`` of stored values ``[k, width]`` (and the rows' scale and bias, or the codebooks)."""
    if dtype in ROWWISE_BITS:
        return unpack_codes(values, ROWWISE_BITS[dtype], dim) * scale_bias[:, :1] + scale_bias[:, 1:]
    if dtype == "pq":
        return pq_decode(values, codebooks)
    return values.astype(np.float32, copy=False)


def encode_records(rows: np.ndarray, dtype: str, codebooks: np.ndarray | None = None) -> np.ndarray:
    """float32 rows ``[k, dim]`` as the records a ``dtype`` table stores (what a row file and every serving tier
    hold, byte for byte as an export writes them): uint8 ``[k, record_bytes]``. A pq table's ``codebooks`` are
    needed to encode its rows."""
    values, scale_bias = encode_rows(rows, dtype, codebooks)
    records = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1)
    return records if scale_bias is None else np.concatenate([records, scale_bias.view(np.uint8)], axis=1)


def decode_records(records: np.ndarray, dtype: str, dim: int, codebooks: np.ndarray | None = None) -> np.ndarray:
    """float32 rows ``[k, dim]`` of records uint8 ``[k, record_bytes]`` (the inverse of :func:`encode_records`
    up to the codec's rounding)."""
    records = np.ascontiguousarray(records)
    subvectors = None if codebooks is None else codebooks.shape[0]
    row_bytes = row_width(dtype, dim, subvectors) * np.dtype(NUMPY_ROW_DTYPE[dtype]).itemsize
    values = records[:, :row_bytes].view(NUMPY_ROW_DTYPE[dtype])
    scale_bias = records[:, row_bytes:].view(np.float32) if dtype in ROWWISE_BITS else None
    return decode_rows(values, dtype, dim, scale_bias, codebooks)
