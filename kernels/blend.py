"""Fused Triton kernel for ``torch.ops.vllm_av.blend_`` (layout: see :mod:`vllm_av.ops`).

The op computes, for every token row ``t``::

    y[t, slice_k] += sum_n coef[t, n] * B[n, slice_k] @ (A[k, n] @ x[t]),
    coef[t, n] = sum of av_scale[t, m] over the entries m with av_index[t, m] == n

Design
------
Rows are processed in tiles of ``BLOCK_T`` rows.  Each program first derives, from the tile's
``av_index``/``av_scale`` and on the device, the tile's *present* library entries (those some
row gives a non-zero scale) as a compact list: slot ``j`` holds the ``j``-th present entry in
ascending order.  All work then runs over that list only, in *groups* of ``GROUP`` slots:
the A rows (or B columns) of a group's entries are gathered into one operand of
``GROUP * BLOCK_R`` columns, so one tensor-core MMA serves every entry of the group and every
row of the tile (rows that share an adapter share its A/B tiles).  Absent entries cost
nothing, and a tile whose rows are all ``-1`` / zero-scale costs one small load of
``av_index``/``av_scale``.

Two launches per group of at most four output slices:

* *shrink* ``(row tile, slice k, slot group g, K chunk ks)``:
  ``h[t, k, slots of g, :] = coef * (A[k, entries of g] @ x[t])`` in float32 over its K chunk.
  With ``K_SPLIT == 1`` the program stores ``h``; with a K split (decode: few rows, so the
  adapter reads are spread over many programs) it adds into a zeroed ``h`` atomically.
* *expand* ``(row tile, slice k, column tile)``: ``y_tile += sum_g h[:, k, g] @ B[entries of g]``,
  one read-modify-write of ``y`` in float32; rows without any active entry are not written.

:func:`blend_config` picks tile sizes and the K split from the shapes only, so nothing depends
on the values in ``av_index``/``av_scale`` on the host: no synchronisation, no ``.item()``, and
the grid is a function of the shapes only (CUDA-graph safe).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_SLICES_PER_LAUNCH = 4
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class BlendConfig:
    """Tile sizes and launch shape for one call; derived from shapes only."""

    block_t: int  # rows per tile (the present-entry list is per tile)
    group: int  # present-entry slots per MMA group (group * BLOCK_R columns of h)
    block_k: int  # input features per shrink step
    k_split: int  # shrink programs per (row tile, slice, group) along the input dim
    block_n: int  # output columns per expand program
    num_warps: int = 4


def _programs_wanted() -> int:
    return 264  # two waves' worth of programs on an H100 (132 SMs)


def blend_config(num_rows: int, d_in: int, num_slices: int, num_avs: int, num_entries: int,
                 rank: int) -> BlendConfig:
    """Choose tile sizes and the K split from the problem shape (never from the data)."""
    block_t = 16 if num_rows <= 16 else (32 if num_rows <= 32 else 64)
    block_r = triton.next_power_of_2(rank)
    slots = _num_slots(num_rows, block_t, num_avs, num_entries)
    group = max(triton.cdiv(16, block_r), min(triton.next_power_of_2(slots), max(1, 256 // block_r)))
    block_k = 64
    block_n = 128 if group * block_r <= 64 else 64
    row_tiles = triton.cdiv(num_rows, block_t)
    # few rows (decode): split K so that the adapter reads spread over the whole GPU
    wanted = triton.cdiv(_programs_wanted(), row_tiles * num_slices * triton.cdiv(slots, group))
    k_split = min(triton.next_power_of_2(wanted), 64, triton.cdiv(d_in, block_k))
    num_warps = 8 if block_t * group * block_r >= 8192 else 4  # keeps the [T, group * R] accumulator in registers
    return BlendConfig(block_t, group, block_k, k_split, block_n, num_warps)


def _num_slots(num_rows: int, block_t: int, num_avs: int, num_entries: int) -> int:
    """Upper bound on the present entries of one row tile: ``min(N, rows per tile * M)``."""
    return min(num_avs, min(num_rows, block_t) * num_entries)


@triton.jit
def _slice_bounds(k, W0, W1, W2, W3):
    """Column offset and width of slice ``k`` (at most four slices per launch)."""
    offset = tl.where(k > 0, W0, 0) + tl.where(k > 1, W1, 0) + tl.where(k > 2, W2, 0)
    width = tl.where(k == 0, W0, tl.where(k == 1, W1, tl.where(k == 2, W2, W3)))
    return offset, width


@triton.jit
def _load_entries(index_ptr, scale_ptr, row0, T, M, stride_it, stride_st,
                  BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """The tile's entries; ``-1`` (and scale 0) where unused, padded or zero-scale."""
    rows = row0 + tl.arange(0, BLOCK_T)
    ms = tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < T) & (ms[None, :] < M)
    idx = tl.load(index_ptr + rows[:, None] * stride_it + ms[None, :], mask=mask, other=-1)
    scale = tl.load(scale_ptr + rows[:, None] * stride_st + ms[None, :], mask=mask, other=0.0)
    active = (idx >= 0) & (scale != 0.0)
    return tl.where(active, idx, -1), tl.where(active, scale, 0.0)


@triton.jit
def _entry_column(values, m, BLOCK_M: tl.constexpr):
    """Column ``m`` of a ``[BLOCK_T, BLOCK_M]`` tile."""
    return tl.sum(tl.where(tl.arange(0, BLOCK_M)[None, :] == m, values, 0), axis=1)


@triton.jit
def _present_entries(idx, BLOCK_M: tl.constexpr, BLOCK_NN: tl.constexpr):
    """``(present[n], slot[n], count)``: which entries the tile uses and their compact slots."""
    ns = tl.arange(0, BLOCK_NN)
    present = tl.zeros((BLOCK_NN,), dtype=tl.int32)
    for m in tl.static_range(BLOCK_M):
        col = _entry_column(idx, m, BLOCK_M)
        present = tl.maximum(present, tl.max((col[:, None] == ns[None, :]).to(tl.int32), axis=0))
    slot = tl.cumsum(present, axis=0) - 1
    return present, slot, tl.sum(present, axis=0)


@triton.jit
def _group_columns(g, present, slot, count,
                   GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_NN: tl.constexpr):
    """For the ``GROUP * BLOCK_R`` columns of slot group ``g``: library entry (-1 if none) and rank."""
    q = tl.arange(0, GROUP * BLOCK_R)
    slot_q = g * GROUP + q // BLOCK_R
    match = (slot[None, :] == slot_q[:, None]) & (present[None, :] > 0)
    entry = tl.sum(tl.where(match, tl.arange(0, BLOCK_NN)[None, :], 0), axis=1)
    return tl.where(slot_q < count, entry, -1), q % BLOCK_R


@triton.jit
def _coef_columns(idx, scale, entry, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """``coef[t, q] = sum_m scale[t, m] * (idx[t, m] == entry[q])`` (0 where ``entry`` is -1)."""
    coef = tl.zeros((BLOCK_T, BLOCK_Q), dtype=tl.float32)
    for m in tl.static_range(BLOCK_M):
        col_idx = _entry_column(idx, m, BLOCK_M)
        col_scale = _entry_column(scale, m, BLOCK_M)
        hit = (col_idx[:, None] == entry[None, :]) & (entry[None, :] >= 0)
        coef += tl.where(hit, col_scale[:, None], 0.0)
    return coef


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``a @ b`` with float32 accumulation.

    ``DOT_UPCAST`` is set only under ``TRITON_INTERPRET=1`` for bfloat16, whose ``tl.dot`` the
    interpreter gets wrong; the exact upcast keeps the arithmetic of the compiled kernel.
    """
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, out_dtype=tl.float32, input_precision=DOT_PRECISION)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, index_ptr, scale_ptr,
                   T, M, D_IN, R,
                   stride_xt, stride_ak, stride_an, stride_ar, stride_it, stride_st,
                   h_stride_t, h_stride_k,
                   NUM_SLICES: tl.constexpr, NUM_GROUPS: tl.constexpr, K_SPLIT: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_NN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Program -> (row tile, slice, slot group, K chunk): ``h[:, k, group] (+)= coef * A x``."""
    pid = tl.program_id(0)
    ks = pid % K_SPLIT
    g = (pid // K_SPLIT) % NUM_GROUPS
    k = (pid // (K_SPLIT * NUM_GROUPS)) % NUM_SLICES
    row0 = (pid // (K_SPLIT * NUM_GROUPS * NUM_SLICES)) * BLOCK_T
    idx, scale = _load_entries(index_ptr, scale_ptr, row0, T, M, stride_it, stride_st, BLOCK_T, BLOCK_M)
    present, slot, count = _present_entries(idx, BLOCK_M, BLOCK_NN)
    if g * GROUP < count:
        entry, rank = _group_columns(g, present, slot, count, GROUP, BLOCK_R, BLOCK_NN)
        col_ok = (entry >= 0) & (rank < R)
        a_cols = a_ptr + k.to(tl.int64) * stride_ak + tl.maximum(entry, 0).to(tl.int64) * stride_an + rank * stride_ar
        rows = row0 + tl.arange(0, BLOCK_T)
        chunk = tl.cdiv(tl.cdiv(D_IN, K_SPLIT), BLOCK_K) * BLOCK_K
        k_lo = ks * chunk
        k_hi = tl.minimum(k_lo + chunk, D_IN)
        acc = tl.zeros((BLOCK_T, GROUP * BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            feats = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + feats[None, :],
                        mask=(rows[:, None] < T) & (feats[None, :] < k_hi), other=0.0)
            a = tl.load(a_cols[None, :] + feats[:, None], mask=col_ok[None, :] & (feats[:, None] < k_hi), other=0.0)
            acc += _mma(x.to(a.dtype), a, DOT_PRECISION, DOT_UPCAST)
        acc *= _coef_columns(idx, scale, entry, BLOCK_T, GROUP * BLOCK_R, BLOCK_M)
        h = h_ptr + rows[:, None] * h_stride_t + k * h_stride_k + g * (GROUP * BLOCK_R) + tl.arange(0, GROUP * BLOCK_R)[None, :]
        mask = (rows[:, None] < T) & col_ok[None, :]
        if K_SPLIT == 1:
            tl.store(h, acc, mask=mask)
        else:
            tl.atomic_add(h, acc, mask=mask, sem="relaxed")


@triton.jit
def _expand_kernel(y_ptr, b_ptr, h_ptr, index_ptr, scale_ptr,
                   T, M, R, W0, W1, W2, W3,
                   stride_yt, stride_bn, stride_bo, stride_it, stride_st, h_stride_t, h_stride_k,
                   NUM_SLICES: tl.constexpr, COL_TILES: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NN: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Program -> (row tile, slice, column tile): ``y_tile += sum_g h[:, k, g] @ B[g]^T``."""
    pid = tl.program_id(0)
    col_tile = pid % COL_TILES
    k = (pid // COL_TILES) % NUM_SLICES
    row0 = (pid // (COL_TILES * NUM_SLICES)) * BLOCK_T
    offset, width = _slice_bounds(k, W0, W1, W2, W3)
    idx, scale = _load_entries(index_ptr, scale_ptr, row0, T, M, stride_it, stride_st, BLOCK_T, BLOCK_M)
    row_active = tl.max(idx, axis=1) >= 0
    if (col_tile * BLOCK_N < width) & (tl.max(row_active.to(tl.int32), axis=0) > 0):
        rows = row0 + tl.arange(0, BLOCK_T)
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < width
        y = y_ptr + rows[:, None].to(tl.int64) * stride_yt + offset + cols[None, :]
        y_old = tl.load(y, mask=(rows[:, None] < T) & col_ok[None, :], other=0.0)  # issued early
        present, slot, count = _present_entries(idx, BLOCK_M, BLOCK_NN)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for g in range(0, tl.cdiv(count, GROUP)):
            entry, rank = _group_columns(g, present, slot, count, GROUP, BLOCK_R, BLOCK_NN)
            q_ok = (entry >= 0) & (rank < R)
            h = tl.load(h_ptr + rows[:, None] * h_stride_t + k * h_stride_k + g * (GROUP * BLOCK_R)
                        + tl.arange(0, GROUP * BLOCK_R)[None, :],
                        mask=(rows[:, None] < T) & q_ok[None, :], other=0.0)
            b = tl.load(b_ptr + tl.maximum(entry, 0).to(tl.int64)[:, None] * stride_bn
                        + (offset + cols[None, :]) * stride_bo + rank[:, None],
                        mask=q_ok[:, None] & col_ok[None, :], other=0.0)
            acc += _mma(h.to(b.dtype), b, DOT_PRECISION, DOT_UPCAST)
        mask = row_active[:, None] & (rows[:, None] < T) & col_ok[None, :]
        tl.store(y, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=mask)


def _launch_slices(y, x, lora_a, lora_b, av_index, av_scale, widths, cfg: BlendConfig) -> None:
    """Shrink then expand for up to four consecutive slices."""
    num_slices, num_avs, rank, d_in = lora_a.shape
    num_rows, num_entries = av_index.shape
    block_r = triton.next_power_of_2(rank)
    num_groups = triton.cdiv(_num_slots(num_rows, cfg.block_t, num_avs, num_entries), cfg.group)
    h_shape = (num_rows, num_slices, num_groups * cfg.group * block_r)
    # float32 shrink output per present-entry slot; zeroed only when K-split programs add into it
    alloc = torch.zeros if cfg.k_split > 1 else torch.empty
    h = alloc(h_shape, dtype=torch.float32, device=y.device)
    row_tiles = triton.cdiv(num_rows, cfg.block_t)
    col_tiles = triton.cdiv(max(widths), cfg.block_n)
    w = list(widths) + [0] * (MAX_SLICES_PER_LAUNCH - len(widths))
    common = dict(NUM_SLICES=num_slices, GROUP=cfg.group, BLOCK_T=cfg.block_t,
                  BLOCK_M=triton.next_power_of_2(num_entries), BLOCK_NN=triton.next_power_of_2(num_avs),
                  BLOCK_R=block_r, num_warps=cfg.num_warps,
                  # fp32 inputs: exact fp32 products (no TF32), as the reference computes
                  DOT_PRECISION="ieee" if lora_b.dtype == torch.float32 else "tf32",
                  DOT_UPCAST=_INTERPRET and lora_b.dtype == torch.bfloat16)
    _shrink_kernel[(row_tiles * num_slices * num_groups * cfg.k_split,)](
        x, lora_a, h, av_index, av_scale, num_rows, num_entries, d_in, rank,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), av_index.stride(0), av_scale.stride(0),
        h.stride(0), h.stride(1),
        NUM_GROUPS=num_groups, K_SPLIT=cfg.k_split, BLOCK_K=cfg.block_k, **common)
    _expand_kernel[(row_tiles * num_slices * col_tiles,)](
        y, lora_b, h, av_index, av_scale, num_rows, num_entries, rank, *w,
        y.stride(0), lora_b.stride(0), lora_b.stride(1), av_index.stride(0), av_scale.stride(0),
        h.stride(0), h.stride(1),
        COL_TILES=col_tiles, BLOCK_N=cfg.block_n, **common)


def blend_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    av_index: torch.Tensor,
    av_scale: torch.Tensor,
    out_slices: list[int],
    config: BlendConfig | None = None,
) -> None:
    """``y += blend(x)`` in place with the fused kernel; same contract as ``blend_reference``.

    ``config`` overrides the shape-based choice of :func:`blend_config` (for benchmarks).
    """
    num_rows = y.shape[0]
    if num_rows == 0 or av_index.shape[1] == 0:
        return
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("x and y need unit stride along the feature dim")
    lora_a = lora_a.contiguous()
    lora_b = lora_b.contiguous()
    av_index = av_index.contiguous()
    av_scale = av_scale.contiguous()
    num_slices, num_avs, rank, d_in = lora_a.shape
    cfg = config or blend_config(num_rows, d_in, len(out_slices), num_avs, av_index.shape[1], rank)
    col = 0
    for first in range(0, len(out_slices), MAX_SLICES_PER_LAUNCH):
        widths = out_slices[first : first + MAX_SLICES_PER_LAUNCH]
        _launch_slices(y[:, col : col + sum(widths)], x, lora_a[first : first + len(widths)],
                       lora_b[:, col : col + sum(widths)], av_index, av_scale, widths, cfg)
        col += sum(widths)
