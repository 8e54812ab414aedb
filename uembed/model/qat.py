"""Quantization-aware training (``uembed train --qat int8|int4|int2``): the tables' rows pass through the export's
rowwise quantiser in the forward pass, so the rows a bundle of that codec serves are the rows the model learned with.

The quantiser is :func:`uembed.bundle.codecs.quantise_rows` followed by ``code * scale + bias``, written again in
torch with the same elementwise float32 operations in the same order: the range (int8 and int4 min and max;
int2 the greedy search of least squared error, whose errors are summed in the fixed order of ``tree_sum``, never by a
library's own sum), ``scale = (high - low) / (2**bits - 1)``, ``bias = low``, codes rounded to nearest with ties to
even. So a fake-quantised row equals, bit for bit, what a reader of the exported row decodes. It runs on the
distinct rows a batch gathers, never on the whole table, and in evaluation as in training: the run's own metrics
are those of its quantised rows.

The gradient is straight-through: the table receives the gradient of the quantised row as if quantisation were the
identity. The forward value is ``q(x) + (x - x.detach())`` rather than ``x + (q(x) - x).detach()``: the gradient
is the same, and ``x - x`` is exactly zero where ``x + (q - x)`` may round away from ``q``.

``--qat pq`` trains product-quantised rows: each sub-vector of a gathered row is replaced by its nearest centroid
(squared L2, the lowest index of a tie: :func:`uembed.bundle.codecs.pq_encode`'s rule) in the table's codebooks,
which the module holds beside the rows, with the same straight-through gradient to the rows, so a row learns which
centroid it takes. The codebooks are not learned by gradient: every ``PQ_REFRESH_EVERY`` training batches they take
a few k-means (Lloyd) steps on a sample of the rows the last ``PQ_RECENT_BATCHES`` batches read (a row as often as
batches read it), started from where they are (the first time, from sampled rows), so the centroids follow the rows
the traffic reads. The export writes these codebooks, not new ones, and encodes each
row to its nearest centroid: the bundle serves the rows the run was scored with.
"""

from __future__ import annotations

import torch
from torch import nn

from uembed.bundle.codecs import PQ_CENTROIDS, RANGE_SEARCH, ROWWISE_BITS, pq_tie_margin
from uembed.contract.errors import SpecError

QAT_CODECS = (*ROWWISE_BITS, "pq")
PQ_REFRESH_EVERY = 100  # training batches between two refreshes of a pq run's codebooks
PQ_REFRESH_STEPS = 2  # Lloyd steps a refresh takes from the current centroids
PQ_FIRST_STEPS = 20  # Lloyd steps of the first fit, from sampled rows
PQ_REFRESH_SAMPLE = 256 * PQ_CENTROIDS  # rows a refresh fits to, drawn with replacement (faiss caps k-means at 256 a centroid)
PQ_CODE_ROWS = 4096  # rows whose distances to one codebook are computed at a time
PQ_RECENT_BATCHES = 25  # training batches whose distinct rows a refresh samples from


def check_qat(codec: str | None) -> None:
    """SpecError, one line, for an unknown QAT codec."""
    if codec is not None and codec not in QAT_CODECS:
        raise SpecError(f"unknown --qat {codec!r}; choose one of {', '.join(QAT_CODECS)}")


def qat_bits(codec: str | None) -> int:
    """Bits a value of the rowwise QAT codec ``codec`` (0 without QAT or for pq); SpecError for an unknown codec."""
    check_qat(codec)
    return ROWWISE_BITS.get(codec, 0) if codec else 0


def tree_sum(values: torch.Tensor) -> torch.Tensor:
    """:func:`uembed.bundle.codecs.tree_sum` in torch: sums over the last dim, the halves added elementwise."""
    width = values.shape[-1]
    padded = 1 << max(width - 1, 0).bit_length()
    if padded != width:
        values = nn.functional.pad(values, (0, padded - width))
    while values.shape[-1] > 1:
        half = values.shape[-1] // 2
        values = values[..., :half] + values[..., half:]
    return values[..., 0]


def squared_errors(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`uembed.bundle.codecs.squared_errors`: ``(decoded - x)**2`` of ``rows`` quantised over ``[low, high]``."""
    scale = (high - low) / torch.full_like(low, (1 << bits) - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((rows - low) / safe), 0.0, float((1 << bits) - 1))
    errors = codes * scale + low - rows
    return errors * errors


def quantisation_range(rows: torch.Tensor, bits: int, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`uembed.bundle.codecs.quantisation_range` of rows ``[..., dim]``: ``low`` and ``high`` ``[..., 1]``.

    With ``columns``, the kept values of each row are moved, in order, ahead of the others, whose errors count as
    zero: the tree sums then add what they add for the narrowed row."""
    if columns is not None:
        columns = columns.expand_as(rows)
        order = torch.argsort((~columns).to(torch.uint8), dim=-1, stable=True)
        rows, columns = rows.gather(-1, order), columns.gather(-1, order)
        low = torch.where(columns, rows, torch.inf).amin(dim=-1, keepdim=True)
        high = torch.where(columns, rows, -torch.inf).amax(dim=-1, keepdim=True)
    else:
        low, high = rows.amin(dim=-1, keepdim=True), rows.amax(dim=-1, keepdim=True)
    low, high = low + 0.0, high + 0.0  # a zero end is +0, as codecs.row_ends makes it
    if bits not in RANGE_SEARCH:
        return low, high
    bins, shrink_steps = RANGE_SEARCH[bits]

    def range_error(candidate_low: torch.Tensor, candidate_high: torch.Tensor) -> torch.Tensor:
        errors = squared_errors(rows, candidate_low, candidate_high, bits)
        return tree_sum(errors if columns is None else torch.where(columns, errors, torch.zeros_like(errors)))

    step = (high - low) / torch.full_like(low, bins)
    best_error = range_error(low, high).unsqueeze(-1)
    raised, lowered = torch.zeros_like(low), torch.zeros_like(low)  # steps the low end moved up, the high end down
    best_raised, best_lowered = raised, lowered
    # candidate 0 raises the low end, 1 lowers the high
    moves = torch.tensor([1.0, 0.0], dtype=rows.dtype, device=rows.device).view(2, *([1] * low.dim()))
    for _ in range(shrink_steps):
        candidate_raised, candidate_lowered = raised + moves, lowered + (1 - moves)
        errors = range_error(low + candidate_raised * step, high - candidate_lowered * step).unsqueeze(-1)
        raise_low = errors[0] < errors[1]
        raised = torch.where(raise_low, candidate_raised[0], raised)
        lowered = torch.where(raise_low, lowered, candidate_lowered[1])
        error = torch.where(raise_low, errors[0], errors[1])
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_raised = torch.where(better, raised, best_raised)
        best_lowered = torch.where(better, lowered, best_lowered)
    return low + best_raised * step, high - best_lowered * step


def quantise_rows(rows: torch.Tensor, bits: int, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`uembed.bundle.codecs.quantise_rows` of rows ``[..., dim]``: float32 codes ``[..., dim]`` and
    (scale, bias) ``[..., 2]``; with ``columns``, from the kept columns (the others' codes are not the export's)."""
    low, high = quantisation_range(rows, bits, columns)
    # Divisors as tensors on the rows' device: CUDA divides by a CPU scalar as a product by its reciprocal.
    scale = (high - low) / torch.full_like(low, (1 << bits) - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant row: scale 0, codes 0
    codes = torch.clamp(torch.round((rows - low) / safe), 0.0, float((1 << bits) - 1))
    return codes, torch.cat([scale, low], dim=-1)


def quantise_dequantise(rows: torch.Tensor, bits: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """float32 rows ``[..., dim]`` as the ``bits`` rowwise codec stores and decodes them (no gradient).

    ``columns`` (bool, broadcastable to ``rows``: a pruning's kept columns) limits each row to those columns: its
    scale and bias come from them alone and the others are zero, so the row quantises as the narrowed row will."""
    codes, scale_bias = quantise_rows(rows.detach(), bits, columns)
    decoded = codes * scale_bias[..., :1] + scale_bias[..., 1:]  # two roundings, as the numpy decoder: no fused multiply-add
    return decoded if columns is None else torch.where(columns, decoded, torch.zeros_like(decoded))


def fake_quantise(rows: torch.Tensor, bits: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """The rows quantised in the forward pass, with a straight-through gradient to ``rows``."""
    return quantise_dequantise(rows, bits, columns) + (rows - rows.detach())


def pq_nearest_in_order(parts: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """:func:`uembed.bundle.codecs.pq_nearest_in_order` in torch: the same float64 operations in the same order."""
    distances = torch.zeros(len(parts), len(centroids), dtype=torch.float64, device=parts.device)
    for column in range(parts.shape[1]):
        difference = parts[:, column, None] - centroids[None, :, column]
        distances += difference * difference
    return distances.argmin(-1)


def pq_codes(rows: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """int64 codes ``[k, M]`` of rows ``[k, M * s]``: each sub-vector's nearest centroid in ``codebooks``
    ``[M, 256, s]``, chosen as :func:`uembed.bundle.codecs.pq_encode` chooses it (a float64 matrix product ranks,
    ordered sums decide where its two nearest are within the rounding margin), so training and export agree on
    every row, ties included. A sub-vector at a time, in blocks: the distances of a block are ``[rows, 256]``, never
    ``[rows, M, 256]``."""
    subvectors, _, width = codebooks.shape
    parts_all = rows.reshape(len(rows), subvectors, width)
    wide = codebooks.double()
    norms = (wide * wide).sum(-1)  # [M, 256]
    reach = norms.max(-1).values.sqrt()
    scaled = -2 * wide
    margin = pq_tie_margin(width)
    codes = torch.empty(len(rows), subvectors, dtype=torch.long, device=rows.device)
    for start in range(0, len(rows), PQ_CODE_ROWS):
        block = parts_all[start : start + PQ_CODE_ROWS].double()
        for m in range(subvectors):
            parts = block[:, m].contiguous()
            # x.(-2c) is -2 x.c to the bit; the norms added in place
            distances = (parts @ scaled[m].T).add_(norms[m])
            nearest = distances.argmin(-1)
            bound = distances.gather(1, nearest[:, None])[:, 0] + margin * ((parts * parts).sum(-1).sqrt() + reach[m]) ** 2
            close = (distances <= bound[:, None]).sum(-1) > 1  # a second centroid within the margin
            if bool(close.any()):
                nearest[close] = pq_nearest_in_order(parts[close], wide[m])
            codes[start : start + len(block), m] = nearest
    return codes


def pq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """float32 rows ``[k, M * s]`` of codes ``[k, M]``: each code's centroid, sub-vector after sub-vector."""
    subvectors = codebooks.shape[0]
    return codebooks[torch.arange(subvectors, device=codes.device), codes].reshape(len(codes), -1)


def pq_fake_quantise(rows: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Rows ``[k, dim]`` as their nearest centroids, with a straight-through gradient to ``rows``."""
    decoded = pq_decode(pq_codes(rows.detach(), codebooks), codebooks)
    return decoded + (rows - rows.detach())


@torch.no_grad()
def refresh_codebooks(table: torch.Tensor, codebooks: torch.Tensor, generator: torch.Generator, first: bool,
                      read: torch.Tensor | None = None) -> None:  # fmt: skip
    """Lloyd steps of ``codebooks`` ``[M, 256, s]`` (in place) on a random sample of the ``table`` rows
    ``[n, M * s]``: ``first``, from sampled rows, else from the current centroids. A centroid no sampled row
    takes stays where it was. ``read``: the rows (of ``table``) recent batches read, once a batch: the sample is
    drawn from them, so a row counts as often as the traffic reads it (the long tail of rarely read rows, still
    near their random start, would otherwise take most centroids); None or empty: drawn from the whole table."""
    subvectors, centroids, width = codebooks.shape
    if read is not None and len(read) <= PQ_REFRESH_SAMPLE and len(read):  # every read: a small table's refit stays small
        sample = table[read].float()
    elif read is not None and len(read):
        sample = table[read[torch.randint(len(read), (PQ_REFRESH_SAMPLE,), generator=generator).to(read.device)]].float()
    elif len(table) <= PQ_REFRESH_SAMPLE:  # a small table: all of it
        sample = table.float()
    else:  # with replacement: a permutation of a table of millions of rows costs more than the steps
        sample = table[torch.randint(len(table), (PQ_REFRESH_SAMPLE,), generator=generator).to(table.device)].float()
    count = len(sample)
    parts = sample.reshape(count, subvectors, width)
    if first:
        picks = torch.randperm(count, generator=generator)[:centroids] if count >= centroids else torch.arange(centroids) % count
        codebooks.copy_(parts[picks.to(table.device)].transpose(0, 1))
    for _ in range(PQ_FIRST_STEPS if first else PQ_REFRESH_STEPS):
        codes = pq_codes(sample, codebooks)
        for m in range(subvectors):
            sums = torch.zeros_like(codebooks[m]).index_add_(0, codes[:, m], parts[:, m])
            taken = torch.bincount(codes[:, m], minlength=centroids).unsqueeze(-1)
            codebooks[m] = torch.where(taken > 0, sums / taken.clamp(min=1), codebooks[m])
