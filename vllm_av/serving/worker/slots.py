"""Worker side of runtime AV updates: load, replace and unload AVs in fixed slots, in two phases.

The engine core (:mod:`vllm_av.serving.engine.updates`) drives every rank through vLLM's
``collective_rpc`` with the module-level functions below (each gets the worker first and answers
with a :class:`~vllm_av.serving.protocol.StepResult`):

1. :func:`prepare_av` -- load the AV with vLLM's LoRA loader and slice and pack it for this rank's
   layers, without touching any buffer (a bad AV fails here, on every rank alike, and nothing changed);
2. :func:`commit_av` -- copy the prepared stacks into their slot, in place, and point the name
   at it; or :func:`discard_av` -- forget them;
3. :func:`unload_av` -- zero the slot and forget the name.

The engine core calls them between engine steps, so a step sees the old library or the new one,
never a mix. Slots are chosen here, identically on every rank (the same calls in the same order).
"""

from __future__ import annotations

import itertools
import logging

from vllm_av.serving.library.avs import AVEntry
from vllm_av.serving.protocol import StepResult
from vllm_av.serving.worker.loading import load_lora_model, refuse_unplaced, slot_stacks, write_slot
from vllm_av.serving.worker.state import worker_of

logger = logging.getLogger("vllm.av")

_lora_ids = itertools.count(1_000_000)  # ids for vLLM's LoRAModel objects (never registered with vLLM)


class RuntimeSlots:
    """The AV slots of one model runner: which slot each loaded AV holds, and loads in flight.

    ``layers``: ``{module name: layer}`` of the layers holding AV slots; ``mixes``: the runner's
    :class:`~vllm_av.serving.worker.tables.AVWorkerState` (its names map to slots)."""

    def __init__(self, runner, layers: dict, mixes, capacity: int):
        self.runner = runner
        self.layers = layers
        self.mixes = mixes
        self.capacity = capacity
        # name -> (slot, {layer name: (slot_stacks, rank)}): loads prepared, not yet committed
        self.pending: dict[str, tuple[int, dict]] = {}

    def _free_slot(self) -> int:
        used = set(self.mixes.name_to_index.values()) | {slot for slot, _ in self.pending.values()}
        free = [slot for slot in range(self.capacity) if slot not in used]
        if not free:
            raise ValueError(f"vllm-av: all {self.capacity} AV slots are in use")
        return free[0]

    def prepare(self, entry: AVEntry) -> int:
        """Load, slice and pack ``entry`` for this rank's layers; return the slot it will take (its own
        when replacing)."""
        lora_model = load_lora_model(self.runner, entry, lora_id=next(_lora_ids))
        refuse_unplaced([entry], [lora_model], self.layers)
        manager = self.runner.lora_manager._adapter_manager
        stacks = {}
        for name, layer in self.layers.items():
            weight = manager._get_lora_layer_weights(lora_model, name)
            stacks[name] = (slot_stacks(layer, weight), entry.rank if weight is not None else 0)
        slot = self.mixes.name_to_index.get(entry.name)
        if slot is None:
            slot = self._free_slot()
        self.pending[entry.name] = (slot, stacks)
        return slot

    def commit(self, name: str) -> int:
        """Copy the prepared AV ``name`` into its slot and serve it from the next step on."""
        slot, stacks = self.pending.pop(name)
        for layer_name, layer in self.layers.items():
            write_slot(layer, slot, *stacks[layer_name])
        self.mixes.set_slot(name, slot)
        return slot

    def discard(self, name: str) -> None:
        self.pending.pop(name, None)

    def unload(self, name: str) -> int:
        """Forget AV ``name`` and zero its slot."""
        slot = self.mixes.name_to_index[name]
        self.mixes.set_slot(name, None)
        for layer in self.layers.values():
            write_slot(layer, slot, slot_stacks(layer, None), 0)
        return slot


def _slots(worker) -> RuntimeSlots:
    state = worker_of(worker.model_runner)
    if state is None or state.slots is None:
        raise RuntimeError("vllm-av: this worker serves no AVs with runtime updates on")
    return state.slots


def prepare_av(worker, entry: dict) -> StepResult:
    """collective_rpc target: :meth:`RuntimeSlots.prepare` for ``AVEntry(**entry)``; a bad AV is an
    ``error`` naming the problem (nothing changed on this rank)."""
    try:
        return StepResult(slot=_slots(worker).prepare(AVEntry(**entry)))
    except Exception as exc:  # noqa: BLE001 -- vLLM's loader or the slicing refused this AV: report it
        return StepResult(error=(str(exc).strip().splitlines() or [type(exc).__name__])[0].removeprefix("vllm-av: "))


def commit_av(worker, name: str) -> StepResult:
    """collective_rpc target: :meth:`RuntimeSlots.commit`."""
    return StepResult(slot=_slots(worker).commit(name))


def discard_av(worker, name: str) -> StepResult:
    """collective_rpc target: :meth:`RuntimeSlots.discard`."""
    _slots(worker).discard(name)
    return StepResult()


def unload_av(worker, name: str) -> StepResult:
    """collective_rpc target: :meth:`RuntimeSlots.unload`."""
    return StepResult(slot=_slots(worker).unload(name))
