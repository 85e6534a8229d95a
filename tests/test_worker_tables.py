"""Per-step AV tables: rows follow their request's mix, stale rows are cleared, nothing indexes with -1."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.library.avs import AVEntry
from vllm_av.serving.blend.base import COEFFICIENTS, ENTRIES
from vllm_av.serving.worker.tables import AVWorkerState, CoefficientTables, make_tables

NAMES = ["a", "b", "c", "d"]
RANK = 2


@pytest.fixture(params=[False, True], ids=["op_tables", "dense_tables"])
def dense(request):
    """Every test runs on both table forms: the op's index/scale (CUDA) and the dense CPU one."""
    return request.param


def make_state(dense, max_tokens=64, m=3, max_live=4):
    entries = [AVEntry(name=n, path=f"/lib/{n}", rank=RANK, modules=()) for n in NAMES]
    config = AVConfig(path="/lib", max_per_request=m)
    tables = make_tables(COEFFICIENTS if dense else ENTRIES, max_tokens, m, len(NAMES), torch.device("cpu"))
    return AVWorkerState(entries, config, tables, max_live)


def requests(mixes, forms=None):
    """Fake runner requests; ``forms`` optionally gives the wire form of a request's mix."""
    forms = forms or {}
    return {
        rid: SimpleNamespace(
            mix=mix,
            sampling_params=SimpleNamespace(extra_args=None if mix is None else {"av": forms.get(rid, mix)}),
        )
        for rid, mix in mixes.items()
    }


def expected_rows(mix, m):
    idx, scale = [-1] * m, [0.0] * m
    for k, (name, s) in enumerate(sorted((mix or {}).items())):
        idx[k], scale[k] = NAMES.index(name), s
    return idx, scale


def check(state, reqs, order, counts):
    state.update(order, np.array(counts), reqs)
    tables, m = state.tables, state.config.max_per_request
    row = 0
    for rid, n in zip(order, counts):
        idx, scale = expected_rows(reqs[rid].mix, m)
        coef = [0.0] * len(NAMES)
        for name, s in (reqs[rid].mix or {}).items():
            coef[NAMES.index(name)] += s
        for _ in range(n):
            if isinstance(tables, CoefficientTables):
                assert tables.coef[row].tolist() == pytest.approx(coef)
            else:
                assert tables.index[row].tolist() == idx
                assert tables.scale[row].tolist() == pytest.approx(scale)
            row += 1
    if isinstance(tables, CoefficientTables):
        assert (tables.coef[row:] == 0).all(), "rows past the batch must hold no entries"
    else:
        assert (tables.index[row:] == -1).all(), "rows past the batch must hold no entries"
    assert tables.active == any(reqs[rid].mix for rid in order)


def no_entries(tables, rows=slice(None)):
    return (tables.coef[rows] == 0).all() if isinstance(tables, CoefficientTables) else (tables.index[rows] == -1).all()


def test_rows_follow_requests_and_stale_rows_are_cleared(dense):
    state = make_state(dense)
    reqs = requests(
        {"r1": {"a": 0.5}, "r2": None, "r3": {"b": 2.0, "c": -1.25}, "r4": {"a": -0.5, "d": 1.0}},
        forms={"r3": [["c", -1.25], ["b", 2.0]], "r4": "d:1,a:-0.5"},
    )
    check(state, reqs, ["r1", "r2", "r3", "r4"], [5, 1, 7, 2])
    check(state, reqs, ["r3", "r1"], [1, 1])  # a smaller decode step: rows 2.. must be cleared
    check(state, reqs, ["r2"], [3])  # only plain rows: every row cleared
    assert no_entries(state.tables)


def test_plain_batches_do_no_work(dense):
    state = make_state(dense)
    table = state.tables.coef if dense else state.tables.index
    table.fill_(7)  # poison: an update that writes would clear it
    state.update(["x"], np.array([4]), requests({"x": None}))
    assert (table == 7).all()


def test_a_repeated_step_keeps_the_tables_and_any_change_rewrites_them(dense):
    state = make_state(dense)
    reqs = requests({"r1": {"a": 0.5}, "r2": {"b": -1.0}, "r3": None})
    check(state, reqs, ["r1", "r2"], [1, 1])
    table = state.tables.coef if dense else state.tables.index
    table[0].fill_(3)  # poison a batch row: a step that writes restores it
    state.update(["r1", "r2"], np.array([1, 1]), reqs)  # the same step again: nothing to write
    assert (table[0] == 3).all()
    check(state, reqs, ["r1", "r2"], [1, 2])  # another count
    check(state, reqs, ["r2", "r1"], [1, 2])  # another order
    check(state, reqs, ["r2", "r3"], [1, 2])  # another request
    check(state, reqs, ["r2", "r3"], [1, 2])


def test_many_requests_recycle_the_mix_pool(dense):
    state = make_state(dense, max_live=1)  # pool capacity 64 distinct mixes
    rng = np.random.default_rng(0)
    live = {}
    for step in range(300):
        rid = f"req{step}"
        live[rid] = {"a": float(rng.uniform(-2, 2)), "b": float(rng.uniform(-2, 2))}
        if len(live) > 5:
            live.pop(next(iter(live)))
        reqs = requests(live)
        order = list(live)
        check(state, reqs, order, [2] * len(order))
    assert len(state._mix_row) <= 64 + 2


def test_invalid_mix_reaching_the_worker_is_served_plain(dense):
    state = make_state(dense)
    reqs = requests({"r": "zzz:1"})
    state.update(["r"], np.array([2]), reqs)
    assert no_entries(state.tables, slice(0, 2))


def test_table_overflow_is_an_error(dense):
    state = make_state(dense, max_tokens=4)
    with pytest.raises(ValueError, match="exceed the AV table size"):
        state.update(["r"], np.array([5]), requests({"r": {"a": 1.0}}))


def test_cpu_blends_read_the_filled_tables(dense):
    """What the layer hook runs on CPU: each blend's ``from_tables`` on a step's tables, against float64."""
    from tests.test_ops_reference import loop_oracle
    from vllm_av.serving.blend.dense import CPUBlend
    from vllm_av.serving.blend.native import NativeCPUBlend
    from vllm_av.kernels.cpu import load

    state = make_state(dense)
    reqs = requests({"r0": {"a": 0.5, "c": -1.5}, "r1": None, "r2": {"d": 2.0}, "r3": {"a": 1.0, "b": 0.25, "d": -0.5}})
    counts = [3, 1, 2, 1]
    state.update(list(reqs), np.array(counts), reqs)
    gen = torch.Generator().manual_seed(11)
    slices, d_in, rows = [6, 5], 9, sum(counts)
    a = torch.randn(len(slices), len(NAMES), RANK, d_in, generator=gen)
    b = torch.randn(len(NAMES), sum(slices), RANK, generator=gen)
    x, y = torch.randn(rows, d_in, generator=gen), torch.randn(rows, sum(slices), generator=gen)
    idx = torch.tensor(sum(([expected_rows(reqs[r].mix, 3)[0]] * c for r, c in zip(reqs, counts)), []), dtype=torch.int32)
    scale = torch.tensor(sum(([expected_rows(reqs[r].mix, 3)[1]] * c for r, c in zip(reqs, counts)), []))
    want = loop_oracle(y, x, a, b, idx, scale, slices)
    blend = CPUBlend(a, b, slices) if dense else NativeCPUBlend(load(), a, b, slices, [RANK] * len(NAMES))
    blend.from_tables(y, x, state.tables)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_staging_buffers_are_not_rewritten_under_a_pending_copy():
    """Async scheduling: the host fills step N+2 while step N's copy is still queued behind the GPU.

    The stream is held by a long sleep kernel, three steps are written (the third reuses the first
    step's staging buffer), and each step's device tables are snapshotted on the stream right after
    its copy: every snapshot must hold its own step's rows.
    """
    device = torch.device("cuda")
    tables = make_tables(ENTRIES, 16, 2, len(NAMES), device)
    pool_index = np.array([[-1, -1], [0, 1], [2, -1], [3, 0]], dtype=np.int32)
    pool_scale = np.array([[0, 0], [0.5, -1], [2, 0], [1, 1]], dtype=np.float32)
    tables.reset_pool(len(pool_index))
    for row, (index, scale) in enumerate(zip(pool_index, pool_scale)):
        tables.set_pool_row(row, [(int(i), float(s)) for i, s in zip(index, scale) if i >= 0])
    steps = [np.array([1, 1, 2]), np.array([2, 3]), np.array([3, 3, 3, 1])]
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before any copy can run
    snapshots = []
    for rows in steps:
        tables.write(rows, len(rows))
        snapshots.append((tables.index.clone(), tables.scale.clone()))
    torch.cuda.synchronize()
    for rows, (index, scale) in zip(steps, snapshots):
        n = len(rows)
        assert index[:n].cpu().numpy().tolist() == pool_index[rows].tolist()
        assert scale[:n].cpu().numpy().tolist() == pool_scale[rows].tolist()
        assert (index[n:].cpu() == -1).all()


def test_mrv2_hooks_fill_rows_from_the_input_batch_layout(dense):
    """MRV2: mixes come from the requests the scheduler sent (re-sent in full after preemption), rows
    from the sorted batch's query_start_loc (padded entries past num_reqs ignored)."""
    from vllm_av.serving.worker.runner_hooks import fill_tables_mrv2, record_new_requests
    from vllm_av.serving.worker.state import AVWorker

    state = make_state(dense)
    worker = AVWorker(state.config, backend=None, mixes=state, layers={}, needs_lora_mapping=False)
    reqs = requests({"r1": {"a": 0.5}, "r2": None, "r3": {"b": 2.0, "c": -1.25}})
    record_new_requests(worker, SimpleNamespace(scheduled_new_reqs=[
        SimpleNamespace(req_id=rid, sampling_params=r.sampling_params) for rid, r in reqs.items()]))

    def step(order, counts):
        layout = np.concatenate([[0], np.cumsum(counts), [sum(counts)] * 2]).astype(np.int32)  # 2 padded entries
        fill_tables_mrv2(worker, SimpleNamespace(req_ids=order, num_reqs=len(order), query_start_loc_np=layout))
        row = 0
        for rid, n in zip(order, counts):
            idx, scale = expected_rows(reqs[rid].mix, state.config.max_per_request)
            for _ in range(n):
                if not dense:
                    assert state.tables.index[row].tolist() == idx and state.tables.scale[row].tolist() == scale
                row += 1
        assert no_entries(state.tables, slice(row, None))

    step(["r3", "r1", "r2"], [1, 1, 6])  # decodes first, then a prefill chunk
    worker.requests.pop("r3")  # preempted: MRV2 drops it ...
    step(["r1", "r2"], [1, 1])
    record_new_requests(worker, SimpleNamespace(scheduled_new_reqs=[  # ... and re-sends it in full
        SimpleNamespace(req_id="r3", sampling_params=reqs["r3"].sampling_params)]))
    step(["r1", "r2", "r3"], [1, 1, 9])


def test_step_active_flag_follows_the_batch():
    """The op form's device-side flag: 1 exactly when the step has an entry (the Triton kernel returns
    at once on 0), and it is cleared when a step without mixes follows one with mixes."""
    state = make_state(dense=False)
    flag = state.tables.step_active
    assert flag.tolist() == [0]
    check(state, requests({"r1": {"a": 1.0}, "r2": None}), ["r1", "r2"], [2, 1])
    assert flag.tolist() == [1]
    check(state, requests({"r2": None}), ["r2"], [3])
    assert flag.tolist() == [0]


def test_a_request_id_sent_again_gets_its_new_mix(dense):
    """Client ids (VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1): once the runner drops request "x", an "x"
    sent later with another mix is served with that mix, not the earlier one, in the same batch
    position with the same token count too (the step cache must not hide it)."""
    state = make_state(dense)
    check(state, requests({"x": {"a": 1.0}}), ["x"], [1])
    state.forget("x")  # what the runner hooks call when the request finishes
    check(state, requests({"x": {"b": -0.5}}), ["x"], [1])
    state.forget("x")
    check(state, requests({"x": None}), ["x"], [1])
