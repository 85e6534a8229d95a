"""Runtime AV updates, piece by piece (no engine): the capacity setting, the front's library view,
the engine core's rules (in use -> 409, full -> 409, a rank's failure -> nothing changed), the
admission check of requests admitted before an update, slots rewritten in place, and the tables
following a slot change. The served end-to-end behaviour is in tests/test_vllm_runtime.py."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_av.serving.settings.config import SPARE_SLOTS, AVConfig, AVConfigError
from vllm_av.serving.library.avs import AVEntry, files_digest, load_library

pytestmark = pytest.mark.vllm  # the front and the engine-core pieces import vLLM's server stack


def test_capacity_is_the_library_unless_runtime_updates_are_on():
    assert AVConfig(path="/l").capacity(3) == 3
    assert AVConfig(path="/l", allow_runtime_updates=True).capacity(3) == 3 + SPARE_SLOTS
    assert AVConfig(path="/l", allow_runtime_updates=True, max_loaded=7).capacity(3) == 7
    with pytest.raises(AVConfigError, match="av.max_loaded needs av.allow_runtime_updates"):
        AVConfig(path="/l", max_loaded=5)
    with pytest.raises(AVConfigError, match="av.max_loaded must be a non-negative integer"):
        AVConfig(path="/l", allow_runtime_updates=True, max_loaded=-1)
    with pytest.raises(AVConfigError, match="av.allow_runtime_updates must be true or false"):
        AVConfig(path="/l", allow_runtime_updates="yes")


def test_an_empty_library_starts_only_with_runtime_updates(tmp_path):
    from vllm_av.serving.library.avs import AVLibraryError

    with pytest.raises(AVLibraryError, match="holds no adapters"):
        load_library(str(tmp_path), AVConfig(path=str(tmp_path)))
    assert load_library(str(tmp_path), AVConfig(path=str(tmp_path), allow_runtime_updates=True)) == []


def test_the_files_digest_follows_the_bytes(demo, tmp_path):
    import shutil

    _, library = demo
    copy = shutil.copytree(library / "alpha", tmp_path / "alpha")
    assert files_digest(copy) == files_digest(library / "alpha") != files_digest(library / "beta")
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert files_digest(copy) != files_digest(library / "alpha")


def entry(name: str, digest: str = "d0") -> AVEntry:
    return AVEntry(name=name, path=f"/avs/{name}", rank=4, modules=("m",), digest=digest)


def served(names=("alpha", "beta"), **config):
    from vllm_av.serving.front.served import ServedLibrary

    settings = AVConfig(path="/avs", allow_runtime_updates=True, **config)
    return ServedLibrary(settings, [entry(n) for n in names])


def test_the_front_changes_its_view_only_after_the_engine_agreed():
    """load/unload ask the engine first; a refusal leaves the listing and mix validation as they were,
    and while an update runs, requests naming its AV are refused ("retry"), never admitted."""
    from vllm_av.serving.front import runtime
    from vllm_av.serving.front.admission import admit
    from vllm_av.serving.front.mix import MixError

    library = served(max_loaded=3)
    seen = []

    async def refuse(*args):
        seen.append(args)
        params = SimpleNamespace(extra_args={"av": "alpha:1"})
        with pytest.raises(MixError, match="'alpha' is being loaded, replaced or unloaded right now; retry"):
            admit(params, library)
        return {"status": 409, "error": "AV 'alpha' is used by 2 queued or running request(s)"}

    with pytest.raises(runtime.AVUpdateError) as refused:
        asyncio.run(runtime.unload(library, refuse, "alpha"))
    assert refused.value.status == 409 and "used by 2" in str(refused.value)
    assert seen == [("unload", "alpha", None, False)]
    assert library.names == {"alpha", "beta"} and not library.updating
    assert admit(SimpleNamespace(extra_args={"av": "alpha:1"}), library) == (("alpha", 1.0),)

    async def agree(*args):
        return {"status": 200, "slot": 0}

    assert asyncio.run(runtime.unload(library, agree, "alpha")) == {"name": "alpha", "unloaded": True}
    assert library.names == {"beta"}
    assert library.listing()["runtime_updates"] == {"max_loaded": 3, "loaded": 1}
    with pytest.raises(MixError, match="unknown av 'alpha'"):
        admit(SimpleNamespace(extra_args={"av": "alpha:1"}), library)
    with pytest.raises(runtime.AVUpdateError, match="AV 'alpha' is not loaded") as missing:
        asyncio.run(runtime.unload(library, agree, "alpha"))
    assert missing.value.status == 404


def test_the_offline_helper_works_inside_a_running_event_loop():
    """``AVRuntime`` (over ``LLM``) is synchronous; called from async code or Jupyter, where a loop
    already runs in the thread, it still completes instead of failing in ``asyncio.run``."""
    from vllm_av.serving.front.runtime import AVRuntime
    from vllm_av.serving.front.served import serve_for

    calls = []

    class Core:  # the engine core client of an offline LLM whose engine core runs in its own process
        def call_utility(self, method, *args):
            calls.append((method, *args))
            return {"status": 200, "slot": 1} if method == "vllm_av_update" else {"alpha": 0}

    class InputProcessor:  # what the front's library is kept by (vllm_av.serving.front.served)
        pass

    processor = InputProcessor()
    serve_for(processor, served())
    llm = SimpleNamespace(llm_engine=SimpleNamespace(input_processor=processor, engine_core=Core()))
    runtime = AVRuntime(llm)

    async def from_async_code():
        return runtime.unload("beta"), runtime.list()

    unloaded, listing = asyncio.run(from_async_code())
    assert unloaded == {"name": "beta", "unloaded": True}
    assert [(av["name"], av["in_use"]) for av in listing] == [("alpha", 0)]
    assert calls == [("vllm_av_update", "unload", "beta", None, False), ("vllm_av_in_use",)]


def test_a_bad_directory_never_reaches_the_engine(tmp_path):
    from vllm_av.serving.front import runtime

    library = served()

    async def engine(*args):
        raise AssertionError("the engine was asked")

    cases = [
        ({"name": "x", "path": str(tmp_path / "nope")}, f"{tmp_path / 'nope'}: AV directory not found"),
        ({"name": "x", "path": str(tmp_path)}, f"{tmp_path / 'adapter_config.json'}: missing"),
        ({"name": "x"}, 'a load needs "name" and "path" (strings)'),
        ({"name": 3, "path": str(tmp_path)}, 'a load needs "name" and "path" (strings)'),
        ({"name": "x", "path": str(tmp_path), "replace": "yes"}, '"replace" must be true or false'),
    ]
    for body, message in cases:
        with pytest.raises(runtime.AVUpdateError) as refused:
            asyncio.run(runtime.load(library, engine, body.get("name"), body.get("path"), body.get("replace", False)))
        assert refused.value.status == 400 and str(refused.value).startswith(message), body
    off = dataclasses.replace(library, config=AVConfig(path="/avs"))
    with pytest.raises(runtime.AVUpdateError, match="runtime AV updates are off; start the server with "
                                                    "--av-allow-runtime-updates") as disabled:
        asyncio.run(runtime.unload(off, engine, "alpha"))
    assert disabled.value.status == 404


class FakeCore:
    """What the ``vllm_av_update`` utility reads of vLLM's engine core, with ranks that record calls."""

    def __init__(self, model, library, ranks=2, fail_on_rank=None, max_loaded=5):
        config = AVConfig(path=str(library), allow_runtime_updates=True, max_loaded=max_loaded)
        self.vllm_config = SimpleNamespace(additional_config={"av": config.to_dict()},
                                           model_config=SimpleNamespace(model=str(model)))
        self.scheduler = SimpleNamespace(requests={})
        self.ranks, self.fail_on_rank, self.calls = ranks, fail_on_rank, []
        self.failure, self.crash = "module x is not a linear layer", False

    def collective_rpc(self, method, args=()):
        """Each rank's StepResult; the failing rank refuses the AV (or, with ``crash``, dies: the
        executor raises with its own message)."""
        results = []
        for rank in range(self.ranks):
            self.calls.append((method.__name__, rank))
            if method.__name__ == "prepare_av" and rank == self.fail_on_rank:
                if self.crash:
                    raise RuntimeError(self.failure)
                results.append({"error": self.failure})
            else:
                results.append({"slot": 7})
        return results

    def run(self, request_id, mix):
        self.scheduler.requests[request_id] = SimpleNamespace(
            request_id=request_id, sampling_params=SimpleNamespace(extra_args={"av": mix}))


def as_payload(av: AVEntry) -> dict:
    from vllm_av.serving.front.runtime import _as_dict

    return _as_dict(av)


def test_the_engine_core_refuses_updates_to_avs_in_use_and_beyond_capacity(demo):
    from vllm_av.serving.engine.updates import in_use, update

    model, library = demo
    core = FakeCore(model, library, max_loaded=4)
    new = as_payload(entry("delta", digest="new"))
    core.run("r1", [["alpha", 1.0]])
    core.run("r2", [["beta", 0.5], ["alpha", -1.0]])
    core.run("r3", [["gamma", 1.0]])
    assert in_use(core) == {"alpha": 2, "beta": 1, "gamma": 1}
    answer = update(core, "unload", "alpha")
    assert answer == {"status": 409, "in_use": 2,
                      "error": "AV 'alpha' is used by 2 queued or running request(s); unload it when they have finished"}
    assert update(core, "load", "alpha", {**new, "name": "alpha"}, True)["status"] == 409
    assert update(core, "load", "alpha", {**new, "name": "alpha"}, False)["error"].startswith(
        "AV 'alpha' is already loaded; pass \"replace\": true")
    assert update(core, "unload", "nope") == {"status": 404, "error": "AV 'nope' is not loaded"}
    assert core.calls == [], "a refused update must not reach any rank"
    assert update(core, "load", "delta", new) == {"status": 200, "slot": 7, "replaced": False}
    assert core.calls == [("prepare_av", 0), ("prepare_av", 1), ("commit_av", 0), ("commit_av", 1)]
    full = update(core, "load", "epsilon", {**new, "name": "epsilon"})
    assert full == {"status": 409, "error": "all 4 AV slots are in use (--av-max-loaded); unload an AV first"}
    del core.scheduler.requests["r1"], core.scheduler.requests["r2"]
    assert in_use(core) == {"alpha": 0, "beta": 0, "gamma": 1, "delta": 0}
    assert update(core, "unload", "alpha")["status"] == 200
    assert update(core, "load", "epsilon", {**new, "name": "epsilon"})["status"] == 200


def test_one_failing_rank_leaves_every_rank_unchanged(demo):
    from vllm_av.serving.engine.updates import update

    model, library = demo
    core = FakeCore(model, library, fail_on_rank=1)
    answer = update(core, "load", "delta", as_payload(entry("delta")))
    assert answer == {"status": 400, "error": "/avs/delta: module x is not a linear layer"}
    assert core.calls == [("prepare_av", 0), ("prepare_av", 1), ("discard_av", 0), ("discard_av", 1)]
    # a rank that dies: the executor's message, first line
    core.failure, core.crash = "shape mismatch [4, 8] != [4, 9]\nmore", True
    assert update(core, "load", "delta", as_payload(entry("delta")))["error"] == "/avs/delta: shape mismatch [4, 8] != [4, 9]"
    assert core.calls[-2:] == [("discard_av", 0), ("discard_av", 1)]
    core.fail_on_rank = None
    assert update(core, "load", "delta", as_payload(entry("delta")))["status"] == 200, "the slot was left taken"


def test_a_rank_reports_a_refused_av_in_its_answer_not_as_an_exception():
    """Errors cross processes as data (serving/protocol.py): ``prepare_av`` answers with the error,
    without the "vllm-av: " of the message it caught, and changes nothing."""
    from vllm_av.serving.worker.slots import prepare_av

    class Runner:  # a runner serving no AVs with runtime updates: _slots refuses
        pass

    worker = SimpleNamespace(model_runner=Runner())
    assert prepare_av(worker, as_payload(entry("delta"))) == {
        "error": "this worker serves no AVs with runtime updates on"}


def test_a_request_admitted_against_weights_since_replaced_is_refused(demo):
    """The front stamps each AV's digest on a request; the engine core refuses one that arrives after
    its AV was replaced or unloaded (it would otherwise run on other weights)."""
    from vllm_av.serving.engine.updates import refusal, update
    from vllm_av.serving.protocol import VERSIONS_KEY
    from vllm_av.serving.library.avs import library_for, local_model_dir

    model, library = demo
    core = FakeCore(model, library)
    digests = {e.name: e.digest for e in library_for(AVConfig(path=str(library), allow_runtime_updates=True),
                                                     local_model_dir(str(model)))}

    def request(**versions):
        return SimpleNamespace(request_id="r9", sampling_params=SimpleNamespace(extra_args={VERSIONS_KEY: versions}))

    assert refusal(core, request(alpha=digests["alpha"], beta=digests["beta"])) is None
    assert update(core, "load", "alpha", as_payload(entry("alpha", digest="other")), True)["status"] == 200
    assert refusal(core, request(alpha=digests["alpha"])) == (
        "AV 'alpha' was unloaded or replaced while request r9 was admitted; retry it")
    assert refusal(core, request(alpha="other", beta=digests["beta"])) is None
    assert update(core, "unload", "beta")["status"] == 200
    assert "AV 'beta' was unloaded" in refusal(core, request(beta=digests["beta"]))


@pytest.mark.parametrize("form", ["native", "dense"])
def test_a_slot_rewritten_in_place_blends_like_a_fresh_layout(form):
    """write_slot on a zero slot, on a replaced slot and back to zero: each time the blend equals one
    laid out from scratch with those weights; the native kernel keeps reading the same buffers."""
    from vllm_av.kernels.cpu import load
    from vllm_av.serving.blend.dense import CPUBlend
    from vllm_av.serving.blend.native import NativeCPUBlend

    gen = torch.Generator().manual_seed(5)
    slices, d_in, rank, num_avs, rows = [6, 5], 9, 4, 3, 7
    a = torch.randn(len(slices), num_avs, rank, d_in, generator=gen)
    b = torch.randn(num_avs, sum(slices), rank, generator=gen)
    a[:, 2], b[2] = 0, 0  # slot 2 free
    new_a, new_b = torch.randn(len(slices), rank, d_in, generator=gen), torch.randn(sum(slices), rank, generator=gen)
    new_a[:, 3:], new_b[:, 3:] = 0, 0  # a rank-3 AV padded to the buffers' rank 4
    x = torch.randn(rows, d_in, generator=gen)
    index = torch.tensor([[2, 0]] * rows, dtype=torch.int32)
    scale = torch.tensor([[0.7, -1.2]] * rows)
    coef = torch.zeros(rows, num_avs)
    coef[:, 2], coef[:, 0] = 0.7, -1.2

    def build(a, b, ranks):
        if form == "dense":
            return CPUBlend(a.clone(), b.clone(), slices)
        return NativeCPUBlend(load(), a.clone(), b.clone(), slices, ranks)

    def run(blend):
        y = torch.zeros(rows, sum(slices))
        blend(y, x, coef) if form == "dense" else blend(y, x, index, scale)
        return y

    blend = build(a, b, [4, 4, 0])
    pointers = (blend.a.data_ptr(), blend.b.data_ptr()) if form == "native" else None
    fresh_a, fresh_b = a.clone(), b.clone()
    fresh_a[:, 2], fresh_b[2] = new_a, new_b
    blend.write_slot(2, new_a, new_b, 3)
    assert torch.allclose(run(blend), run(build(fresh_a, fresh_b, [4, 4, 3])), atol=1e-5)
    blend.write_slot(0, new_a, new_b, 3)  # a replace: slot 0 now holds the same AV as slot 2
    fresh_a[:, 0], fresh_b[0] = new_a, new_b
    assert torch.allclose(run(blend), run(build(fresh_a, fresh_b, [3, 4, 3])), atol=1e-5)
    blend.write_slot(2, torch.zeros_like(new_a), torch.zeros_like(new_b), 0)  # an unload
    fresh_a[:, 2], fresh_b[2] = 0, 0
    assert torch.allclose(run(blend), run(build(fresh_a, fresh_b, [3, 4, 0])), atol=1e-5)
    if pointers:
        assert (blend.a.data_ptr(), blend.b.data_ptr()) == pointers


@pytest.mark.parametrize("dense", [False, True], ids=["op_tables", "dense_tables"])
def test_tables_follow_a_slot_change_from_the_next_step(dense):
    from vllm_av.serving.blend.base import COEFFICIENTS, ENTRIES
    from vllm_av.serving.worker.tables import AVWorkerState, make_tables

    entries = [AVEntry(name=n, path=f"/l/{n}", rank=2, modules=()) for n in ("a", "b")]
    tables = make_tables(COEFFICIENTS if dense else ENTRIES, 16, 2, 4, torch.device("cpu"))
    state = AVWorkerState(entries, AVConfig(path="/l", max_per_request=2), tables, 4)
    reqs = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"av": mix}))
            for rid, mix in {"r0": [["b", 1.5]], "r1": [["a", -1.0]]}.items()}

    def slots_of_row(row):
        if dense:
            return {i: v for i, v in enumerate(tables.coef[row].tolist()) if v}
        return {i: s for i, s in zip(tables.index[row].tolist(), tables.scale[row].tolist()) if i >= 0}

    state.update(["r0", "r1"], np.array([1, 1]), reqs)
    assert slots_of_row(0) == {1: 1.5} and slots_of_row(1) == {0: -1.0}
    state.set_slot("c", 3)  # a load: r0 and r1 unchanged, a new request may name c
    state.set_slot("a", None)  # an unload after r1 finished
    del reqs["r1"]
    reqs["r2"] = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"av": [["c", 2.0], ["b", 1.0]]}))
    state.update(["r0", "r2"], np.array([1, 2]), reqs)
    assert slots_of_row(0) == {1: 1.5}
    assert slots_of_row(1) == slots_of_row(2) == {3: 2.0, 1: 1.0}
    assert "a" not in state.name_to_index
