"""Write ``sparsegen_kernels/backend_table.json``: the faster GPU provider per op, as measured.

    python benchmarks/backend_table.py [RESULT.json ...] [--out PATH]

Reads the latest CUDA run of each dtype in each result file (default: ``benchmarks/results/topk_cuda.json`` and
``sparse_conv_cuda.json``, written by ``bench_topk.py`` and ``bench_sparse_conv.py --device cuda``) and
writes one table that ``sk.set_backend("auto")`` consults:

* ``"by_dtype"``: ``{dtype: {"fastest": {op: provider}, "fastest_by_mode": {op: {mode: provider}}}}``, the
  choice for inputs of that dtype (bfloat16 and float32 favour different kernels);
* ``"fastest"`` / ``"fastest_by_mode"``: the defaults for other dtypes, from the bfloat16 runs where there are
  any (the precision generators train in), else float32;
* ``"measured"``: where and when each op was measured.

A choice is the provider with the least total time over the cases every provider ran (of a top-k mode, for
``fastest_by_mode``: the FC layer's ``channel`` groups and the convolutions' ``spatial`` groups favour
different kernels). Nothing is written when no file holds a measurement, so a table is never made up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUTS = [os.path.join(ROOT, "benchmarks", "results", f"{n}_cuda.json") for n in ("topk", "sparse_conv")]
DEFAULT_OUT = os.path.join(ROOT, "sparsegen_kernels", "backend_table.json")


def latest_measurement(path: str, dtype: str = "float32") -> dict | None:
    """The newest non-quick run in ``dtype`` of a result file that names a fastest provider, or None."""
    with open(path) as f:
        runs = json.load(f).get("runs", [])
    for run in reversed(runs):
        if run.get("fastest") and not run.get("quick") and run.get("dtype", "float32") == dtype:
            return run
    return None


DTYPES = ("bfloat16", "float32", "float16")
# Benchmark row "op" -> library op, per result file kind, for runs that do not record their own mapping
# (``run["row_ops"]``; the sparse-conv runs before the upsample-conv ops timed the transposed-conv ops as
# "fwd", "in_grad" and "w_grad").
ROW_OPS = {"topk": {"mask": "topk_mask", "compact": "topk_compact"},
           "sparse_conv": {"fwd": "sparse_conv_transpose2d", "in_grad": "sparse_conv_transpose2d_input_grad",
                           "w_grad": "sparse_conv_transpose2d_weight_grad"}}
PROVIDERS = ("triton", "cuda")


def _fastest(benchmark: str, rows: list[dict], by_mode: bool, row_ops: dict | None = None) -> dict:
    """``{op: {mode or None: provider}}``: the provider with the least total time over the cases (of a mode).

    Only cases that every provider ran count, so the totals compare like with like. ``row_ops`` maps the
    rows' "op" to library ops (default: :data:`ROW_OPS` of the benchmark).
    """
    row_ops = row_ops or ROW_OPS.get(benchmark, {})
    times: dict = {}  # (op, mode, case) -> {provider: ms}
    for row in rows:
        op = row_ops.get(row.get("op"))
        if op is None or row.get("provider") not in PROVIDERS or row.get("ms") is None:
            continue
        mode = row.get("mode") if by_mode else None
        times.setdefault((op, mode, row.get("name")), {})[row["provider"]] = row["ms"]
    totals: dict = {}
    for (op, mode, _), per_provider in times.items():
        if len(per_provider) == len(PROVIDERS):
            acc = totals.setdefault(op, {}).setdefault(mode, dict.fromkeys(PROVIDERS, 0.0))
            for provider, ms in per_provider.items():
                acc[provider] += ms
    return {op: {mode: min(acc, key=acc.get) for mode, acc in modes.items()} for op, modes in totals.items()}


def fastest_providers(benchmark: str, rows: list[dict], row_ops: dict | None = None) -> dict:
    """``{op: "triton" | "cuda"}`` over all cases of a benchmark run's rows (what the benchmarks record)."""
    return {op: modes[None] for op, modes in _fastest(benchmark, rows, False, row_ops).items()}


def fastest_by_mode(run: dict) -> dict:
    """``{op: {mode: "triton" | "cuda"}}`` over the cases of each top-k mode of a result run."""
    return _fastest(run.get("benchmark"), run.get("rows", []), True, run.get("row_ops"))


def build_table(paths: list[str]) -> dict:
    """The table (see the module docstring) from result files."""
    by_dtype, measured = {}, {}
    for dtype in DTYPES:
        fastest, by_mode = {}, {}
        for path in paths:
            if not os.path.exists(path):
                continue
            run = latest_measurement(path, dtype)
            if run is None:
                continue
            env = run.get("environment", {})
            by_mode.update(fastest_by_mode(run))
            for op, provider in run["fastest"].items():
                fastest[op] = provider
                measured.setdefault(op, {})[dtype] = {
                    "device": env.get("device_name") or env.get("device"), "date": env.get("date"),
                    "torch": env.get("torch"), "triton": env.get("triton"), "source": os.path.relpath(path, ROOT)}
        if fastest:
            by_dtype[dtype] = {"fastest": fastest, "fastest_by_mode": by_mode}
    default = next((by_dtype[d] for d in DTYPES if d in by_dtype), {"fastest": {}, "fastest_by_mode": {}})
    return {"fastest": dict(default["fastest"]), "fastest_by_mode": dict(default["fastest_by_mode"]),
            "by_dtype": by_dtype, "measured": measured,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", default=DEFAULT_INPUTS, help="benchmark result files (CUDA runs)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"table to write (default: {os.path.relpath(DEFAULT_OUT, ROOT)})")
    args = p.parse_args(argv)
    table = build_table(args.inputs)
    if not table["fastest"]:
        print("backend table: no CUDA measurement in " + ", ".join(args.inputs) + "; nothing written", file=sys.stderr)
        return 1
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"backend table: {table['fastest']}, by mode {table['fastest_by_mode']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
