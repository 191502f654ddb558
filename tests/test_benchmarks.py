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
                                        ("bench_sparse_conv.py", {"fwd", "fwd_prefolded", "fold", "in_grad",
                                                                  "w_grad", "in_grad_prefolded", "w_grad_prefolded",
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
        if r["provider"] == "sparsegen" and r["op"] in ("mask", "compact", "fwd", "fwd_prefolded", "fwd+bwd"):
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


def _bench_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generator", os.path.join(ROOT, "benchmarks",
                                                                                  "bench_generator.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_benchmark_runs_every_workload_and_writes_a_profile(tmp_path):
    bench = _bench_generator()
    stem = tmp_path / "generator"
    result = bench.main(["--config", "tiny16", "--batch", "2", "--train-batch", "2", "--repeats", "1",
                         "--langevin-steps", "1", "--providers", "dense", "dense_folded", "sparse", "--no-plot",
                         "--out", str(stem), "--profile"])
    rows = {(r["workload"], r["provider"]): r for r in result["rows"]}
    assert set(rows) == {(w, p) for w in ("forward", "langevin", "train_iter")
                         for p in ("dense", "dense_folded", "sparse")}
    for key, r in rows.items():
        assert r["batch"] == 2 and r.get("median_s", 0) > 0, (key, r)
        assert r["speedup_vs_dense"] > 0 and r["speedup_vs_dense_folded"] > 0, (key, r)
        assert r["speedup_vs_dense_same_mode"] == r["speedup_vs_dense"], (key, r)
    assert rows[("train_iter", "sparse")]["act_mb"] > 0
    run = json.loads((tmp_path / "generator.json").read_text())["runs"][-1]
    assert run["settings"]["dtype"] == "float32" and run["environment"]["dtype"] == "float32"
    assert run["environment"]["device"] == "cpu" and run["environment"]["torch"]
    table = (tmp_path / "generator.md").read_text()
    assert "| vs dense | vs dense_folded | vs dense (same mode) |" in table
    profile = (tmp_path / "generator_profile.md").read_text()
    for p in ("dense", "dense_folded", "sparse"):
        assert f"### {p}:" in profile
        for phase in ("forward", "forward_backward"):
            top = run["profile"]["providers"][p][phase]["top"]
            assert 0 < len(top) <= 25 and all(k["total_us"] > 0 and len(k["name"]) <= 80 for k in top)
    # the folded dense network is the same function: the benchmark's rows compare like with like
    assert "upsample_nearest2d" not in profile.split("### dense_folded:")[1].split("###")[0]


def test_generator_benchmark_refuses_bfloat16_and_graphs_on_a_cpu(capsys):
    bench = _bench_generator()
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--dtype", "bfloat16"])
    assert exc.value.code == 2 and "CPU kernels take float32 and float64" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--providers", "dense", "sparse_graph"])
    assert exc.value.code == 2 and "CUDA graphs need --device cuda" in capsys.readouterr().err


def test_generator_benchmark_gpu_plan():
    """What a GPU run measures, decided without a GPU: graphs on forward and langevin, compiled providers on
    forward only unless asked, ratios against the dense provider run the same way."""
    bench = _bench_generator()
    args = bench.parse_args(["--device", "cuda", "--dtype", "bfloat16"])
    assert args.providers == ["dense", "dense_folded", "dense_compile", "sparse", "dense_graph",
                              "dense_folded_graph", "sparse_graph"]
    plan = {w: [p for p in args.providers if bench.applies(p, w, True, False)] for w in bench.WORKLOADS}
    assert plan["forward"] == args.providers
    assert plan["langevin"] == ["dense", "dense_folded", "sparse", "dense_graph", "dense_folded_graph",
                                "sparse_graph"]
    assert plan["train_iter"] == ["dense", "dense_folded", "sparse"]
    assert bench.applies("dense_compile", "train_iter", True, True)
    assert bench.applies("dense_compile", "train_iter", False, False)  # CPU runs keep it
    rows = [{"workload": "forward", "batch": 64, "provider": p, "median_s": t, "images_per_s": 64 / t}
            for p, t in (("dense", 4.0), ("dense_folded", 2.0), ("sparse", 1.0), ("dense_graph", 2.0),
                         ("sparse_graph", 0.5), ("dense_compile", 4.0), ("sparse_compile", 8.0))]
    bench.ratios(rows)
    r = {x["provider"]: x for x in rows}
    assert r["sparse"]["speedup_vs_dense"] == 4.0 and r["sparse"]["speedup_vs_dense_folded"] == 2.0
    assert r["sparse"]["speedup_vs_dense_same_mode"] == 4.0
    assert r["sparse_graph"]["speedup_vs_dense_same_mode"] == 4.0 and r["sparse_graph"]["speedup_vs_dense"] == 8.0
    assert r["sparse_compile"]["speedup_vs_dense_same_mode"] == 0.5
    table = bench.markdown_table(rows)
    assert "| forward | 64 | sparse_graph | 0.5 | 128.0 | 8.00x | 4.00x | 4.00x | - | - | - | - |" in table
