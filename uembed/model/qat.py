"""Quantization-aware training (``uembed train --qat int8|int4|int2``): the tables' rows pass through the export's
rowwise quantiser in the forward pass, so the rows a bundle of that codec serves are the rows the model learned with.

The quantiser is :func:`uembed.bundle.codecs.quantise_rows` followed by ``code * scale + bias``, written again in
torch with the same float32 operations in the same order (``scale = (max - min) / (2**bits - 1)``, ``bias = min``,
codes rounded to nearest with ties to even): a fake-quantised row equals, bit for bit, what a reader of the exported
row decodes. It runs on the rows a batch gathers, never on the whole table, and in evaluation as in training: the
run's own metrics are those of its quantised rows.

The gradient is straight-through: the table receives the gradient of the quantised row as if quantisation were the
identity. The forward value is ``q(x) + (x - x.detach())`` rather than ``x + (q(x) - x).detach()``: the gradient
is the same, and ``x - x`` is exactly zero where ``x + (q - x)`` may round away from ``q``.
"""

from __future__ import annotations

import torch

from uembed.bundle.codecs import ROWWISE_BITS
from uembed.contract.errors import SpecError

QAT_CODECS = tuple(ROWWISE_BITS)


def qat_bits(codec: str | None) -> int:
    """Bits a value of the QAT codec ``codec`` (0 without QAT); SpecError, one line, for an unknown codec."""
    if codec is None:
        return 0
    if codec not in ROWWISE_BITS:
        raise SpecError(f"unknown --qat {codec!r}; choose one of {', '.join(QAT_CODECS)}")
    return ROWWISE_BITS[codec]


def quantise_dequantise(rows: torch.Tensor, bits: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """float32 rows ``[..., dim]`` as the ``bits`` rowwise codec stores and decodes them (no gradient).

    ``columns`` (bool, broadcastable to ``rows``: a pruning's kept columns) limits each row to those columns: its
    scale and bias come from them alone and the others are zero, so the row quantises as the narrowed row will."""
    rows = rows.detach()
    levels = torch.tensor((1 << bits) - 1, dtype=torch.float32)
    if columns is None:
        low, high = rows.amin(dim=-1, keepdim=True), rows.amax(dim=-1, keepdim=True)
    else:
        low = torch.where(columns, rows, torch.inf).amin(dim=-1, keepdim=True)
        high = torch.where(columns, rows, -torch.inf).amax(dim=-1, keepdim=True)
    scale = (high - low) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant row: scale 0, codes 0
    codes = torch.clamp(torch.round((rows - low) / safe), 0.0, float((1 << bits) - 1))
    decoded = codes * scale + low  # two roundings, as the numpy decoder: no fused multiply-add
    return decoded if columns is None else torch.where(columns, decoded, torch.zeros_like(decoded))


def fake_quantise(rows: torch.Tensor, bits: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """The rows quantised in the forward pass, with a straight-through gradient to ``rows``."""
    return quantise_dequantise(rows, bits, columns) + (rows - rows.detach())
