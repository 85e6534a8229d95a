"""Every refused input of `vllm-av extract`: one stderr line naming the file/tensor, exit code 2,
and nothing written where --out points."""

import json
import pickle
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("torch_one_thread")

Q0 = "model.layers.0.self_attn.q_proj.weight"


class Payload:
    """Unpickling this touches a marker file: proves the checkpoint is never unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def expect_error(cli, out: Path, *args) -> str:
    """Run extract, assert exit 2 with one `vllm-av: error:` line and no output; return the message."""
    code, stdout, stderr = cli("extract", "--out", out, *args)
    assert code == 2 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm-av: error: "), stderr
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()), "temporary directory left"
    return lines[0].removeprefix("vllm-av: error: ")


@pytest.fixture
def pair_args(tiny_pair):
    return ("--base", tiny_pair[0], "--aligned", tiny_pair[1])


def test_different_architectures(tiny_pair, tmp_path, cli, helpers):
    aligned = helpers.copy_checkpoint(tiny_pair[1], tmp_path / "aligned")
    config = json.loads((aligned / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (aligned / "config.json").write_text(json.dumps(config))
    msg = expect_error(cli, tmp_path / "av", "--base", tiny_pair[0], "--aligned", aligned, "--rank", "2")
    assert msg == (
        f"different architectures: num_hidden_layers is 2 in base {tiny_pair[0]}/config.json "
        f"but 3 in aligned {aligned}/config.json"
    )


def test_shape_mismatch(tiny_pair, tmp_path, cli, helpers):
    def edit(t):
        t[Q0] = t[Q0][:, :32].contiguous()

    aligned = helpers.copy_checkpoint(tiny_pair[1], tmp_path / "aligned", edit)
    msg = expect_error(cli, tmp_path / "av", "--base", tiny_pair[0], "--aligned", aligned, "--rank", "2")
    assert msg == f"shape mismatch for tensor {Q0}: [64, 64] in base {tiny_pair[0]} but [64, 32] in aligned {aligned}"


def test_missing_tensor(tiny_pair, tmp_path, cli, helpers):
    aligned = helpers.copy_checkpoint(tiny_pair[1], tmp_path / "aligned", lambda t: t.pop(Q0))
    msg = expect_error(cli, tmp_path / "av", "--base", tiny_pair[0], "--aligned", aligned, "--rank", "2")
    assert msg == f"tensor {Q0} of {tiny_pair[0]} is missing from {aligned}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_delta(tiny_pair, tmp_path, cli, helpers, bad):
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(t):
        t[name][3, 5] = bad

    aligned = helpers.copy_checkpoint(tiny_pair[1], tmp_path / "aligned", edit)
    msg = expect_error(cli, tmp_path / "av", "--base", tiny_pair[0], "--aligned", aligned, "--rank", "2")
    assert msg == f"tensor {name} in {aligned}/model.safetensors contains NaN or Inf"


def test_pickle_checkpoint_is_refused_without_unpickling(tiny_pair, tmp_path, cli):
    aligned = tmp_path / "aligned"
    aligned.mkdir()
    (aligned / "config.json").write_bytes((tiny_pair[1] / "config.json").read_bytes())
    marker = tmp_path / "unpickled"
    (aligned / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    msg = expect_error(cli, tmp_path / "av", "--base", tiny_pair[0], "--aligned", aligned, "--rank", "2")
    assert msg == (
        f"{aligned}/pytorch_model.bin is a pickle checkpoint; vllm-av reads only safetensors and never "
        "unpickles (convert it to safetensors first)"
    )
    assert not marker.exists()


def test_rank_larger_than_the_matrix(tmp_path, cli, pair_args):
    msg = expect_error(cli, tmp_path / "av", *pair_args, "--rank", "65")
    assert msg == "--rank 65 is larger than tensor model.layers.0.mlp.down_proj.weight [64, 128] allows (min(out, in) = 64)"


def test_existing_output_without_force(tmp_path, cli, pair_args):
    out = tmp_path / "av"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = cli("extract", "--out", out, *pair_args, "--rank", "2")
    assert code == 2 and stderr == f"vllm-av: error: output directory {out} exists (use --force to replace it)\n"
    code, _, stderr = cli("extract", "--out", out, *pair_args, "--rank", "2", "--force")
    assert code == 2 and stderr == f"vllm-av: error: refusing to replace {out} with --force: it is not an AV directory\n"
    assert (out / "keep.txt").read_text() == "mine"


def test_identical_checkpoints(tiny_pair, tmp_path, cli):
    msg = expect_error(cli, tmp_path / "av", "--base", tiny_pair[0], "--aligned", tiny_pair[0], "--rank", "2")
    assert msg == f"base {tiny_pair[0]} and aligned {tiny_pair[0]} are identical: there is no delta"


def test_delta_only_outside_lora_modules(tiny_pair, tmp_path, cli, helpers):
    def edit(t):
        t["model.norm.weight"] += 0.5

    aligned = helpers.copy_checkpoint(tiny_pair[0], tmp_path / "aligned", edit)
    msg = expect_error(cli, tmp_path / "av", "--base", tiny_pair[0], "--aligned", aligned, "--rank", "2")
    assert msg == "no LoRA target module has a delta: everything that changed (norms, embeddings...) cannot be served as LoRA"


def test_factors_overflowing_float16(tiny_pair, tmp_path, cli, helpers):
    def edit(t):
        t[Q0] += 1e10  # rank-1 delta, S = 64e10: the entries of B and A are √S/8 = 1e5 > float16 max

    aligned = helpers.copy_checkpoint(tiny_pair[0], tmp_path / "aligned", edit)
    args = ("--base", tiny_pair[0], "--aligned", aligned, "--rank", "1", "--dtype", "float16")
    msg = expect_error(cli, tmp_path / "av", *args)
    assert msg == "factors of model.layers.0.self_attn.q_proj overflow float16; use --dtype float32 or bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cuda_unavailable(tmp_path, cli, pair_args):
    msg = expect_error(cli, tmp_path / "av", *pair_args, "--rank", "2", "--device", "cuda")
    assert msg == f"--device cuda: CUDA is not available to this torch ({torch.__version__}); use --device cpu"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--energy", "1.5"], "--energy must be in (0, 1], got 1.5"),
        (["--rank", "0"], "--rank must be >= 1, got 0"),
        (["--rank", "2", "--dtype", "int8"], "--dtype must be one of float32, bfloat16, float16, got 'int8'"),
        (["--rank", "2", "--name", "my av"], "AV name 'my av' must be 1-64 characters of [A-Za-z0-9_.-] (set it with --name)"),
    ],
)
def test_bad_options(tmp_path, cli, pair_args, args, message):
    assert expect_error(cli, tmp_path / "av", *pair_args, *args) == message


def test_rank_and_energy_are_exclusive(tmp_path, cli, pair_args):
    with pytest.raises(SystemExit) as exc:
        cli("extract", "--out", tmp_path / "av", *pair_args, "--rank", "2", "--energy", "0.5")
    assert exc.value.code == 2


def test_inspect_of_a_non_av_directory(tmp_path, cli):
    code, out, err = cli("inspect", tmp_path)
    assert (code, out) == (2, "")
    assert err == f"vllm-av: error: {tmp_path}/av.json not found: not an AV directory (made by `vllm-av extract`)\n"
