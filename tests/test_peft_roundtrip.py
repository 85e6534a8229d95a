"""PEFT loads an extracted AV on the base model, and its logits equal the merged model W + B·A."""

import warnings

import pytest
import torch

from vllm_av.format.avfile import read_av, read_factors
from vllm_av.offline.extract import extract

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# float32 end to end: PEFT adds x·Aᵀ·Bᵀ to x·Wᵀ while the merged model folds B·A into W, so the
# two differ only by float32 rounding (~1e-6 relative per layer); a wrong scale, sign, rank or
# transposition moves the logits by > 1e-2.
ATOL, RTOL = 2e-5, 1e-5


def load_base(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()


def merged_logits(base, av, ids):
    model = load_base(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, (A, B) in read_factors(av).items():
            w = params[module + ".weight"]
            w.copy_((w.double() + B.double() @ A.double()).float())
        return model(ids).logits


def peft_logits(base, av, ids):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    meta = read_av(av)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_base(base), str(av)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    lora_layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(lora_layers) == sorted(meta.served_modules)
    for name, layer in lora_layers.items():
        assert layer.r["default"] == meta.modules[name].rank
        assert layer.scaling["default"] == 1.0  # alpha/r == 1 exactly for every module
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def test_peft_fixed_rank_equals_merged_model(tiny_pair, tmp_path, ids):
    base, aligned = tiny_pair
    extract(base, aligned, tmp_path / "av", rank=3, progress=False)  # truncated: planted rank is 4
    merged, peft = merged_logits(base, tmp_path / "av", ids), peft_logits(base, tmp_path / "av", ids)
    torch.testing.assert_close(peft, merged, atol=ATOL, rtol=RTOL)
    assert (merged - load_base(base)(ids).logits).abs().max() > 1e-2  # the AV does change the model


def test_peft_energy_mode_rank_pattern_and_skipped_module(tiny_pair, tmp_path, ids, helpers):
    base = tiny_pair[0]
    zero = "model.layers.0.mlp.up_proj"
    aligned = helpers.plant_deltas(base, tmp_path / "aligned", zero=(zero,), seed=3)
    extract(base, aligned, tmp_path / "av", energy=0.9, progress=False)
    meta = read_av(tmp_path / "av")
    assert meta.modules[zero].rank == 0 and len({s.rank for s in meta.served_modules.values()}) > 2
    merged, peft = merged_logits(base, tmp_path / "av", ids), peft_logits(base, tmp_path / "av", ids)
    torch.testing.assert_close(peft, merged, atol=ATOL, rtol=RTOL)


def test_peft_merge_and_unload_reproduces_the_factors(tiny_pair, tmp_path):
    from peft import PeftModel

    base, aligned = tiny_pair
    extract(base, aligned, tmp_path / "av", rank=2, progress=False)
    merged = PeftModel.from_pretrained(load_base(base), str(tmp_path / "av")).merge_and_unload()
    params, base_params = dict(merged.named_parameters()), dict(load_base(base).named_parameters())
    for module, (A, B) in read_factors(tmp_path / "av").items():
        delta = params[module + ".weight"].detach() - base_params[module + ".weight"].detach()
        torch.testing.assert_close(delta, B @ A, atol=1e-6, rtol=1e-5)


def test_fused_projections_are_one_module_each(tmp_path, ids, helpers):
    """Checkpoints with fused qkv_proj / gate_up_proj (Phi-3) get one LoRA module per fused weight."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(tmp_path / "base")
    gen = torch.Generator().manual_seed(1)

    def edit(tensors):
        for name, w in tensors.items():
            if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
                tensors[name] = w + 0.1 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)

    aligned = helpers.copy_checkpoint(tmp_path / "base", tmp_path / "aligned", edit)
    extract(tmp_path / "base", aligned, tmp_path / "av", rank=2, progress=False)
    assert {m.rsplit(".", 1)[-1] for m in read_av(tmp_path / "av").served_modules} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    merged, peft = merged_logits(tmp_path / "base", tmp_path / "av", ids), peft_logits(tmp_path / "base", tmp_path / "av", ids)
    torch.testing.assert_close(peft, merged, atol=ATOL, rtol=RTOL)
