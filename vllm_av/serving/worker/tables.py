"""Per-step tables: which AVs, at which scales, each token row of a forward pass blends.

:class:`AVWorkerState` maps requests to mixes and mixes to rows of a small pool; each step it
fills the persistent tables from the batch's requests with vectorised numpy over requests (never a
Python loop over tokens). The tables take the form the engine's blend backend reads
(:mod:`vllm_av.serving.blend.base`): :class:`EntryTables` -- ``index/scale [T, M]`` (entry ``m`` of
token row ``t``: library index, -1 = none, and scale) and ``step_active``, for the op and the C
kernel -- or :class:`CoefficientTables`, the dense ``coef [T, N]`` table of the dense CPU blend.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from vllm_av.serving.blend.base import COEFFICIENTS, ENTRIES
from vllm_av.serving.front.mix import MixError, parse_mix
from vllm_av.serving.library.avs import AVEntry
from vllm_av.serving.protocol import MIX_KEY
from vllm_av.serving.settings.config import AVConfig

logger = logging.getLogger("vllm.av")


class _Tables:
    """What both forms share: which rows the last update may have filled, and whether it had entries.

    ``active`` (host bool): whether the step has any entry, so CPU blends skip steps without mixes
    (never read by the op, where a host-side branch would break graph capture: the op reads the
    device-side ``step_active`` of :class:`EntryTables` instead).
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.active = False
        self._filled = 0  # rows that may hold entries from the last update

    def _rows_to_write(self, has_entries: bool, num_tokens: int) -> int:
        """Rows this update must write (0: none, the tables already hold no entries)."""
        if not has_entries and self._filled == 0:
            return 0
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed the AV table size {self.max_tokens}")
        rows = max(num_tokens, self._filled)
        self._filled = num_tokens if has_entries else 0
        self.active = has_entries
        return rows


class EntryTables(_Tables):
    """``index/scale [max_tokens, M]`` and ``step_active [1]`` (int32, 1 when the step has any entry),
    read by ``torch.ops.vllm_av.blend_`` and the C kernel; the pool of distinct mixes in the same form."""

    form = ENTRIES

    def __init__(self, max_tokens: int, max_per_request: int, device: torch.device):
        super().__init__(max_tokens)
        device = torch.device(device)
        self.max_per_request = max_per_request
        shape = (max_tokens, max_per_request)
        self.index = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.scale = torch.zeros(shape, dtype=torch.float32, device=device)
        self.step_active = torch.zeros(1, dtype=torch.int32, device=device)
        if device.type == "cpu":
            self._host = [(self.index, self.scale, self.step_active)]  # written in place, no copy
            self._copied = [None]
        else:
            # Pinned staging buffers, alternated. Under async scheduling the host may prepare a
            # step while earlier steps' copies are still queued: each buffer's last copy records
            # an event, and the buffer is rewritten only once that copy has run.
            self._host = [
                (torch.full(shape, -1, dtype=torch.int32).pin_memory(), torch.zeros(shape).pin_memory(),
                 torch.zeros(1, dtype=torch.int32).pin_memory())
                for _ in range(2)
            ]
            self._copied = [torch.cuda.Event() for _ in self._host]
        self._turn = 0

    def reset_pool(self, rows: int) -> None:
        """An empty pool of ``rows`` mixes (row 0: the empty mix)."""
        shape = (rows, self.max_per_request)
        self._pool_index = np.full(shape, -1, dtype=np.int32)
        self._pool_scale = np.zeros(shape, dtype=np.float32)

    def set_pool_row(self, row: int, entries: Sequence[tuple[int, float]]) -> None:
        """Pool row ``row`` holds the mix ``entries`` (library index, scale)."""
        for m, (index, scale) in enumerate(entries):
            self._pool_index[row, m] = index
            self._pool_scale[row, m] = scale

    def write(self, token_rows: np.ndarray | None, num_tokens: int) -> None:
        """Row ``t`` = pool row ``token_rows[t]`` (None = no entries); clear the rest."""
        rows = self._rows_to_write(token_rows is not None, num_tokens)
        if rows == 0:
            return
        turn = self._turn
        self._turn = (turn + 1) % len(self._host)
        host_index, host_scale, host_active = self._host[turn]
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # the copy that last read this buffer has run (returns at once if never recorded)
        hi, hs = host_index.numpy(), host_scale.numpy()
        written = 0
        if token_rows is not None:  # gathered straight into the tables, no temporaries
            # mode="clip": the rows come from the pool itself, so always in range ("raise" buffers: ~2x slower)
            np.take(self._pool_index, token_rows, axis=0, out=hi[:num_tokens], mode="clip")
            np.take(self._pool_scale, token_rows, axis=0, out=hs[:num_tokens], mode="clip")
            written = num_tokens
        if rows > written:
            hi[written:rows] = -1
            hs[written:rows] = 0.0
        host_active[0] = int(self.active)
        if host_index is not self.index:
            self.index[:rows].copy_(host_index[:rows], non_blocking=True)
            self.scale[:rows].copy_(host_scale[:rows], non_blocking=True)
            self.step_active.copy_(host_active, non_blocking=True)
            copied.record()


class CoefficientTables(_Tables):
    """``coef [max_tokens, N]`` (CPU): the sum of the scales each token gives each AV, what the dense
    CPU blend reads; the pool of distinct mixes in the same form."""

    form = COEFFICIENTS

    def __init__(self, max_tokens: int, num_avs: int):
        super().__init__(max_tokens)
        self.coef = torch.zeros(max_tokens, num_avs)

    def reset_pool(self, rows: int) -> None:
        """An empty pool of ``rows`` mixes (row 0: the empty mix); numpy for cheap per-entry writes."""
        self._pool_coef = np.zeros((rows, self.coef.shape[1]), dtype=np.float32)
        self._pool_coef_tensor = torch.from_numpy(self._pool_coef)

    def set_pool_row(self, row: int, entries: Sequence[tuple[int, float]]) -> None:
        for index, scale in entries:
            self._pool_coef[row, index] += scale

    def write(self, token_rows: np.ndarray | None, num_tokens: int) -> None:
        """Row ``t`` = pool row ``token_rows[t]`` (None = no entries); clear the rest."""
        rows = self._rows_to_write(token_rows is not None, num_tokens)
        if rows == 0:
            return
        written = 0
        if token_rows is not None:
            torch.index_select(self._pool_coef_tensor, 0, torch.from_numpy(token_rows), out=self.coef[:num_tokens])
            written = num_tokens
        if rows > written:
            self.coef[written:rows] = 0.0


def make_tables(form: str, max_tokens: int, max_per_request: int, num_avs: int,
                device: torch.device) -> EntryTables | CoefficientTables:
    """The per-step tables in ``form`` (a blend backend's ``table_form``)."""
    if form == COEFFICIENTS:
        return CoefficientTables(max_tokens, num_avs)
    return EntryTables(max_tokens, max_per_request, device)


class AVWorkerState:
    """Maps requests to mixes and mixes to table rows, for one model runner."""

    def __init__(self, entries: Sequence[AVEntry], config: AVConfig, tables, max_live_mixes: int):
        self.config = config
        self.tables = tables
        self.name_to_index = {entry.name: i for i, entry in enumerate(entries)}
        self._stale = False  # the library changed: mixes must be resolved again before the next step
        self._capacity = max(4 * max_live_mixes, 64)  # > 2x the live requests: room after compaction
        self._last_ids: list[str] = []  # the last update's batch (see update)
        self._last_counts = b""
        self._reset_pool()

    def _reset_pool(self) -> None:
        # Pool row 0 is the empty mix; each distinct mix in use gets one row, in the tables' form.
        self.tables.reset_pool(self._capacity + 1)
        self._mix_row: dict[tuple, int] = {(): 0}
        self._req_row: dict[str, int] = {}

    def _row_for_mix(self, mix: tuple) -> int:
        row = self._mix_row.get(mix)
        if row is None:
            row = len(self._mix_row)
            self._mix_row[mix] = row
            self.tables.set_pool_row(row, [(self.name_to_index[name], scale) for name, scale in mix])
        return row

    def _resolve(self, req_id: str, requests: dict) -> None:
        """Parse a new request's mix and give the request its pool row."""
        extra = getattr(requests[req_id].sampling_params, "extra_args", None) or {}
        spec = extra.get(MIX_KEY)
        mix: tuple = ()
        if spec is not None:
            try:
                mix = parse_mix(spec, self.name_to_index, self.config)
            except MixError as exc:  # the frontend validates; reaching here is a bug
                logger.error("vllm-av: request %s: %s; serving it without AV", req_id, exc)
        self._req_row[req_id] = self._row_for_mix(mix)

    def forget(self, req_id: str) -> None:
        """Request ``req_id`` left the runner (finished, aborted or preempted): drop its mix, so that
        the same id sent again later (client ids, ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1``) is
        resolved afresh instead of keeping the old request's mix."""
        self._req_row.pop(req_id, None)
        self._last_ids = []  # the next step refills the tables

    def set_slot(self, name: str, slot: int | None) -> None:
        """Runtime updates: AV ``name`` now lives in ``slot`` (None: unloaded). Takes effect at the next step."""
        if slot is None:
            self.name_to_index.pop(name, None)
        else:
            self.name_to_index[name] = slot
        self._stale = True

    def _compact(self, requests: dict) -> None:
        """Forget finished requests and the mixes only they used (and mixes of AVs no longer loaded)."""
        live = {rid: row for rid, row in self._req_row.items() if rid in requests}
        mixes = {row: mix for mix, row in self._mix_row.items()}
        self._reset_pool()
        for rid, row in live.items():
            mix = mixes[row]
            if all(name in self.name_to_index for name, _ in mix):
                self._req_row[rid] = self._row_for_mix(mix)
            # else: the request finished before its AV was unloaded (the engine refuses unloads in use)

    def update(self, req_ids: Sequence[str], num_scheduled_tokens: np.ndarray, requests: dict) -> None:
        """Fill the tables for a batch: request ``req_ids[i]`` owns ``num_scheduled_tokens[i]`` rows.

        A step that repeats the last one (same requests in the same order, same token counts: most
        decode steps) finds the tables already filled and returns at once.
        """
        counts = num_scheduled_tokens.tobytes()
        if self._stale:  # the library changed since the last step: resolve every mix again
            self._stale, self._last_ids = False, []
            self._compact(requests)
        if req_ids == self._last_ids and counts == self._last_counts:
            return
        self._last_ids, self._last_counts = list(req_ids), counts
        if len(self._mix_row) + len(req_ids) > self._capacity or len(self._req_row) > 2 * self._capacity:
            # Before any row is read (compaction renumbers rows). The second test forgets finished
            # requests when few distinct mixes would never fill the pool (else one entry per request leaks).
            self._compact(requests)
        rows = self._pool_rows(req_ids, requests)
        token_rows = np.repeat(rows, num_scheduled_tokens)
        num_tokens = len(token_rows)
        if not rows.any():  # no request in the batch has a mix
            token_rows = None
        self.tables.write(token_rows, num_tokens)

    def _pool_rows(self, req_ids: Sequence[str], requests: dict) -> np.ndarray:
        """Each request's pool row; a request seen for the first time has its mix parsed (once)."""
        row_of = self._req_row.__getitem__
        try:
            return np.fromiter(map(row_of, req_ids), dtype=np.int64, count=len(req_ids))
        except KeyError:
            for rid in req_ids:
                if rid not in self._req_row:
                    self._resolve(rid, requests)
            return np.fromiter(map(row_of, req_ids), dtype=np.int64, count=len(req_ids))
