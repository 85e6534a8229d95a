"""``vllm-av recontrol collect`` / ``train`` and ``inspect`` of a value function, on the tiny demo model."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_av.recontrol.collect import CollectError, collect, load_reward
from vllm_av.recontrol.train import TrainError, train_value
from vllm_av.recontrol.valuefile import check_value_compatibility, load_value_function, read_value_meta
from vllm_av.testing.rewards import word_count_reward

PROMPTS = ["medical: the patient", "legal: the court", "finance: a", "travel: the", "cooking: a", "science: the idea"]
REWARD = "vllm_av.testing.rewards:word_count_reward"


@pytest.fixture(scope="module")
def collected(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    summary = collect(demo[0], PROMPTS, REWARD, out, max_new_tokens=8, batch_size=4, progress=False)
    return out, summary


def test_shards_hold_the_states_that_produced_each_greedy_token(demo, collected):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = collected
    assert summary["trajectories"] == 6 and summary["hidden_size"] == 128
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) == 2
    tok = AutoTokenizer.from_pretrained(str(demo[0]))
    model = AutoModelForCausalLM.from_pretrained(str(demo[0]), dtype=torch.float32).eval()
    prompts = iter(PROMPTS)
    for shard in shards:
        t = load_file(str(shard))
        assert t["states"].dtype == torch.float32 and t["states"].shape[1] == 128
        assert int(t["lengths"].sum()) == t["states"].shape[0]
        for states in t["states"].split(t["lengths"].tolist()):
            ids = tok(next(prompts), return_tensors="pt").input_ids
            with torch.no_grad():
                want = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
            assert model.lm_head(states).argmax(-1).tolist() == want.tolist()[: len(states)]
    completions = [e["completion"] for e in summary["texts"]]
    assert [e["reward"] for e in summary["texts"]] == word_count_reward(PROMPTS[:5], completions)
    assert sum(summary["texts"][i]["reward"] for i in range(5)) > 0


def test_training_lowers_the_losses_and_saves_a_servable_value_function(demo, collected, tmp_path):
    out, _ = collected
    training = train_value(out, tmp_path / "v", "words", width=64, epochs=40, lr=3e-3, batch_size=4, progress=False)
    assert training["final_terminal_loss"] < 0.5 * training["terminal_loss"][0]
    assert len(training["td_loss"]) == 40
    value = load_value_function(tmp_path / "v")
    assert value.linears[0].in_features == 128
    meta = read_value_meta(tmp_path / "v")
    assert meta["name"] == "words" and meta["reward"] == REWARD and meta["training"]["trajectories"] == 6
    assert check_value_compatibility(meta, demo[0])[0] == "same_base"


def test_a_reward_model_directory_scores_the_answers(demo, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(config)
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(str(demo[0])).save_pretrained(tmp_path / "rm")
    summary = collect(demo[0], PROMPTS[:2], str(tmp_path / "rm"), tmp_path / "data", max_new_tokens=4, progress=False)
    score = load_reward(str(tmp_path / "rm"))
    again = score(prompts=PROMPTS[:2], completions=[e["completion"] for e in summary["texts"]])
    assert [e["reward"] for e in summary["texts"]] == pytest.approx(again)
    assert len(set(again)) == 2

    config.num_labels = 2
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm2")
    with pytest.raises(CollectError, match="num_labels is 2; a reward model has one label"):
        load_reward(str(tmp_path / "rm2"))


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected module:function"),
    ("vllm_av.nope:f", "cannot import vllm_av.nope"),
    ("vllm_av.testing.rewards:nope", "has no function 'nope'"),
])
def test_bad_reward_specs(spec, message):
    with pytest.raises(CollectError, match=message):
        load_reward(spec)


def test_training_refuses_a_directory_without_collected_data(tmp_path):
    with pytest.raises(TrainError, match="collect.json: missing"):
        train_value(tmp_path, tmp_path / "v", "x", progress=False)


def test_cli_collect_train_inspect(demo, tmp_path, cli, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:3]) + "\n")
    code, out, _ = cli("recontrol", "collect", demo[0], "--prompts", prompts, "--reward", REWARD,
                       "--out", tmp_path / "data", "--max-new-tokens", "4")
    assert code == 0 and json.loads(out)["trajectories"] == 3
    code, out, _ = cli("recontrol", "train", tmp_path / "data", "--out", tmp_path / "helpful", "--width", "32",
                       "--epochs", "3")
    assert code == 0 and json.loads(out)["epochs"] == 3
    code, text, _ = cli("inspect", tmp_path / "helpful", "--model", demo[0])
    assert code == 0
    assert "value function helpful: 2-layer ReLU MLP, width 32, hidden size 128" in text
    assert f"reward: {REWARD}" in text and "3 epochs on 3 trajectories" in text
    assert f"with {demo[0]}: same_base" in text
    code, out, _ = cli("inspect", tmp_path / "helpful", "--json")
    assert code == 0 and json.loads(out)["training"]["epochs"] == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(SystemExit):
        cli("recontrol", "collect", demo[0], "--prompts", bad, "--reward", REWARD, "--out", tmp_path / "d")
    assert 'must be an object with a "prompt" string' in capsys.readouterr().err
    code, _, err = cli("recontrol", "train", tmp_path, "--out", tmp_path / "v")
    assert code == 2 and "collect.json: missing" in err
