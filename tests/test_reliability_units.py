"""Regressions found by the reliability work (issue 7): mix parsing (other scripts' digits,
unbounded containers) and the worker's per-request bookkeeping (one entry leaked per request)."""

import numpy as np
import pytest
from test_worker_tables import make_state, requests

from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.front.mix import MixError, parse_mix

CONFIG = AVConfig(path="/lib", max_per_request=3)


@pytest.mark.parametrize("scale", ["١", "１", "٣.٥", "1e١", "𝟏"])
def test_only_ascii_digits_are_numbers(scale):
    """Python's ``float()`` takes Arabic-Indic and full-width digits; a mix scale must not."""
    with pytest.raises(MixError, match="is not a number"):
        parse_mix(f"alpha:{scale}", {"alpha"}, CONFIG)


class UnwalkedList(list):
    def __iter__(self):
        raise AssertionError("the mix was walked before its size was checked")


class UnwalkedDict(dict):
    def items(self):
        raise AssertionError("the mix was walked before its size was checked")


@pytest.mark.parametrize("spec", [UnwalkedList([["alpha", 1]] * 100_000), UnwalkedDict({f"a{i}": 1 for i in range(100_000)})])
def test_huge_list_or_dict_mix_is_refused_before_it_is_walked(spec):
    with pytest.raises(MixError, match="has 100000 entries; this server allows at most 3"):
        parse_mix(spec, {"alpha"}, CONFIG)


def test_worker_forgets_finished_requests_when_few_mixes_are_in_use():
    """With one mix in use the mix pool never fills; finished requests must still be forgotten."""
    state = make_state(dense=False, max_live=4)
    for i in range(5000):
        state.update([f"r{i}"], np.array([3]), requests({f"r{i}": {"a": 0.5}}))
        assert state.tables.index[0].tolist() == [0, -1, -1]
    assert len(state._req_row) <= 2 * state._capacity + 1
