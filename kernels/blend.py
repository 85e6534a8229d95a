"""Fused Triton kernel for ``torch.ops.vllm_av.blend_`` (layout: see :mod:`vllm_av.serving.blend.op`).

The op computes, for every token row ``t``::

    y[t, slice_k] += sum_n coef[t, n] * B[n, slice_k] @ (A[k, n] @ x[t]),
    coef[t, n] = sum of av_scale[t, m] over the entries m with av_index[t, m] == n

Design
------
Rows are processed in tiles of ``BLOCK_T`` rows.  For one row tile, a library entry ``n`` is
*present* when some row of the tile gives it a non-zero coefficient; everything about absent
entries is skipped (no loads), so a tile whose rows are all ``-1`` / zero-scale costs one
small load of ``av_index`` and nothing else.  Work on a present entry is a dense low-rank
GEMM on tensor cores over the whole tile, so rows that share an adapter share its A/B tiles
(the grouping by adapter happens per tile, from the data, on the device).

One kernel, two kinds of programs (1-D grid):

* *shrink* programs ``(row tile, slice k, library entry n, K-split ks)`` compute
  ``h[t, k, n, :] = coef[t, n] * A[k, n] @ x[t]`` into a small scratch buffer; with a K split
  the input dim's ``BLOCK_K`` blocks are dealt out evenly (every program gets at least one), each
  program writes a float32 partial and the last program of its group sums them once, one partial
  at a time (any number of programs, no power of two needed);
* *expand* programs ``(row tile, column tile, slice k)`` own a tile of ``y``: they multiply
  the ``h`` of the present entries by ``B`` and add the result to ``y`` once, in float32.

By default they run as two launches of the same kernel (shrink, then expand).  With
``two_launches=False`` they share one launch: shrink programs have the lower program ids and
expand programs wait on a device counter until every shrink program has published its
result (CUDA dispatches blocks in id order, so producers are resident before any waiter);
the last expand program resets the counter, so the launch is self-contained and replays
correctly inside a CUDA graph.  On an H100 the spinning waiters cost more than the second
launch saves (see benchmarks/RESULTS.md), hence the default.

Every program first reads ``step_active`` (int32 ``[1]``, written with the per-step tables): a
step that holds no mix at all returns at once from every program, so under CUDA graphs the
captured launches cost one load each.

Shape-based configuration (:func:`blend_config`) selects the decode-shaped variant (few rows:
16-row tiles, K split across many programs so that even one token
spreads the adapter reads over the whole GPU) or the prefill-shaped one (thousands of rows:
large row tiles so each A/B tile is reused by many rows, no K split).  Nothing depends on
the values in ``av_index``/``av_scale`` on the host: no synchronisation, no ``.item()``, and
the grid is a function of the shapes only. :func:`config_problems` states what a configuration
must satisfy to compile and fit; the tests hold every configuration :func:`blend_config` returns
to it over a grid of real shapes, and compile the distinct ones for real GPU targets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_SLICES_PER_LAUNCH = 4
MAX_RANK = 512  # the largest AV rank the kernel takes (vLLM's own LoRA rank limit)
MAX_TILE_VALUES = 8192  # values in one A, B or h tile (bounds registers and shared memory)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class BlendConfig:
    """Tile sizes and launch shape for one call; derived from shapes only."""

    block_t: int  # rows per tile
    block_n: int  # output columns per expand program
    block_k: int  # input features per shrink step
    k_split: int  # shrink programs per (row tile, slice, entry) along the input dim
    num_warps: int
    two_launches: bool = True  # False: shrink and expand in one launch with an in-kernel barrier


def rank_block(rank: int) -> int:
    """The kernel's rank tile: ``rank`` rounded up to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(rank))


def blend_config(num_rows: int, d_in: int, num_slices: int, num_avs: int, num_entries: int, rank: int) -> BlendConfig:
    """Choose the decode- or prefill-shaped configuration from the problem shape."""
    block_r = rank_block(rank)
    # decode-shaped (few rows): spread the adapter reads across programs; prefill-shaped: big
    # row tiles, each A/B tile reused by many rows. Large ranks take smaller tiles.
    block_t = min(16 if num_rows <= 16 else (32 if num_rows <= 32 else 64), MAX_TILE_VALUES // block_r)
    block_n = min(128, MAX_TILE_VALUES // block_r)
    block_k = min(64, MAX_TILE_VALUES // block_r)
    row_tiles = triton.cdiv(num_rows, block_t)
    # present entries per tile is data; estimate it from shapes: at most min(N, rows * M)
    present_estimate = min(num_avs, num_rows * num_entries)
    wanted = triton.cdiv(256, row_tiles * num_slices * max(present_estimate, 1))
    # every K-split program gets at least one BLOCK_K block of the input dim
    k_split = min(triton.next_power_of_2(wanted), 16, triton.cdiv(d_in, block_k))
    return BlendConfig(block_t, block_n, block_k, k_split, num_warps=4)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def config_problems(cfg: BlendConfig, num_rows: int, d_in: int, num_slices: int, num_avs: int,
                    num_entries: int, rank: int) -> list[str]:
    """What keeps ``cfg`` from compiling or running correctly on this shape (empty: nothing).

    The kernel's rules: every ``tl.arange`` and block size a power of two, every ``tl.dot``
    operand dim at least 16, every K-split program given at least one input block, tiles within
    :data:`MAX_TILE_VALUES`, and the grid within CUDA's limit.
    """
    problems = []
    block_r, block_m = rank_block(rank), triton.next_power_of_2(num_entries)
    blocks = {"block_t": cfg.block_t, "block_n": cfg.block_n, "block_k": cfg.block_k, "BLOCK_R": block_r,
              "BLOCK_M": block_m}
    for name, value in blocks.items():
        if not _is_power_of_two(value):
            problems.append(f"{name}={value} is not a power of two")
    for name in ("block_t", "block_n", "block_k", "BLOCK_R"):
        if blocks[name] < 16:
            problems.append(f"{name}={blocks[name]} is below tl.dot's 16")
    for name, tile in (("A tile", cfg.block_k * block_r), ("B tile", block_r * cfg.block_n),
                       ("h tile", cfg.block_t * block_r)):
        if tile > MAX_TILE_VALUES:
            problems.append(f"{name} of {tile} values exceeds {MAX_TILE_VALUES}")
    if not 1 <= cfg.k_split <= triton.cdiv(d_in, cfg.block_k):
        problems.append(f"k_split={cfg.k_split} leaves a program without input (in={d_in}, block_k={cfg.block_k})")
    if rank > MAX_RANK:
        problems.append(f"rank {rank} exceeds {MAX_RANK}")
    row_tiles = triton.cdiv(num_rows, cfg.block_t)
    slices = min(num_slices, MAX_SLICES_PER_LAUNCH)
    if row_tiles * slices * num_avs * cfg.k_split >= 2**31:
        problems.append("the shrink grid exceeds CUDA's 2**31 - 1 programs")
    return problems


@triton.jit
def _load_entries(index_ptr, scale_ptr, row0, T, M, stride_it, stride_st,
                  BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """The tile's ``av_index`` (-1 where padded) and ``av_scale`` (0 where padded)."""
    rows = row0 + tl.arange(0, BLOCK_T)
    ms = tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < T) & (ms[None, :] < M)
    idx = tl.load(index_ptr + rows[:, None] * stride_it + ms[None, :], mask=mask, other=-1)
    scale = tl.load(scale_ptr + rows[:, None] * stride_st + ms[None, :], mask=mask, other=0.0)
    return idx, scale


@triton.jit
def _shrink_tile(pid, x_ptr, a_ptr, h_ptr, hp_ptr, group_ptr, index_ptr, scale_ptr,
                 T, M, D_IN, N, R, NUM_SLICES, K_SPLIT,
                 stride_xt, stride_ak, stride_an, stride_ar, stride_it, stride_st,
                 hp_stride_ks, h_stride_t, h_stride_k, h_stride_n,
                 BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Program ``pid`` -> (row tile, slice, entry, K chunk): ``h = coef * A x`` for its tile.

    The input dim's ``BLOCK_K`` blocks are dealt out evenly over the ``K_SPLIT`` programs of a
    group (at most one block apart; the configuration gives every program one at least). With
    ``K_SPLIT > 1`` each program writes a float32 partial; the last of a group to finish (counted
    on ``group_ptr``, which it resets) sums the partials into ``h`` once.
    """
    ks = pid % K_SPLIT
    n = (pid // K_SPLIT) % N
    k = (pid // (K_SPLIT * N)) % NUM_SLICES
    row0 = (pid // (K_SPLIT * N * NUM_SLICES)) * BLOCK_T
    idx, scale = _load_entries(index_ptr, scale_ptr, row0, T, M, stride_it, stride_st, BLOCK_T, BLOCK_M)
    coef = tl.sum(tl.where(idx == n, scale, 0.0), axis=1)  # what each row gives entry n
    if tl.max(tl.abs(coef), axis=0) > 0:  # entry n is present in this row tile
        rows = row0 + tl.arange(0, BLOCK_T)
        rs = tl.arange(0, BLOCK_R)
        blocks = tl.cdiv(D_IN, BLOCK_K)
        k_lo = (ks * blocks // K_SPLIT) * BLOCK_K
        k_hi = tl.minimum(((ks + 1) * blocks // K_SPLIT) * BLOCK_K, D_IN)
        a_base = a_ptr + k.to(tl.int64) * stride_ak + n.to(tl.int64) * stride_an
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + cols[None, :],
                        mask=(rows[:, None] < T) & (cols[None, :] < k_hi), other=0.0)
            a = tl.load(a_base + rs[None, :] * stride_ar + cols[:, None],
                        mask=(rs[None, :] < R) & (cols[:, None] < k_hi), other=0.0)
            x = x.to(a.dtype)
            if DOT_UPCAST:
                x, a = x.to(tl.float32), a.to(tl.float32)
            acc += tl.dot(x, a, out_dtype=tl.float32, input_precision=DOT_PRECISION)
        acc = acc * coef[:, None]
        h_off = rows[:, None] * h_stride_t + k * h_stride_k + n * h_stride_n + rs[None, :]
        row_ok = rows[:, None] < T
        if K_SPLIT == 1:
            tl.store(h_ptr + h_off, acc, mask=row_ok)
        else:
            tl.store(hp_ptr + ks * hp_stride_ks + h_off, acc, mask=row_ok)
            tl.debug_barrier()  # all of this program's stores precede its arrival
            group = (pid // K_SPLIT).to(tl.int64)
            if tl.atomic_add(group_ptr + group, 1, sem="acq_rel") == K_SPLIT - 1:
                total = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
                for part in range(0, K_SPLIT):  # one partial at a time: registers stay one tile
                    total += tl.load(hp_ptr + part * hp_stride_ks + h_off, mask=row_ok, other=0.0,
                                     cache_modifier=".cg")
                tl.store(h_ptr + h_off, total, mask=row_ok)
                tl.atomic_xchg(group_ptr + group, 0)


@triton.jit
def _expand_tile(pid, y_ptr, b_ptr, h_ptr, index_ptr, scale_ptr,
                 T, M, N, R, W0, W1, W2, W3, NUM_SLICES, COL_TILES,
                 stride_yt, stride_bn, stride_bo, stride_it, stride_st,
                 h_stride_t, h_stride_k, h_stride_n,
                 BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Program ``pid`` -> (row tile, slice, column tile): ``y_tile += sum_n h_n @ B_n^T``.

    Rows without any non-zero entry are neither loaded nor stored.
    """
    col_tile = pid % COL_TILES
    k = (pid // COL_TILES) % NUM_SLICES
    row0 = (pid // (COL_TILES * NUM_SLICES)) * BLOCK_T
    # column offset and width of slice k (at most four slices per launch)
    offset = tl.where(k > 0, W0, 0) + tl.where(k > 1, W1, 0) + tl.where(k > 2, W2, 0)
    width = tl.where(k == 0, W0, tl.where(k == 1, W1, tl.where(k == 2, W2, W3)))
    idx, scale = _load_entries(index_ptr, scale_ptr, row0, T, M, stride_it, stride_st, BLOCK_T, BLOCK_M)
    row_active = tl.sum(((idx >= 0) & (scale != 0.0)).to(tl.int32), axis=1) > 0
    if (col_tile * BLOCK_N < width) & (tl.max(row_active.to(tl.int32), axis=0) > 0):
        rows = row0 + tl.arange(0, BLOCK_T)
        rs = tl.arange(0, BLOCK_R)
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < width
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for n in range(0, N):
            coef = tl.sum(tl.where(idx == n, scale, 0.0), axis=1)
            present = tl.max(tl.abs(coef), axis=0) > 0  # masks below skip absent entries' loads
            h = tl.load(h_ptr + rows[:, None] * h_stride_t + k * h_stride_k + n * h_stride_n + rs[None, :],
                        mask=tl.where(present, rows[:, None] < T, False), other=0.0, cache_modifier=".cg")
            b = tl.load(b_ptr + tl.cast(n, tl.int64) * stride_bn + (offset + cols[None, :]) * stride_bo + rs[:, None],
                        mask=tl.where(present, col_ok[None, :] & (rs[:, None] < R), False), other=0.0)
            h = h.to(b.dtype)
            if DOT_UPCAST:
                h, b = h.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(h, b, out_dtype=tl.float32, input_precision=DOT_PRECISION)
        y = y_ptr + rows[:, None].to(tl.int64) * stride_yt + offset + cols[None, :]
        mask = row_active[:, None] & (rows[:, None] < T) & col_ok[None, :]
        y_old = tl.load(y, mask=mask, other=0.0)
        tl.store(y, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=mask)


@triton.jit
def _blend_kernel(y_ptr, x_ptr, a_ptr, b_ptr, h_ptr, hp_ptr, index_ptr, scale_ptr, active_ptr, sync_ptr,
                  T, M, D_IN, N, R, W0, W1, W2, W3, NUM_SLICES, K_SPLIT, COL_TILES,
                  stride_yt, stride_xt, stride_ak, stride_an, stride_ar, stride_bn, stride_bo,
                  stride_it, stride_st, hp_stride_ks, h_stride_t, h_stride_k, h_stride_n,
                  NUM_SHRINK, NUM_EXPAND,
                  PHASE: tl.constexpr,  # 0: shrink and expand in one launch, 1: shrink, 2: expand
                  BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Entry point: dispatch the program to its shrink or expand role (see module docstring).

    Every program of a step without any mix (``step_active == 0``) returns at once.
    """
    if tl.load(active_ptr) != 0:
        pid = tl.program_id(0)
        if PHASE == 2:
            pid += NUM_SHRINK
        if pid < NUM_SHRINK:
            _shrink_tile(pid, x_ptr, a_ptr, h_ptr, hp_ptr, sync_ptr + 2, index_ptr, scale_ptr,
                         T, M, D_IN, N, R, NUM_SLICES, K_SPLIT,
                         stride_xt, stride_ak, stride_an, stride_ar, stride_it, stride_st,
                         hp_stride_ks, h_stride_t, h_stride_k, h_stride_n,
                         BLOCK_T, BLOCK_M, BLOCK_R, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
            if PHASE == 0:
                tl.debug_barrier()
                tl.atomic_add(sync_ptr, 1, sem="release")  # publish this program's results
        else:
            if PHASE == 0:
                while tl.atomic_add(sync_ptr, 0, sem="acquire") < NUM_SHRINK:
                    pass
            _expand_tile(pid - NUM_SHRINK, y_ptr, b_ptr, h_ptr, index_ptr, scale_ptr,
                         T, M, N, R, W0, W1, W2, W3, NUM_SLICES, COL_TILES,
                         stride_yt, stride_bn, stride_bo, stride_it, stride_st,
                         h_stride_t, h_stride_k, h_stride_n,
                         BLOCK_T, BLOCK_M, BLOCK_R, BLOCK_N, DOT_PRECISION, DOT_UPCAST)
            if PHASE == 0:
                # the last expand program to finish resets the counters for the next launch
                if tl.atomic_add(sync_ptr + 1, 1) == NUM_EXPAND - 1:
                    tl.atomic_xchg(sync_ptr + 1, 0)
                    tl.atomic_xchg(sync_ptr, 0)


_counter_buffers: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, num_groups: int) -> torch.Tensor:
    """Per-device int32 counters: producers done, consumers done, then one per K-split group.

    The kernel returns every counter to zero, so the buffer is allocated (zeroed) once and only
    grows when a larger shape is first seen; :func:`reserve_scratch` sizes it up front, before
    any CUDA-graph capture.
    """
    device = torch.device(device)
    buf = _counter_buffers.get(device)
    if buf is None or buf.numel() < num_groups + 2:
        buf = _counter_buffers[device] = torch.zeros(num_groups + 2, dtype=torch.int32, device=device)
    return buf


def reserve_scratch(device: torch.device, max_rows: int, num_slices: int, num_avs: int, rank: int) -> None:
    """Allocate the kernel's sync counters for every call of up to ``max_rows`` rows, now.

    The plugin calls this when it loads the library, so no call inside a CUDA-graph capture
    ever allocates.
    """
    block_t = blend_config(max_rows, 1, num_slices, num_avs, 1, rank).block_t  # row tiles grow with rows
    _counters(device, triton.cdiv(max_rows, block_t) * min(num_slices, MAX_SLICES_PER_LAUNCH) * num_avs)


def _launch_slices(y, x, lora_a, lora_b, av_index, av_scale, step_active, widths, cfg: BlendConfig) -> None:
    """One blend launch (or two with ``cfg.two_launches``) for up to four consecutive slices."""
    num_slices, num_avs, rank, d_in = lora_a.shape
    num_rows, num_entries = av_index.shape
    block_r = rank_block(rank)
    # h: coef-scaled shrink output in the weights' dtype (the expand's MMA input);
    # hp: float32 K-split partials (only with k_split > 1)
    h = torch.empty((num_rows, num_slices, num_avs, block_r), dtype=lora_b.dtype, device=y.device)
    hp = torch.empty((cfg.k_split, *h.shape), dtype=torch.float32, device=y.device) if cfg.k_split > 1 else h
    row_tiles = triton.cdiv(num_rows, cfg.block_t)
    col_tiles = triton.cdiv(max(widths), cfg.block_n)
    num_shrink = row_tiles * num_slices * num_avs * cfg.k_split
    num_expand = row_tiles * num_slices * col_tiles
    w = list(widths) + [0] * (MAX_SLICES_PER_LAUNCH - len(widths))
    # the interpreter gets bfloat16 tl.dot wrong: there both operands are upcast exactly, which
    # keeps the arithmetic of the compiled kernel (float32 products of bfloat16 values)
    upcast = _INTERPRET and lora_b.dtype == torch.bfloat16
    counters = _counters(y.device, row_tiles * num_slices * num_avs)
    args = (y, x, lora_a, lora_b, h, hp, av_index, av_scale, step_active, counters,
            num_rows, num_entries, d_in, num_avs, rank, *w, num_slices, cfg.k_split, col_tiles,
            y.stride(0), x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
            lora_b.stride(0), lora_b.stride(1), av_index.stride(0), av_scale.stride(0),
            hp.stride(0) if cfg.k_split > 1 else 0, h.stride(0), h.stride(1), h.stride(2), num_shrink, num_expand)
    meta = dict(BLOCK_T=cfg.block_t, BLOCK_M=triton.next_power_of_2(num_entries), BLOCK_R=block_r,
                BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                # fp32 inputs: exact fp32 products (no TF32), as the reference computes
                DOT_PRECISION="ieee" if lora_b.dtype == torch.float32 or upcast else "tf32",
                DOT_UPCAST=upcast)
    if cfg.two_launches:
        _blend_kernel[(num_shrink,)](*args, PHASE=1, **meta)
        _blend_kernel[(num_expand,)](*args, PHASE=2, **meta)
    else:
        _blend_kernel[(num_shrink + num_expand,)](*args, PHASE=0, **meta)


def blend_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    av_index: torch.Tensor,
    av_scale: torch.Tensor,
    step_active: torch.Tensor,
    out_slices: list[int],
    config: BlendConfig | None = None,
) -> None:
    """``y += blend(x)`` in place with the fused kernel; same contract as ``blend_reference``.

    ``step_active`` (int32 ``[1]`` on ``y``'s device): 0 makes the call a no-op without reading
    the tables. ``config`` overrides the shape-based choice of :func:`blend_config` (for benchmarks).
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
    cfg = config or blend_config(num_rows, x.shape[1], len(out_slices), lora_a.shape[1], av_index.shape[1],
                                 lora_a.shape[2])
    col = 0
    for first in range(0, len(out_slices), MAX_SLICES_PER_LAUNCH):
        widths = out_slices[first : first + MAX_SLICES_PER_LAUNCH]
        _launch_slices(y[:, col : col + sum(widths)], x, lora_a[first : first + len(widths)],
                       lora_b[:, col : col + sum(widths)], av_index, av_scale, step_active, widths, cfg)
        col += sum(widths)
