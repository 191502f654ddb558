"""The measured provider table behind ``set_backend("auto")`` and the script that writes it."""
import importlib.util
import json
import os

import pytest

import sparsegen_kernels as sk
from sparsegen_kernels import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = set(sk.ops.OP_NAMES)


def _load_script():
    spec = importlib.util.spec_from_file_location("backend_table_script",
                                                  os.path.join(ROOT, "benchmarks", "backend_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result_file(path, runs):
    with open(path, "w") as f:
        json.dump({"runs": runs}, f)
    return str(path)


def _run(fastest, quick=False, date="2026-01-01T00:00:00"):
    return {"environment": {"device_name": "Some GPU", "date": date, "torch": "2.x"}, "quick": quick,
            "rows": [], "fastest": fastest}


def test_committed_table_names_real_ops_and_providers():
    with open(backend._TABLE_PATH) as f:
        table = json.load(f)
    assert table["fastest"], "the committed table is empty"
    for op, provider in table["fastest"].items():
        assert op in OPS, op
        assert provider in ("cuda", "triton"), provider
    for dtype, sub in table["by_dtype"].items():
        for op, provider in sub["fastest"].items():
            assert op in OPS and provider in ("cuda", "triton"), (dtype, op, provider)
            measured = table["measured"][op][dtype]
            assert measured["device"] and measured["date"], measured
    assert backend.measured_table() == table["fastest"]


def test_script_takes_latest_full_run_and_skips_quick(tmp_path):
    script = _load_script()
    topk = _result_file(tmp_path / "topk_cuda.json", [
        _run({"topk_mask": "triton", "topk_compact": "triton"}, date="2026-01-01T00:00:00"),
        _run({"topk_mask": "cuda", "topk_compact": "triton"}, date="2026-02-01T00:00:00"),
        _run({"topk_mask": "triton", "topk_compact": "cuda"}, quick=True, date="2026-03-01T00:00:00"),
    ])
    conv = _result_file(tmp_path / "sparse_conv_cuda.json", [_run({"sparse_conv_transpose2d": "triton"})])
    out = tmp_path / "table.json"
    assert script.main([topk, conv, "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["fastest"] == {"topk_mask": "cuda", "topk_compact": "triton", "sparse_conv_transpose2d": "triton"}
    assert table["measured"]["topk_mask"]["float32"]["date"] == "2026-02-01T00:00:00"
    assert table["measured"]["topk_mask"]["float32"]["device"] == "Some GPU"
    assert table["by_dtype"]["float32"]["fastest"] == table["fastest"]


def test_script_keeps_a_table_per_dtype_and_defaults_to_bfloat16(tmp_path):
    script = _load_script()
    bf16 = _run({"topk_mask": "triton"}, date="2026-01-01T00:00:00")
    bf16["dtype"] = "bfloat16"
    topk = _result_file(tmp_path / "topk_cuda.json", [bf16, _run({"topk_mask": "cuda"}, date="2026-01-02T00:00:00")])
    out = tmp_path / "table.json"
    assert script.main([topk, "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["by_dtype"]["bfloat16"]["fastest"] == {"topk_mask": "triton"}
    assert table["by_dtype"]["float32"]["fastest"] == {"topk_mask": "cuda"}
    assert table["fastest"] == {"topk_mask": "triton"}
    assert set(table["measured"]["topk_mask"]) == {"bfloat16", "float32"}


def test_runs_map_their_rows_to_ops_themselves(tmp_path):
    script = _load_script()
    run = _run({"sparse_upsample_conv2d": "cuda"})
    run["benchmark"] = "sparse_conv"
    run["row_ops"] = {"fwd": "sparse_upsample_conv2d"}
    run["rows"] = [{"name": "a", "mode": "spatial", "provider": p, "op": "fwd", "ms": ms}
                   for p, ms in (("triton", 2.0), ("cuda", 1.0))]
    out = tmp_path / "table.json"
    assert script.main([_result_file(tmp_path / "sparse_conv_cuda.json", [run]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["fastest_by_mode"] == {"sparse_upsample_conv2d": {"spatial": "cuda"}}


def test_script_splits_choice_by_mode(tmp_path):
    script = _load_script()

    def row(name, mode, provider, op, ms):
        return {"name": name, "mode": mode, "provider": provider, "op": op, "ms": ms}

    run = _run({"sparse_conv_transpose2d_input_grad": "triton"})
    run["benchmark"] = "sparse_conv"
    run["rows"] = [row("a", "spatial", "triton", "in_grad", 1.0), row("a", "spatial", "cuda", "in_grad", 2.0),
                   row("b", "spatial", "triton", "in_grad", 1.5), row("b", "spatial", "cuda", "in_grad", 1.0),
                   row("fc", "channel", "triton", "in_grad", 0.2), row("fc", "channel", "cuda", "in_grad", 0.1),
                   row("only-triton", "global", "triton", "in_grad", 0.1),  # no cuda time: not compared
                   row("a", "spatial", "dense", "fwd", 0.1)]  # baselines are not providers
    conv = _result_file(tmp_path / "sparse_conv_cuda.json", [run])
    out = tmp_path / "table.json"
    assert script.main([conv, "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["fastest_by_mode"] == {"sparse_conv_transpose2d_input_grad": {"spatial": "triton",
                                                                               "channel": "cuda"}}


def test_script_writes_nothing_without_a_measurement(tmp_path, capsys):
    script = _load_script()
    only_quick = _result_file(tmp_path / "topk_cuda.json", [_run({"topk_mask": "cuda"}, quick=True)])
    out = tmp_path / "table.json"
    assert script.main([only_quick, str(tmp_path / "missing.json"), "--out", str(out)]) == 1
    assert not out.exists()
    assert "nothing written" in capsys.readouterr().err


@pytest.fixture
def auto_backend(monkeypatch):
    monkeypatch.setattr(backend, "_backend", None)
    monkeypatch.delenv("SPARSEGEN_BACKEND", raising=False)
    backend._preferred.cache_clear()
    yield
    backend._backend = None
    backend._preferred.cache_clear()


def _use_table(monkeypatch, table):
    monkeypatch.setattr(backend, "_table_file", lambda: table)
    backend._preferred.cache_clear()


def test_auto_follows_the_table_when_both_providers_exist(monkeypatch, auto_backend):
    _use_table(monkeypatch, {"fastest": {"topk_mask": "triton", "topk_compact": "cuda"},
                             "fastest_by_mode": {"topk_compact": {"channel": "triton"}}})
    monkeypatch.setattr(backend, "cuda_available", lambda op: True)
    monkeypatch.setattr(backend, "triton_available", lambda op: True)
    assert backend.provider_name("topk_mask") == "triton"
    assert backend.provider_name("topk_mask", "channel") == "triton"
    assert backend.provider_name("topk_compact") == "cuda"
    assert backend.provider_name("topk_compact", "spatial") == "cuda"  # no entry for the mode: the op's
    assert backend.provider_name("topk_compact", "channel") == "triton"  # the mode's own entry wins
    assert backend.provider_name("compact_gather") == "cuda"  # not in the table: CUDA C++ first


def test_auto_falls_back_when_the_preferred_provider_is_missing(monkeypatch, auto_backend):
    _use_table(monkeypatch, {"fastest": {"topk_mask": "cuda"}})
    monkeypatch.setattr(backend, "cuda_available", lambda op: False)
    monkeypatch.setattr(backend, "triton_available", lambda op: True)
    assert backend.provider_name("topk_mask") == "triton"
    monkeypatch.setattr(backend, "triton_available", lambda op: False)
    assert backend.provider_name("topk_mask") == "reference"


def test_forced_backend_that_is_missing_names_the_problem(monkeypatch, auto_backend):
    monkeypatch.setattr(backend, "cuda_available", lambda op: False)
    sk.set_backend("cuda")
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        backend.provider_name("topk_mask")


def test_auto_prefers_the_table_of_the_inputs_dtype(monkeypatch, auto_backend):
    _use_table(monkeypatch, {"fastest": {"topk_mask": "cuda"},
                             "by_dtype": {"bfloat16": {"fastest": {"topk_mask": "triton"},
                                                       "fastest_by_mode": {"topk_mask": {"channel": "cuda"}}}}})
    monkeypatch.setattr(backend, "cuda_available", lambda op: True)
    monkeypatch.setattr(backend, "triton_available", lambda op: True)
    import torch

    assert backend.provider_name("topk_mask", "spatial", torch.bfloat16) == "triton"
    assert backend.provider_name("topk_mask", "channel", torch.bfloat16) == "cuda"
    assert backend.provider_name("topk_mask", "spatial", torch.float32) == "cuda"  # no float32 table: default


def test_dispatcher_passes_each_ops_mode_and_dtype(monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(backend, "provider_name",
                        lambda op, mode=None, dtype=None: seen.append((op, mode, dtype)) or "reference")
    x = torch.zeros(1, dtype=torch.bfloat16)
    calls = {"topk_mask": (x, 2, "channel", None, True),
             "compact_gather": (x, "indices", "global"),
             "sparse_conv_transpose2d_weight_grad": (x, "v", "i", "spatial", [1], [1], [2], [1]),
             "sparse_upsample_conv2d_weight_grad": (x, "v", "i", "channel", [1])}
    for op, args in calls.items():
        kernel = backend.cuda_dispatcher(op, lambda *a: "ran the reference")
        assert kernel(*args) == "ran the reference"
    assert seen == [("topk_mask", "channel", torch.bfloat16), ("compact_gather", "global", torch.bfloat16),
                    ("sparse_conv_transpose2d_weight_grad", "spatial", torch.bfloat16),
                    ("sparse_upsample_conv2d_weight_grad", "channel", torch.bfloat16)]
