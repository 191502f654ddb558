#!/usr/bin/env bash
# One command for a GPU machine: build the extension in place, run the GPU tests and the GPU benchmarks.
#
#   bash benchmarks/gpu_suite.sh          (from the repository root; what `make gpu-suite` runs)
#
# Uses the machine's python3 as it is (no pip, no network). Every step runs under a timeout and the whole
# suite under a budget (GPU_SUITE_BUDGET seconds, default 450) so that it finishes in under 8 minutes and one
# short GPU allocation holds a run and a rerun; a step that fails or times out is recorded and the suite goes
# on. The most important measurements come first (bfloat16, the precision generators train in), the float32
# (TF32 on both sides) ones last, where the budget may cut them. Output goes to $OUT when set, else to
# benchmarks/results/gpu_suite/:
#   suite.log             everything printed (written as it goes, so a killed run still leaves it)
#   suite.json            machine, versions and each step's status, exit code and seconds
#   summary.md            the same as a table, plus the pytest counts
#   junit-gpu.xml, junit-triton.xml   the GPU tests' reports
#   backend_table.json    the faster provider per op, dtype and mode (copy to sparsegen_kernels/ for "auto")
#   bench_results.tar.gz  result files the benchmarks wrote under benchmarks/results/ during the run
# Environment: GPU_SUITE_BUDGET, GPU_SUITE_PYTEST_ARGS (default "-q"; -n 8 is added when pytest-xdist is installed), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default 16), GPU_SUITE_SKIP_BUILD=1 (reuse an extension already built in place),
# GPU_SUITE_PYTHON (default python3), GPU_SUITE_STEPS (run only the named steps, e.g. for a rerun of what
# changed), GPU_SUITE_TEST_K (a pytest -k expression for the test steps).
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
DEST="${OUT:-$ROOT/benchmarks/results/gpu_suite}"
mkdir -p "$DEST"
LOG="$DEST/suite.log"
STEPS="$(mktemp)"
MARKER="$(mktemp)"  # benchmark result files newer than this were written by this run
START=$(date +%s)
BUDGET="${GPU_SUITE_BUDGET:-450}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${GPU_SUITE_PYTHON:-python3}"

# Render suite.json and summary.md from the steps recorded so far (called after every step).
report() {
  "$PY" - "$DEST" "$STEPS" "$START" <<'PYEOF' || true
import datetime, json, os, platform, subprocess, sys, time
import xml.etree.ElementTree as ET

dest, steps_file, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = []
for line in open(steps_file):
    name, status, rc, ms, cmd = line.rstrip("\n").split("\t", 4)
    steps.append(dict(name=name, status=status, rc=int(rc), seconds=int(ms) / 1000, command=cmd))
info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            host=platform.node(), python=platform.python_version(), elapsed_s=int(time.time()) - start)
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as exc:  # noqa: BLE001
    info["torch"] = f"unavailable: {exc}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception:  # noqa: BLE001
    info["triton"] = None
tests = None
import glob
for junit in sorted(glob.glob(os.path.join(dest, "junit*.xml"))):
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError:
        continue
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = tests or {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "passed": 0, "failed_tests": []}
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    for k, v in tot.items():
        tests[k] += v
    tests["passed"] += tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    for s in suites:
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                tests["failed_tests"].append(f"{case.get('classname')}::{case.get('name')}")
if tests:
    tests["failed_tests"] = tests["failed_tests"][:60]
result = dict(info=info, steps=steps, tests=tests)
json.dump(result, open(os.path.join(dest, "suite.json"), "w"), indent=2)
md = ["# GPU suite", "", f"{info['date']} on {info.get('device')} (torch {info.get('torch')}, CUDA "
      f"{info.get('torch_cuda')}, triton {info.get('triton')}, Python {info['python']}), {info['elapsed_s']} s", "",
      "| step | status | exit | seconds |", "|---|---|---|---|"]
md += [f"| {s['name']} | {s['status']} | {s['rc']} | {s['seconds']:.1f} |" for s in steps]
if tests:
    md += ["", f"Tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
           f"{tests['skipped']} skipped."]
    md += [f"- FAILED {t}" for t in tests["failed_tests"]]
md += ["", "Full output: suite.log; benchmark result files: bench_results.tar.gz (when any were written)."]
open(os.path.join(dest, "summary.md"), "w").write("\n".join(md) + "\n")
PYEOF
}

# run_step NAME TIMEOUT_S CMD...: run under min(TIMEOUT_S, what is left of the budget), record the outcome.
run_step() {
  local name="$1" limit="$2"
  shift 2
  local now left rc status t0 t1 ms
  if [ -n "${GPU_SUITE_STEPS:-}" ] && ! grep -qw -- "$name" <<<"$GPU_SUITE_STEPS"; then
    echo "== $name: not selected (GPU_SUITE_STEPS)"
    return 0
  fi
  now=$(date +%s)
  left=$((BUDGET - (now - START) - 15))
  if [ "$left" -lt 20 ]; then
    echo "== $name: SKIPPED (suite budget spent)"
    printf '%s\tskipped\t-1\t0\t%s\n' "$name" "$(tr '\n\t' '  ' <<<"$*")" >>"$STEPS"
    report
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo
  echo "== $name (timeout ${limit}s): $*"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  t1=$(date +%s%N)
  ms=$(((t1 - t0) / 1000000))
  case "$rc" in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "== $name: $status (exit $rc, $((ms / 1000)).$(((ms % 1000) / 100)) s)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$ms" "$(tr '\n\t' '  ' <<<"$*")" >>"$STEPS"
  report
  return 0
}

# A compiler that links libstdc++ statically into the extension (seen with a wrapped g++ that puts its own
# library directory first) gives it a private copy of the C++ runtime: an exception thrown inside it (every
# bad-argument error of every op) then kills the process instead of reaching Python as an error.
extension_so() { find sparsegen_kernels -maxdepth 1 -name '_C*.so' | head -n 1; }

private_cxx_runtime() {  # exit 0 when the built extension defines __cxa_throw itself
  local so
  so="$(extension_so)"
  [ -n "$so" ] && nm -D --defined-only "$so" 2>/dev/null | grep -q ' __cxa_throw$'
}

build_extension() {
  run_step build 300 "$PY" setup.py build_ext --inplace
  if private_cxx_runtime; then
    echo "build: $(extension_so) carries its own copy of libstdc++ (built with CXX=${CXX:-g++}); C++ errors would crash"
    if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ] && [ "${CXX:-}" != /usr/bin/g++ ]; then
      export CC=/usr/bin/gcc CXX=/usr/bin/g++
      rm -rf build/temp.* build/lib.*
      run_step build-system-compiler 300 "$PY" setup.py build_ext --inplace
    fi
  fi
  run_step shared-cxx-runtime 10 bash -c "! nm -D --defined-only $(extension_so) | grep ' __cxa_throw$'"
}

main() {
  echo "# sparsegen GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $ROOT, output $DEST"
  echo
  nvidia-smi || echo "(nvidia-smi failed)"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, torch.cuda.get_device_capability(0) if torch.cuda.is_available() else '')" || true
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
  (nvcc --version 2>/dev/null || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) | tail -n 2 || echo "nvcc: not found"
  git log -1 --format='commit %H %s' 2>/dev/null || true

  if [ "${GPU_SUITE_SKIP_BUILD:-0}" != "1" ]; then
    build_extension
  fi
  run_step kernels-registered 60 "$PY" -c "
import torch, sparsegen_kernels  # noqa: F401
from sparsegen_kernels import backend, ops
missing = [o for o in ops.PROVIDER_OPS if not backend.cuda_available(o)]
print('CUDA C++ providers missing for:', missing or 'none')
raise SystemExit(1 if missing else 0)"

  # With pytest-xdist the tests run in worker processes, so a test that crashes its process is reported
  # as failed and the others still run. Selected: every test marked gpu (the public contract per GPU backend,
  # CUDA-graph capture, both providers' kernels at the model's sizes) and the Triton kernel tests, which run
  # compiled on CUDA tensors here.
  local workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n 8)
  [ -n "${GPU_SUITE_TEST_K:-}" ] && workers+=(-k "$GPU_SUITE_TEST_K")
  # shellcheck disable=SC2086
  run_step gpu-tests 150 "$PY" -m pytest -m gpu "${workers[@]}" ${GPU_SUITE_PYTEST_ARGS:--q} -rfE \
    -p no:cacheprovider --continue-on-collection-errors --junitxml="$DEST/junit-gpu.xml" tests
  # shellcheck disable=SC2086
  run_step triton-kernel-tests 90 "$PY" -m pytest -m triton_kernels "${workers[@]}" ${GPU_SUITE_PYTEST_ARGS:--q} \
    -rfE -p no:cacheprovider --junitxml="$DEST/junit-triton.xml" tests/test_triton_interpret.py

  # Kernel and generator benchmarks: bfloat16 first (both sides), then float32 with TF32 on both sides.
  run_step bench_topk-bfloat16 40 "$PY" benchmarks/bench_topk.py --device cuda --dtype bfloat16
  run_step bench_sparse_conv-bfloat16 80 "$PY" benchmarks/bench_sparse_conv.py --device cuda --dtype bfloat16 \
    --budget 60
  # The generator benchmark's "sparse" provider runs set_backend("auto"): give it this run's measurements.
  run_step backend-table-bfloat16 30 "$PY" benchmarks/backend_table.py
  run_step bench_generator-bfloat16 170 "$PY" benchmarks/bench_generator.py --device cuda --dtype bfloat16 \
    --budget 130 --profile
  run_step bench_topk-float32 25 "$PY" benchmarks/bench_topk.py --device cuda --dtype float32 --tf32 --batch 64
  run_step bench_sparse_conv-float32 40 "$PY" benchmarks/bench_sparse_conv.py --device cuda --dtype float32 \
    --tf32 --batch 64 --budget 30
  run_step bench_generator-float32 60 "$PY" benchmarks/bench_generator.py --device cuda --dtype float32 --tf32 \
    --batch 64 --train-batch 64 --workloads forward langevin --providers dense dense_folded sparse --budget 40

  # The faster provider per op, for sk.set_backend("auto"); committed as sparsegen_kernels/backend_table.json.
  run_step backend-table 30 "$PY" benchmarks/backend_table.py
  cp sparsegen_kernels/backend_table.json "$DEST/backend_table.json" 2>/dev/null || true

  # Result files the benchmarks wrote during this run, as one archive (few files come back from $OUT).
  local new
  new=$(find benchmarks/results -type f -newer "$MARKER" ! -path "$DEST/*" 2>/dev/null)
  if [ -n "$new" ]; then
    # shellcheck disable=SC2086
    tar -czf "$DEST/bench_results.tar.gz" $new && echo "archived: $(echo $new | tr '\n' ' ')"
  fi
  report
  echo
  cat "$DEST/summary.md" 2>/dev/null
}

main 2>&1 | tee "$LOG"
rm -f "$STEPS" "$MARKER"
# Exit status: failure if the build or the tests did not pass (benchmarks are recorded, not fatal).
"$PY" - "$DEST/suite.json" <<'PYEOF'
import json, sys
steps = {s["name"]: s["status"] for s in json.load(open(sys.argv[1]))["steps"]}
bad = [n for n in ("build", "shared-cxx-runtime", "kernels-registered", "gpu-tests", "triton-kernel-tests")
       if steps.get(n, "ok") != "ok"]
sys.exit(1 if bad else 0)
PYEOF
