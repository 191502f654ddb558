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


def test_stride1_conv_benchmark_measures_dense_sparse_and_the_op(tmp_path):
    out = tmp_path / "result.json"
    proc = _bench("bench_sparse_conv2d.py", "--quick", "--threads", "1", "--out", str(out))
    assert "results:" in proc.stdout, proc.stdout + proc.stderr
    run = json.loads(out.read_text())["runs"][-1]
    assert {r["provider"] for r in run["rows"]} == {"dense", "sparse", "op"}
    for r in run["rows"]:
        assert r["ms"] > 0 and 0 < r["measured_density"] <= 1 and r["speedup_vs_dense"] > 0, r


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


def _load(name):
    """A module of benchmarks/ (``common``, ``bench_generator``), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_generator():
    return _load("bench_generator")


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


# ---------------------------------------------------------------------------------------------------
# The benchmark library (benchmarks/common.py)
# ---------------------------------------------------------------------------------------------------
def test_append_run_keeps_earlier_runs_and_puts_the_common_keys_first(tmp_path):
    common = _load("common")
    path = tmp_path / "sub" / "r.json"
    common.append_run(str(path), {"benchmark": "b", "rows": [{"x": 1}], "settings": {"s": 1}, "quick": True,
                                  "environment": {"device": "cpu"}})
    common.append_run(str(path), {"benchmark": "b", "environment": {}, "quick": False, "rows": []})
    runs = json.loads(path.read_text())["runs"]
    assert len(runs) == 2
    assert list(runs[0]) == ["benchmark", "environment", "quick", "rows", "settings"]
    assert runs[0]["rows"] == [{"x": 1}] and runs[1]["quick"] is False
    path.write_text("not json")  # an unreadable file starts over
    common.append_run(str(path), {"benchmark": "b", "environment": {}, "quick": False, "rows": []})
    assert len(json.loads(path.read_text())["runs"]) == 1


def test_save_run_keeps_a_partial_file_until_the_end_and_replot_redraws(tmp_path, capsys):
    common = _load("common")
    stem = str(tmp_path / "gen")
    run = {"benchmark": "generator", "quick": True, "environment": {"device": "cpu"}, "rows": [{"t": 1.0}]}
    table = lambda r: f"| rows | {len(r['rows'])} |"  # noqa: E731
    assert common.save_run(run, stem, False, table) is None
    assert json.loads((tmp_path / "gen.partial.json").read_text()) == run
    assert not (tmp_path / "gen.json").exists()
    run["rows"].append({"t": 2.0})
    path = common.save_run(run, stem, True, table)
    assert path == stem + ".json" and not (tmp_path / "gen.partial.json").exists()
    assert json.loads((tmp_path / "gen.json").read_text())["runs"][-1]["rows"] == run["rows"]
    assert (tmp_path / "gen.md").read_text() == "| rows | 2 |\n"
    (tmp_path / "gen.md").unlink()
    drawn = []
    replayed = common.replot(path, table, lambda r, png: drawn.append(png) or png)
    assert replayed["rows"] == run["rows"] and drawn == [stem + ".png"]
    assert (tmp_path / "gen.md").read_text() == "| rows | 2 |\n"


def test_environment_describes_the_machine_the_versions_and_the_run():
    import torch

    common = _load("common")
    env = common.environment("cpu", "float64", False)
    for key in ("date", "date_utc", "device_name", "cpu_model", "cpu_count", "torch_threads", "torch", "triton",
                "python", "platform", "numpy", "sparsegen_kernels", "git_commit"):
        assert key in env, key
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["dtype"] == "float64" and env["tf32"] is False
    assert env["reference_fallback_ops"] == common.kernel_fallbacks()
    assert "cuda" not in env and "cudnn" not in env  # CUDA and cuDNN versions are recorded on CUDA runs
    assert common.environment(torch.device("cpu"))["device"] == "cpu"
    json.dumps(env)  # goes into the results file as it is


def test_reference_fallbacks_come_from_the_kernel_package(monkeypatch):
    import sparsegen_kernels as sk
    from sparsegen_kernels import _loader

    common = _load("common")
    assert common.kernel_fallbacks() == list(sk.cpu_reference_fallbacks())
    monkeypatch.setattr(sk, "cpu_reference_fallbacks", lambda: ("topk_mask",))
    assert common.kernel_fallbacks() == ["topk_mask"]
    monkeypatch.setattr(_loader, "load_error", lambda: "undefined symbol: xyz")
    assert common.kernel_fallbacks() == ["all (sparsegen_kernels._C not loaded: undefined symbol: xyz)"]
    with pytest.raises(SystemExit, match="undefined symbol: xyz"):
        common.load_ops()


def test_op_results_on_cuda_name_the_fastest_provider(tmp_path, monkeypatch, capsys):
    """The GPU end of a per-op run, without a GPU: the fastest provider per op is recorded with the rows."""
    import argparse

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    common = _load("common")
    rows = [{"name": "c", "provider": p, "op": "mask", "ms": ms} for p, ms in (("triton", 2.0), ("cuda", 1.0))]
    args = argparse.Namespace(device="cuda", out=str(tmp_path / "t.json"), quick=False)
    common.save_op_results("topk", rows, {"device": "cuda"}, args, {"dtype": "bfloat16"})
    run = json.loads((tmp_path / "t.json").read_text())["runs"][0]
    assert run["fastest"] == {"topk_mask": "cuda"} and run["dtype"] == "bfloat16" and run["quick"] is False
    assert "fastest GPU provider per op" in capsys.readouterr().out


def test_round_robin_drops_a_failing_run_only_when_asked():
    common = _load("common")
    calls = []

    def ok():
        calls.append("ok")
        return 1.0

    def bad():
        raise RuntimeError("no")

    failed = []
    times = common.round_robin({"ok": ok, "bad": bad}, 3, on_error=lambda name, exc: failed.append(name))
    assert times == {"ok": [1.0, 1.0, 1.0]} and failed == ["bad"] and len(calls) == 3
    with pytest.raises(RuntimeError):
        common.round_robin({"ok": ok, "bad": bad}, 1)


def test_ratio_helpers():
    common = _load("common")
    t = common.Timing
    assert common.speedups(t(4.0, 2.0), t(1.0, 1.0)) == (4.0, 2.0)
    assert common.speedups(None, t(1.0, 1.0)) == (None, None)
    assert common.speedups(t(1.0, 1.0), None) == (None, None)
    row, base = {"peak_mb": 2.0, "act_mb": 0.0}, {"peak_mb": 6.0, "act_mb": 3.0}
    common.memory_ratios(row, base)
    assert row == {"peak_mb": 2.0, "act_mb": 0.0, "peak_mem_ratio_vs_dense": 3.0}
    rows = [{"a": 1, "b": None}, {"a": 1, "b": 2}]
    assert common.find_row(rows, a=1, b=2) is rows[1] and common.find_row(rows, a=1, b=None) is rows[0]
    assert common.find_row(rows, a=3) is None


def test_environment_of_a_cuda_run_records_the_gpu_and_its_toolkit(monkeypatch):
    """The CUDA branch of the environment, without a GPU (the device queries stubbed)."""
    import torch

    common = _load("common")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    for device in ("cuda", torch.device("cuda")):
        env = common.environment(device, "bfloat16", True)
        assert env["device"] == "cuda" and env["device_name"] == "Fake GPU" and env["device_capability"] == [9, 0]
        assert env["dtype"] == "bfloat16" and env["tf32"] is True
        assert {"cuda", "cudnn", "gpu_backend"} <= set(env) and env["cuda"] == torch.version.cuda
