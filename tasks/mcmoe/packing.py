"""Bit-packing of low-bit integer codes into uint8.

Layout (the same for every width b in 1..8): the codes of one row are split into runs of 8
values, zero-padded at the end of the row; the 8 codes of a run form one 8*b-bit little-endian
integer (code i occupies bits [b*i, b*(i+1))), written as b bytes, least significant first. So
1-bit packs 8 codes per byte, 2-bit 4, 4-bit 2, and 3-bit 8 codes into 3 bytes, without any code
straddling rows. A row of n codes takes ceil(n / 8) * b bytes.
"""

from __future__ import annotations

import torch

SUPPORTED_WIDTHS = tuple(range(1, 9))


def packed_row_bytes(n: int, bits: int) -> int:
    return -(-n // 8) * bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_WIDTHS:
        raise ValueError(f"bit width {bits} cannot be packed; supported widths are 1..8")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] integer codes in [0, 2**bits) -> [rows, ceil(n/8)*bits] uint8."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    pad = (-n) % 8
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    if bits == 8:  # the general layout reduces to one code per byte; skip the 64-bit words (sign bit)
        return c.to(torch.uint8)
    runs = c.view(rows, -1, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (runs << shifts).sum(dim=-1)  # [rows, n/8], at most 64 bits
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [rows, n/8, bits]
    return out.reshape(rows, -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: [rows, ceil(n/8)*bits] uint8 -> [rows, n] uint8 codes."""
    _check_bits(bits)
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n].to(torch.uint8)
    b = packed.to(torch.int64).view(rows, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1)  # [rows, n/8]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)
