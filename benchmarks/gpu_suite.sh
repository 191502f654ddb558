#!/usr/bin/env bash
# One command for a GPU machine: build the extension in place, run the GPU tests and the GPU benchmarks.
#
#   bash benchmarks/gpu_suite.sh          (from the repository root; what `make gpu-suite` runs)
#
# Uses the machine's python3 as it is (no pip, no network). Every step runs under a timeout and the whole
# suite under a budget (GPU_SUITE_BUDGET seconds, default 570) so it fits one 10-minute command; a step
# that fails or times out is recorded and the suite goes on. Output goes to $OUT when set, else to
# benchmarks/results/gpu_suite/:
#   suite.log             everything printed (written as it goes, so a killed run still leaves it)
#   suite.json            machine, versions and each step's status, exit code and seconds
#   summary.md            the same as a table, plus the pytest counts
#   junit.xml             the GPU tests' report
#   backend_table.json    the faster provider per op (copy to sparsegen_kernels/ to make it the default)
#   bench_results.tar.gz  result files the benchmarks wrote under benchmarks/results/ during the run
# Environment: GPU_SUITE_BUDGET, GPU_SUITE_PYTEST_ARGS (default "-q"; -n 8 is added when pytest-xdist is installed), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default 16), GPU_SUITE_SKIP_BUILD=1 (reuse an extension already built in place),
# GPU_SUITE_PYTHON (default python3).
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
DEST="${OUT:-$ROOT/benchmarks/results/gpu_suite}"
mkdir -p "$DEST"
LOG="$DEST/suite.log"
STEPS="$(mktemp)"
MARKER="$(mktemp)"  # benchmark result files newer than this were written by this run
START=$(date +%s)
BUDGET="${GPU_SUITE_BUDGET:-570}"
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
junit = os.path.join(dest, "junit.xml")
if os.path.exists(junit):
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
        failed = []
        for s in suites:
            for case in s.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
        tot["failed_tests"] = failed[:50]
        tests = tot
    except ET.ParseError:
        tests = None
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
ops = ['topk_compact', 'topk_mask', 'compact_to_dense', 'compact_gather', 'sparse_conv_transpose2d',
       'sparse_conv_transpose2d_input_grad', 'sparse_conv_transpose2d_weight_grad']
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f'sparsegen::{o}_cuda', 'CUDA')]
print('CUDA kernels missing for:', missing or 'none')
raise SystemExit(1 if missing else 0)"

  # With pytest-xdist the tests run in worker processes, so a test that crashes its process is reported
  # as failed and the others still run.
  local workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n 8)
  # shellcheck disable=SC2086
  run_step gpu-tests 180 "$PY" -m pytest -m gpu "${workers[@]}" ${GPU_SUITE_PYTEST_ARGS:--q} -rfE -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$DEST/junit.xml" tests

  # Kernel benchmarks in float32 (IEEE on both sides: cuDNN's default TF32 is switched off for the dense
  # baseline, as the Triton kernels do not use it either) and in bfloat16 (tensor cores on both sides).
  local script dtype extra left
  for script in bench_topk bench_sparse_conv; do
    for dtype in float32 bfloat16; do
      run_step "$script-$dtype" 150 "$PY" "benchmarks/$script.py" --device cuda --dtype "$dtype"
    done
  done
  # It stops starting new measurements after --budget seconds and keeps what it has.
  left=$((BUDGET - ($(date +%s) - START) - 15))
  [ "$left" -gt 150 ] && left=150
  extra=()
  [ "$left" -gt 60 ] && extra=(--budget $((left - 40)))
  run_step bench_generator 150 "$PY" benchmarks/bench_generator.py --device cuda "${extra[@]}"

  # The faster provider per op, for sk.set_backend("auto"); committed as sparsegen_kernels/backend_table.json.
  run_step backend-table 30 "$PY" benchmarks/backend_table.py --out "$DEST/backend_table.json"

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
bad = [n for n in ("build", "shared-cxx-runtime", "kernels-registered", "gpu-tests") if steps.get(n, "ok") != "ok"]
sys.exit(1 if bad else 0)
PYEOF
