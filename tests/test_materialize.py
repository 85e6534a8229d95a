"""A mix materialised as one LoRA (rank concatenation) equals the merged-weights oracle."""

import json

import pytest
import torch

from vllm_av.offline.materialize import materialize_mix
from vllm_av.testing.models import build_demo
from vllm_av.testing.oracle import merged_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


def test_materialized_mix_equals_merged_weights(demo, tmp_path):
    model_dir, library = demo
    mix = {"alpha": 0.8, "beta": -0.5, "gamma": 1.7}
    lora = materialize_mix(library, mix, tmp_path / "mixes" / "m")
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["lora_alpha"] == 12  # 3 AVs of rank 4, scaling exactly 1
    want = merged_model(model_dir, library, mix)
    got = merged_model(model_dir, tmp_path / "mixes", {"m": 1.0})
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        diff = (got(ids).logits - want(ids).logits).abs().max().item()
    assert diff < 1e-4
    base = merged_model(model_dir, library, {})
    with torch.no_grad():
        assert (base(ids).logits - want(ids).logits).abs().max().item() > 0.1  # the mix matters
