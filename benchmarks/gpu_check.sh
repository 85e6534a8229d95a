#!/usr/bin/env bash
# Everything that needs a GPU, in one go (at most ~8 minutes on an H100), raw results under OUT:
#   1. the kernel and compiled-path tests on CUDA (tests/test_kernel.py -- real widths, the config
#      grid, the gpu-marked op, torch.compile and CUDA-graph tests -- tests/test_ops_reference.py and,
#      where vLLM is installed, tests/test_compiled_path.py);
#   2. benchmarks/kernel_bench.py --quick (the blend against the base GEMMs, in CUDA graphs);
#   3. vllm-av check, where vLLM is importable.
# Usage: bash benchmarks/gpu_check.sh [OUT]   (OUT defaults to $OUT, else gpu_check_out/)
# Then commit OUT/*.json to benchmarks/results/ and a summary to benchmarks/RESULTS.md with the
# device and the date. Without network: pytest is taken from .whl/gpu/ if the machine has none
# (put a pytest wheel there and carry it along).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
start=$(date +%s)
status=0
python -c "import pytest" 2>/dev/null || python -m pip install -q --no-index --find-links .whl/gpu pytest
# vllm_av.kernels is the top-level kernels/ folder: an editable install maps it (no network needed)
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "gpu_check: the editable install failed (see $OUT/install.log)"; status=1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.csv" 2>&1

timeout 330 python -m pytest -q -p no:cacheprovider tests/test_kernel.py tests/test_ops_reference.py \
  tests/test_compiled_path.py --junitxml "$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 240 python benchmarks/kernel_bench.py --quick --budget-s 180 --out "$OUT" 2>&1 | tee "$OUT/kernel_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if python -c "import vllm" 2>/dev/null; then
  timeout 180 python -m vllm_av.cli.main check --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "gpu_check: vLLM is not importable here: vllm-av check skipped" | tee "$OUT/check.log"
fi

python - "$OUT" "$status" "$start" <<'EOF'
import datetime, json, subprocess, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

out, status, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
summary = {"date": datetime.date.today().isoformat(), "seconds": round(time.time() - start),
           "device": (out / "device.csv").read_text().strip().splitlines()[-1],
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "exit_status": status}
try:
    import torch, triton
    summary.update(torch=torch.__version__, triton=triton.__version__)
except ImportError:
    pass
if (out / "pytest.xml").is_file():
    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    summary["pytest"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
if (out / "check.json").is_file():
    summary["check_verdict"] = json.loads((out / "check.json").read_text())["verdict"]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
exit $status
