"""The read-out end to end on two tiny trained runs: pictures, report HTML, command line."""
import argparse
import json
import os
import re

import pytest
import torch

from sparsegen import SparseGenerator
from sparsegen.cli import main
from sparsegen.cli.readout import add_subcommands
from sparsegen.model.configs import RunConfig, TrainConfig
from sparsegen.readout.basis import FixedParse
from sparsegen.readout.html import embed_image
from sparsegen.readout.render import render_andor_tree, render_dictionary, render_side_by_side, to_display
from sparsegen.readout.report import build_report
from sparsegen.readout.runs import find_runs, heldout_spec
from sparsegen.train.trainer import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sparse tiny16 run and its dense twin, 1 iteration each, in one folder (sparse/, dense/)."""
    root = tmp_path_factory.mktemp("runs")
    for kind in ("sparse", "dense"):
        cfg = RunConfig(model="tiny16", sparse=kind == "sparse", data="parts:n=16,seed=0",
                        train=TrainConfig(iters=1, batch_size=8, langevin_steps=1, log_every=1, sample_every=1,
                                          ckpt_every=1, eval_examples=8))
        Trainer(cfg, run_dir=str(root / kind), log=lambda s: None).train(progress=False)
    return root


def test_find_runs(runs, tmp_path):
    s, d = find_runs(str(runs))
    assert s.endswith("sparse") and d.endswith("dense")
    s2, d2 = find_runs(str(runs / "sparse"))
    assert os.path.samefile(d2, d)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        find_runs(str(tmp_path))
    assert heldout_spec("parts:n=1024,seed=0", 8) == ("parts:n=8,seed=7919", True)
    assert heldout_spec("faces", 8) == ("faces", False)


def test_pictures_are_written(tmp_path):
    torch.manual_seed(0)
    g = SparseGenerator("tiny16").eval()
    fp = FixedParse(g, torch.randn(2, g.z_dim))
    res = render_andor_tree(fp, str(tmp_path / "tree.png"), n=1, width=4)
    assert os.path.getsize(res["path"]) > 5000
    assert [lev["layer"] for lev in res["levels"]][0] == "fc"
    assert all(lev["rows"].numel() <= 4 for lev in res["levels"])
    items = torch.randn(5, 3, 6, 6)
    p = render_dictionary(items, str(tmp_path / "d.png"), title="t", labels=list("abcde"), ncol=3)
    q = render_side_by_side(items, items[:3], str(tmp_path / "s.png"), "left", "right", ncol=4)
    for f in (p, q):
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    d = to_display(torch.tensor([[[-2.0, 0.0], [2.0, 1.0]]]), "symmetric")
    assert d.shape == (2, 2, 3) and d[0, 1, 0] == 0.5 and d[1, 0, 0] == 1.0


def test_embed_image_is_a_data_uri(tmp_path):
    p = render_dictionary(torch.randn(2, 3, 4, 4), str(tmp_path / "x.png"))
    tag = embed_image(p, "x")
    assert tag.startswith('<img src="data:image/png;base64,')
    with pytest.raises(ValueError, match="cannot embed"):
        embed_image(str(tmp_path / "x.txt"))


def test_report_is_one_self_contained_page(runs, tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    render_dictionary(torch.randn(2, 3, 4, 4), str(bench / "speedup.png"))
    (bench / "summary.md").write_text("| op | speed-up |\n|---|---|\n| topk | 12x |\n")
    out = build_report(str(runs), out=str(tmp_path / "report.html"), n_eval=4, steps=2, bench_dir=str(bench),
                       eval_options={"n_templates_latents": 2, "per_image": 2, "n_match": 4, "purity_images": 2,
                                     "purity_units": 2},
                       andor_options={"n_images": 2, "trees": 1, "dict_latents": 2, "max_channels": 4},
                       log=lambda s: None)
    text = open(out).read()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) >= 10 and all(s.startswith("data:image/") for s in srcs)  # nothing outside the page
    assert "http://" not in text and "https://" not in text
    for needle in ("Metrics", "AND-OR tree", "Dictionaries", "Reconstruction MSE per pixel, held-out",
                   "Template-matching score", "Part purity", "speed-up", "sparse vs dense"):
        assert needle.lower() in text.lower(), needle
    ev = json.load(open(tmp_path / "report_files" / "eval.json"))
    kinds = [r["kind"] for r in ev["results"]]
    assert kinds == ["sparse", "dense"]
    for r in ev["results"]:
        assert 0 <= r["recon_mse_heldout"] <= 4 and -1 <= r["ncc"] <= 1 and 0 <= r["part_purity"] <= 1
    parse = json.load(open(tmp_path / "report_files" / "andor_sparse" / "parse.json"))
    assert parse["format"] == "sparsegen.andor/1" and len(parse["images"]) == 2


def test_command_line(runs, tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="sparsegen")
    sub = parser.add_subparsers(dest="command")
    handlers = add_subcommands(sub)
    assert set(handlers) == {"andor", "eval", "report"}
    args = parser.parse_args(["report", "--run", "x", "--fid-samples", "10", "--steps", "5"])
    assert args.fid_samples == 10 and args.steps == 5 and args.dense_run is None

    assert main(["andor", "--run", str(runs), "--n", "1", "--trees", "1", "--dict-latents", "2",
                 "--max-channels", "3", "--out", str(tmp_path / "a")]) == 0
    assert os.path.isfile(tmp_path / "a" / "parse.json") and os.path.isfile(tmp_path / "a" / "tree_0.png")
    assert "parse graphs of 1 samples" in capsys.readouterr().out

    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    monkeypatch.setenv("SPARSEGEN_INCEPTION", str(tmp_path / "missing.pt"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert main(["eval", "--run", str(runs), "--fid-samples", "4"]) == 2
    assert "no Inception weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--run", str(runs), "--steps", "0"])
