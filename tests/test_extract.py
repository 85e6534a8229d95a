"""`vllm-av extract` / `inspect` on tiny checkpoints: exactness, optimality, energy mode, sharding,
memory, the report, and the compatibility verdicts."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_av.format.avfile import check_compatibility, read_av, read_factors
from vllm_av.offline.extract import extract
from vllm_av.testing.models import build_tiny_model, make_aligned_variant

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def true_deltas(base: Path, aligned: Path) -> dict[str, torch.Tensor]:
    """``{tensor name: aligned − base}`` in float64, from single-file checkpoints."""
    b, a = load_file(base / "model.safetensors"), load_file(aligned / "model.safetensors")
    return {n: a[n].double() - b[n].double() for n in b}


@pytest.fixture(scope="module")
def rank4(tiny_pair, tmp_path_factory):
    """The AV of the tiny pair at rank 4, the rank of the planted deltas."""
    base, aligned = tiny_pair
    out = tmp_path_factory.mktemp("avs") / "rank4"
    extract(base, aligned, out, rank=4, progress=False)
    return out


def test_planted_rank_is_reproduced_to_float32_precision(tiny_pair, rank4):
    deltas = true_deltas(*tiny_pair)
    meta, factors = read_av(rank4), read_factors(rank4)
    assert len(factors) == len(meta.modules) == 14
    for module, (A, B) in factors.items():
        delta = deltas[module + ".weight"]
        assert A.dtype == B.dtype == torch.float32
        assert (A.shape, B.shape) == ((4, delta.shape[1]), (delta.shape[0], 4))
        err = float((B.double() @ A.double() - delta).norm() / delta.norm())
        assert err < 1e-6, module
        assert meta.modules[module].rel_error == pytest.approx(err, rel=0.05, abs=1e-7)
        assert meta.modules[module].retained_energy == pytest.approx(1.0, abs=1e-6)
    assert meta.totals.rel_error < 1e-6


def test_unservable_deltas_are_reported_with_their_share(tiny_pair, rank4):
    deltas = true_deltas(*tiny_pair)
    total = sum(float(d.square().sum()) for d in deltas.values())
    meta = read_av(rank4)
    # make_aligned_variant perturbs the embedding and the first input norm densely
    assert set(meta.dropped) == {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"}
    for name, share in meta.dropped.items():
        assert share == pytest.approx(float(deltas[name].square().sum()) / total, rel=1e-5)
    t = meta.totals
    assert t.delta_energy == pytest.approx(total, rel=1e-5)
    assert t.dropped_share == pytest.approx(sum(meta.dropped.values()), rel=1e-6)
    assert t.lora_share + t.dropped_share == pytest.approx(1.0)
    assert t.retained_share == pytest.approx(t.lora_share, rel=1e-6)
    assert 0 < t.dropped_share < 0.05


def test_truncated_rank_is_eckart_young_for_every_module(tiny_pair, tmp_path):
    deltas = true_deltas(*tiny_pair)
    extract(*tiny_pair, tmp_path / "av", rank=2, progress=False)
    meta, factors = read_av(tmp_path / "av"), read_factors(tmp_path / "av")
    for module, (A, B) in factors.items():
        delta = deltas[module + ".weight"]
        S = torch.linalg.svdvals(delta)
        err2 = float((B.double() @ A.double() - delta).square().sum())
        assert err2 == pytest.approx(float(S[2:].square().sum()), rel=1e-4), module
        assert meta.modules[module].rel_error ** 2 == pytest.approx(err2 / float(S.square().sum()), rel=1e-4)
    assert 0.05 < meta.totals.rel_error < 0.9


def test_energy_mode_picks_smallest_ranks_and_writes_rank_pattern(tiny_pair, tmp_path, helpers):
    base = tiny_pair[0]
    zero = "model.layers.1.self_attn.k_proj"
    aligned = helpers.plant_deltas(base, tmp_path / "aligned", zero=(zero,))
    extract(base, aligned, tmp_path / "av", energy=0.9, progress=False)
    meta = read_av(tmp_path / "av")
    config = json.loads((tmp_path / "av" / "adapter_config.json").read_text())
    deltas = true_deltas(base, aligned)
    for module, stats in meta.modules.items():
        S2 = torch.linalg.svdvals(deltas[module + ".weight"]).square()
        if module == zero:
            assert (stats.rank, stats.method) == (0, "zero")
            continue
        frac = S2.cumsum(0) / S2.sum()
        assert frac[stats.rank - 1] >= 0.9 - 1e-6 and (stats.rank == 1 or frac[stats.rank - 2] < 0.9), module
        assert stats.retained_energy >= 0.9 - 1e-6
    ranks = {m: s.rank for m, s in meta.served_modules.items()}
    assert zero not in ranks and zero not in read_factors(tmp_path / "av")
    assert config["r"] == config["lora_alpha"] == max(ranks.values())
    assert config["rank_pattern"] == config["alpha_pattern"] == {m: r for m, r in ranks.items() if r != config["r"]}
    assert len(set(ranks.values())) > 2, ranks  # the planted spectra decay at different rates
    assert sorted(config["target_modules"]) == sorted(ranks)


def test_sharded_and_single_file_give_the_same_av(tiny_pair, tmp_path, helpers):
    base, aligned = tiny_pair
    sbase = helpers.reshard(base, tmp_path / "sbase", 3)
    saligned = helpers.reshard(aligned, tmp_path / "saligned", 4)
    extract(base, aligned, tmp_path / "single", energy=0.95, progress=False)
    extract(sbase, saligned, tmp_path / "sharded", energy=0.95, progress=False)
    a, b = load_file(tmp_path / "single" / "adapter_model.safetensors"), load_file(tmp_path / "sharded" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = read_av(tmp_path / "single").to_dict(), read_av(tmp_path / "sharded").to_dict()
    for m in (ma, mb):
        del m["base_path"], m["aligned_path"], m["name"]
    assert ma == mb


def test_half_precision_factors(tiny_pair, tmp_path):
    extract(*tiny_pair, tmp_path / "av", rank=4, dtype="bfloat16", progress=False)
    meta = read_av(tmp_path / "av")
    A, B = next(iter(read_factors(tmp_path / "av").values()))
    assert A.dtype == B.dtype == torch.bfloat16
    # the recorded error is measured on the saved bfloat16 factors
    assert all(1e-4 < s.rel_error < 1e-2 for s in meta.modules.values())
    assert meta.settings["dtype"] == "bfloat16"


def test_force_replaces_an_existing_av(tiny_pair, tmp_path, cli):
    out = tmp_path / "av"
    assert cli("extract", "--base", tiny_pair[0], "--aligned", tiny_pair[1], "--out", out, "--rank", "4")[0] == 0
    code, stdout, _ = cli("extract", "--base", tiny_pair[0], "--aligned", tiny_pair[1], "--out", out, "--rank", "2", "--force")
    assert code == 0 and "max rank 2" in stdout
    assert read_av(out).max_rank == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["av"]  # no temporary directories left behind


def test_inspect_text_and_json(tiny_pair, rank4, cli):
    code, out, err = cli("inspect", rank4, "--model", tiny_pair[0])
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "AV 'rank4'"
    assert "rank 4, factors float32, SVD on cpu" in lines[1]
    assert any(l.split()[:2] == ["base", read_av(rank4).base.arch_hash[:12]] for l in lines)
    row = next(l for l in lines if "model.layers.1.mlp.down_proj" in l).split()
    assert row[1:4] == ["64x128", "4", "100.0000%"] and row[-1] == "exact"
    assert "same_base" in out
    assert "14 LoRA modules (0 with zero delta" in out
    assert "model.embed_tokens.weight" in out and "dropped (cannot be served as LoRA)" in out

    code, out, _ = cli("inspect", rank4, "--json", "--model", tiny_pair[1])
    report = json.loads(out)
    assert code == 0 and report["format"] == "vllm-av/1" and report["name"] == "rank4"
    assert report["compatibility"]["verdict"] == "same_architecture"
    assert len(report["modules"]) == 14 and report["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == 4
    assert set(report["base"]) >= {"arch_hash", "tensors_hash", "content_hash", "arch"}
    assert report["totals"]["dropped_share"] > 0


def test_ranks_over_the_server_default_are_warned_at_extract_and_shown_by_inspect(tmp_path, cli):
    root = tmp_path / "wide"
    base = build_tiny_model(root / "base", hidden_size=160, intermediate_size=320, num_layers=1)
    aligned = make_aligned_variant(base, root / "aligned", seed=3, rank=80)
    code, out, err = cli("extract", "--base", base, "--aligned", aligned, "--out", tmp_path / "av", "--rank", "66")
    assert code == 0 and "max rank 66" in out
    assert "warning: 7 of 7 modules have rank > 64 (up to 66)" in err and "--av-max-rank 66" in err
    code, out, _ = cli("inspect", tmp_path / "av")
    assert "served: 7 of 7 modules have rank > 64" in out and "refuses this AV at start" in out
    code, out, _ = cli("inspect", tmp_path / "av", "--av-max-rank", "66")
    assert "served: fits --av-max-rank 66" in out
    code, _, err = cli("extract", "--base", base, "--aligned", aligned, "--out", tmp_path / "av", "--rank", "64", "--force")
    assert code == 0 and "warning" not in err


def test_dropped_share_is_split_by_kind_and_tied_embeddings_are_named(tmp_path, cli):
    from transformers import AutoModelForCausalLM

    untied = build_tiny_model(tmp_path / "untied", hidden_size=64, intermediate_size=128, num_layers=1)
    tied = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(str(untied))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(str(tied))
    for f in untied.glob("tok*"):
        (tied / f.name).write_bytes(f.read_bytes())
    for base in (untied, tied):
        aligned = make_aligned_variant(base, tmp_path / f"{base.name}-aligned", seed=1)
        code, out, _ = cli("extract", "--base", base, "--aligned", aligned, "--out", tmp_path / f"{base.name}-av", "--rank", "4")
        assert code == 0 and "dropped (cannot be served as LoRA): embeddings " in out and ", norms " in out
        assert ("the embeddings are tied" in out) == (base is tied)
        assert read_av(tmp_path / f"{base.name}-av").settings["tied_embeddings"] == (base is tied)


def test_compatibility_verdicts(tiny_pair, rank4, tmp_path, helpers):
    base, aligned = tiny_pair
    meta = read_av(rank4)
    assert check_compatibility(meta, base).verdict == "same_base"
    assert check_compatibility(meta, helpers.reshard(base, tmp_path / "sharded", 2)).verdict == "same_base"

    other_stage = build_tiny_model(tmp_path / "other", seed=7, hidden_size=64, intermediate_size=128, num_layers=2)
    verdict, reason = check_compatibility(meta, other_stage)
    assert verdict == "same_architecture" and "weights differ" in reason
    verdict, reason = check_compatibility(meta, aligned)
    assert verdict == "same_architecture" and "aligned checkpoint itself" in reason

    wider = build_tiny_model(tmp_path / "wider", seed=0, hidden_size=96, intermediate_size=128, num_layers=2)
    verdict, reason = check_compatibility(meta, wider)
    assert verdict == "incompatible" and "hidden_size=96 (AV base: 64)" in reason
    verdict, reason = check_compatibility(meta, tmp_path)
    assert verdict == "incompatible" and "config.json not found" in reason
    # the plugin may pass the parsed av.json instead of an AVMeta
    assert check_compatibility(json.loads((rank4 / "av.json").read_text()), base).verdict == "same_base"


def test_read_av_and_check_compatibility_do_not_import_torch(tiny_pair, rank4):
    code = textwrap.dedent(
        f"""
        import sys
        from vllm_av.format.avfile import check_compatibility, read_av
        verdict = check_compatibility(read_av({str(rank4)!r}), {str(tiny_pair[0])!r}).verdict
        assert verdict == "same_base", verdict
        assert "torch" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- memory -------------------------------------------------------------------------------------

MEM_LAYERS, MEM_HIDDEN, MEM_INTER = 32, 256, 512
# Stated bound on peak RSS growth during extraction. The two checkpoints hold 2 x 80 MiB of
# float32 weights; the largest tensor is 0.5 MiB. Reading tensor by tensor needs a few tensors,
# the SVD workspace, the factors (32 x 7 modules at rank 8: ~5 MiB) and the adapter buffer at
# save time: ~15-20 MiB measured. Holding even one whole model would exceed the bound.
MEM_BOUND_MIB = 40

MEASURE = """
import json, sys, time, torch
from vllm_av.offline import svd
from vllm_av.offline.extract import extract

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

svd.compress(torch.randn(300, 200), rank=4)  # load LAPACK etc. before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter (VmHWM)
before = rss("VmRSS")
start = time.perf_counter()
extract(sys.argv[1], sys.argv[2], sys.argv[3], rank=8, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "growth": rss("VmHWM") - before}))
"""


def write_big_pair(root: Path) -> tuple[Path, Path]:
    """Sharded Llama-shaped base/aligned checkpoints (weights only: what extraction reads)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": MEM_HIDDEN,
        "intermediate_size": MEM_INTER,
        "num_hidden_layers": MEM_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    }
    shapes = {
        "self_attn.q_proj": (MEM_HIDDEN, MEM_HIDDEN),
        "self_attn.k_proj": (MEM_HIDDEN, MEM_HIDDEN),
        "self_attn.v_proj": (MEM_HIDDEN, MEM_HIDDEN),
        "self_attn.o_proj": (MEM_HIDDEN, MEM_HIDDEN),
        "mlp.gate_proj": (MEM_INTER, MEM_HIDDEN),
        "mlp.up_proj": (MEM_INTER, MEM_HIDDEN),
        "mlp.down_proj": (MEM_HIDDEN, MEM_INTER),
    }
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(MEM_INTER * MEM_HIDDEN + MEM_LAYERS, generator=gen)
    dirs = root / "base", root / "aligned"
    weight_map = {}
    for i in range(MEM_LAYERS):
        base, aligned = {}, {}
        for module, (o, n) in shapes.items():
            name = f"model.layers.{i}.{module}.weight"
            base[name] = noise[i : i + o * n].view(o, n).clone()
            aligned[name] = base[name] + torch.randn(o, 4, generator=gen) @ torch.randn(4, n, generator=gen)
        file = f"model-{i + 1:05d}-of-{MEM_LAYERS:05d}.safetensors"
        for d, tensors in zip(dirs, (base, aligned)):
            d.mkdir(exist_ok=True)
            save_file(tensors, d / file)
        weight_map.update(dict.fromkeys(base, file))
    for d in dirs:
        (d / "config.json").write_text(json.dumps(config))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dirs


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_peak_memory_stays_near_a_few_tensors(tmp_path):
    base, aligned = write_big_pair(tmp_path)
    weights = sum(f.stat().st_size for d in (base, aligned) for f in d.glob("*.safetensors"))
    assert weights > 150 * 2**20
    # One OpenMP thread: this 2-core machine is shared, and oversubscribed OpenMP threads only
    # slow the run down. A fixed malloc mmap threshold makes the tiny (0.5 MiB) tensors behave
    # like real models' (>= 32 MiB, always mmap-ed by glibc): freed tensors go back to the OS
    # instead of fragmenting the heap, so the peak measures what extraction holds.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(base), str(aligned), str(tmp_path / "av")],
        env=env, capture_output=True, text=True, check=True,
    )
    result = json.loads(run.stdout.splitlines()[-1])
    growth_mib = result["growth"] / 2**20
    print(f"extraction of 2 x {weights / 2**21:.0f} MiB: {result['seconds']:.1f} s, peak RSS growth {growth_mib:.1f} MiB")
    assert growth_mib < MEM_BOUND_MIB
    assert read_av(tmp_path / "av").totals.rel_error < 1e-6
