"""The kernel benchmarks run end to end (--quick, CPU) and write what they measured."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(script, *args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)  # the CPU benchmarks do not use Triton
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=check)


@pytest.mark.parametrize("script,ops", [("bench_topk.py", {"mask", "compact"}),
                                        ("bench_sparse_conv.py", {"fwd", "fwd+fold", "fold", "in_grad", "w_grad",
                                                                  "fwd+bwd"})])
def test_quick_run_writes_rows_for_dense_and_sparse(tmp_path, script, ops):
    out = tmp_path / "result.json"
    proc = _bench(script, "--quick", "--threads", "1", "--out", str(out))
    assert "results:" in proc.stdout, proc.stdout + proc.stderr
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["quick"] is True and run["dtype"] == "float32" and run["tf32"] is False
    assert run["environment"]["device"] == "cpu" and run["environment"]["torch"]
    providers = {r["provider"] for r in run["rows"]}
    assert providers == {"dense", "sparsegen"}
    sparse_ops = {r["op"] for r in run["rows"] if r["provider"] == "sparsegen"}
    assert sparse_ops == ops
    for r in run["rows"]:
        assert r["ms"] is not None and r["ms"] > 0, r
    # every sparse forward is compared with the dense baseline of the same case
    for r in run["rows"]:
        if r["provider"] == "sparsegen" and r["op"] in ("mask", "compact", "fwd", "fwd+fold", "fwd+bwd"):
            assert r["speedup_vs_dense"] is not None and r["speedup_vs_dense"] > 0, r


def test_appends_runs_to_an_existing_file(tmp_path):
    out = tmp_path / "result.json"
    _bench("bench_topk.py", "--quick", "--threads", "1", "--out", str(out))
    _bench("bench_topk.py", "--quick", "--threads", "1", "--out", str(out))
    assert len(json.loads(out.read_text())["runs"]) == 2


def test_half_precision_on_cpu_is_refused_with_a_reason(tmp_path):
    proc = _bench("bench_sparse_conv.py", "--quick", "--dtype", "bfloat16", "--out", str(tmp_path / "r.json"),
                  check=False)
    assert proc.returncode == 2
    assert "CPU kernels take float32 and float64" in proc.stderr
    assert not (tmp_path / "r.json").exists()
