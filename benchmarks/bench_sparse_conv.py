"""Sparse upsample-conv (nearest x2 + 3x3 conv on a top-k input) vs F.interpolate + F.conv2d.

The CVPR generator's layers (Table 1): 512->256 at 8x8->16x16, 256->128 at 16->32 and 128->64 at 32->64 after
a spatial top-k with k = H*W/4, and the FC layer's channel top-8 of 3200 at 4x4 -> 512 at 8x8; on the CPU
also a density sweep of the 512->256 layer (k / (H*W) from 1.6% to 100%). Batch 16 on the CPU, 64 and 256
on a GPU (``--batch``). Rows per case and provider:

* ``fwd``       ``sparse_upsample_conv2d`` on the 3x3 weight: the per-call cost when the weight changes at
  every call (training), any fold of the weight included;
* ``fwd_prefolded``  ``sparse_conv_transpose2d`` with a weight folded once beforehand (inference, Langevin);
* ``fold``      the fold alone (CPU);
* ``in_grad``, ``w_grad``  the two backward ops of the upsample-conv (3x3 weight);
* ``in_grad_prefolded``, ``w_grad_prefolded``  those of the transposed conv on the folded weight;
* ``fwd+bwd``   forward + backward through the public autograd API (``sparse_upsample_conv2d`` on a
  ``SparseActivation``), against autograd of the dense baseline.

Baselines: ``dense`` = ``F.interpolate`` + ``F.conv2d`` (``reference.sparse_upsample_conv2d_ref``); on a GPU
also ``dense_folded`` = cuDNN's ``conv_transpose2d`` on the folded weight and the decompressed (dense) input,
the best dense formulation (2.25x fewer MACs). Its MAC rate is the yardstick for the sparse kernels'
per-MAC throughput: ``folded_tmac_s`` (folded MACs / time) is reported for every row, so the two compare
directly. Ratios are of medians; rows also keep the fastest repeat (``ms_min``).

    python benchmarks/bench_sparse_conv.py [--device cpu|cuda] [--dtype ...] [--batch N ...] [--quick] [--out FILE]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from common import (Budget, default_batches, environment, fmt_ms, fmt_ratio, load_ops, parse_args, precision_note,
                    providers, save_op_results, speedups, time_provider, warn_fallbacks)


@dataclass(frozen=True)
class ConvCase:
    """Input [N, Cin, H, W] top-k sparsified (k per group of ``mode``) -> up x2 + 3x3 conv -> [N, Cout, 2H, 2W]."""

    name: str
    Cin: int
    Cout: int
    H: int
    W: int
    k: int
    mode: str
    sweep: bool = False  # density-sweep row (forward only)

    def group_size(self) -> int:
        return {"spatial": self.H * self.W, "channel": self.Cin, "global": self.Cin * self.H * self.W}[self.mode]


CASES = (
    ConvCase("512->256 @8->16, spatial k=16 (25%)", 512, 256, 8, 8, 16, "spatial"),
    ConvCase("256->128 @16->32, spatial k=64 (25%)", 256, 128, 16, 16, 64, "spatial"),
    ConvCase("128->64 @32->64, spatial k=256 (25%)", 128, 64, 32, 32, 256, "spatial"),
    ConvCase("FC 3200->512 @4->8, channel top-8 (0.25%)", 3200, 512, 4, 4, 8, "channel"),
) + tuple(
    ConvCase(f"512->256 @8->16, spatial k={k} ({100 * k / 64:.1f}%)", 512, 256, 8, 8, k, "spatial", sweep=True)
    for k in (1, 3, 8, 32, 64)  # with k=16 above: densities 1.6, 4.7, 12.5, 25, 50, 100 %
)
# Benchmark row "op" -> the library op it times (read by backend_table.py).
ROW_OPS = {"fwd": "sparse_upsample_conv2d", "in_grad": "sparse_upsample_conv2d_input_grad",
           "w_grad": "sparse_upsample_conv2d_weight_grad", "fwd_prefolded": "sparse_conv_transpose2d",
           "in_grad_prefolded": "sparse_conv_transpose2d_input_grad",
           "w_grad_prefolded": "sparse_conv_transpose2d_weight_grad"}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], dtypes=True, batches=True, budget=True)
    dtype = args.torch_dtype
    device = args.device
    gpu = device == "cuda"
    ops = load_ops()
    import sparsegen_kernels as sk
    from sparsegen_kernels import geometry
    from sparsegen_kernels import reference as R

    batches = default_batches(args)
    cases = [c for c in CASES if not ((args.quick or gpu) and c.sweep)]
    names = providers(device)
    if gpu:
        names.insert(1, "dense_folded")
    env = environment(device, args.dtype, args.tf32)
    budget = Budget(args.budget)
    print(f"sparse upsample-conv on {env['device_name']} ({env['torch_threads']} threads), torch {env['torch']}, "
          f"batch {batches}, {args.dtype}{' (TF32 allowed)' if args.tf32 and args.dtype == 'float32' else ''}")
    warn_fallbacks(env, "the sparsegen provider runs")
    print(f"{'case':44s} {'N':>4s} {'provider':12s} {'op':17s} {'ms':>9s} {'vs dense':>8s} {'vs folded':>9s} "
          f"{'TMAC/s*':>8s}")
    rows = []
    torch.manual_seed(0)
    for N in batches:
        dense_ms = {}  # (Cin, Cout, H) -> {op: Timing}: the dense baselines do not depend on k
        for case in cases:
            if budget.spent():
                print(f"  (budget spent: {case.name} at batch {N} and later cases skipped)")
                rows.append(dict(asdict(case), N=N, skipped="budget"))
                continue
            shape = [N, case.Cin, case.H, case.W]
            x = torch.randn(shape, device=device).to(dtype)
            w3 = (torch.randn(case.Cout, case.Cin, 3, 3, device=device) / (3 * case.Cin ** 0.5)).to(dtype)
            b = torch.randn(case.Cout, device=device).to(dtype)
            sa = sk.topk_compact(x, case.k, case.mode, None, True)
            v, i = sa.values.contiguous(), sa.indices
            dense_x = ops.compact_to_dense(v, i, case.mode, shape)
            w4 = geometry.fold_upsample_weight(w3)
            out = ops.sparse_upsample_conv2d(v, i, case.mode, shape, w3, b)
            go = torch.randn_like(out)
            nnz = int((v != 0).sum())
            sparse_macs = nnz * 16 * case.Cout
            dense_macs = N * case.Cout * case.Cin * 9 * 4 * case.H * case.W
            folded_macs = dense_macs * 4 // 9  # the same convolution on the folded 4x4 weight (2.25x fewer)
            key = (case.Cin, case.Cout, case.H)

            def dense_fwdbwd():
                d = dense_x.detach().requires_grad_()
                w = w3.detach().requires_grad_()
                bb = b.detach().requires_grad_()
                R.sparse_upsample_conv2d_ref(d, w, bb).backward(go)

            def folded_fwdbwd():
                d = dense_x.detach().requires_grad_()
                w = w3.detach().requires_grad_()
                bb = b.detach().requires_grad_()
                torch.nn.functional.conv_transpose2d(d, geometry.fold_upsample_weight(w), bb, 2, 1).backward(go)

            def sparse_fwdbwd():
                vv = v.detach().requires_grad_()
                w = w3.detach().requires_grad_()
                bb = b.detach().requires_grad_()
                s = sk.SparseActivation(vv, i, tuple(shape), case.mode)
                sk.sparse_upsample_conv2d(s, w, bb).backward(go)

            for prov in names:
                if prov == "dense":
                    variants = [("fwd", lambda: R.sparse_upsample_conv2d_ref(dense_x, w3, b), dense_macs)]
                    if not case.sweep:
                        variants.append(("fwd+bwd", dense_fwdbwd, 3 * dense_macs))
                elif prov == "dense_folded":
                    variants = [("fwd", lambda: torch.nn.functional.conv_transpose2d(dense_x, w4, b, 2, 1), folded_macs),
                                ("fwd+bwd", folded_fwdbwd, 3 * folded_macs)]
                else:
                    variants = [
                        ("fwd", lambda: ops.sparse_upsample_conv2d(v, i, case.mode, shape, w3, b), sparse_macs),
                        ("fwd_prefolded", lambda: ops.sparse_conv_transpose2d(v, i, case.mode, shape, w4, b, [2, 2],
                                                                              [1, 1], [0, 0]), sparse_macs),
                    ]
                    if not case.sweep:
                        if not gpu:
                            variants.append(("fold", lambda: geometry.fold_upsample_weight(w3), None))
                        variants += [
                            ("in_grad", lambda: ops.sparse_upsample_conv2d_input_grad(go, i, case.mode, shape, w3),
                             sparse_macs),
                            ("w_grad", lambda: ops.sparse_upsample_conv2d_weight_grad(go, v, i, case.mode, shape),
                             sparse_macs),
                            ("in_grad_prefolded", lambda: ops.sparse_conv_transpose2d_input_grad(
                                go, i, case.mode, shape, w4, [2, 2], [1, 1]), sparse_macs),
                            ("w_grad_prefolded", lambda: ops.sparse_conv_transpose2d_weight_grad(
                                go, v, i, case.mode, shape, list(w4.shape), [2, 2], [1, 1]), sparse_macs),
                            ("fwd+bwd", sparse_fwdbwd, 3 * sparse_macs),
                        ]
                for op, fn, macs in variants:
                    if prov in ("dense", "dense_folded") and op in dense_ms.get((key, prov), {}):
                        tm = dense_ms[(key, prov)][op]  # measured for an earlier case with the same layer
                    else:
                        tm = time_provider(prov, fn, device, args.quick)
                        if prov in ("dense", "dense_folded"):
                            dense_ms.setdefault((key, prov), {})[op] = tm
                    t = None if tm is None else tm.median
                    base_op = "fwd+bwd" if op == "fwd+bwd" else "fwd"
                    base_tm = dense_ms.get((key, "dense"), {}).get(base_op)
                    folded_tm = dense_ms.get((key, "dense_folded"), {}).get(base_op)
                    compared = op in ("fwd", "fwd_prefolded", "fwd+bwd") and prov != "dense"
                    r, r_min = speedups(base_tm, tm) if compared else (None, None)
                    r_folded = speedups(folded_tm, tm)[0] if compared and prov != "dense_folded" else None
                    gmacs = None if t is None or macs is None else macs / t / 1e9
                    # Folded-equivalent rate: the folded dense MACs of the same work over the time (fwd+bwd: 3x).
                    fmacs = None
                    if t is not None and macs is not None and prov != "dense":
                        fmacs = (3 if op == "fwd+bwd" else 1) * folded_macs / t / 1e12
                    print(f"{case.name:44s} {N:4d} {prov:12s} {op:17s} {fmt_ms(t)} {fmt_ratio(r)} "
                          f"{fmt_ratio(r_folded):>9s} {'' if fmacs is None else f'{fmacs:8.2f}'}")
                    rows.append(dict(asdict(case), N=N, in_shape=shape, out_shape=list(out.shape),
                                     density=case.k / case.group_size(), nnz=nnz, provider=prov, op=op,
                                     ms=None if t is None else t * 1e3, ms_min=None if tm is None else tm.min * 1e3,
                                     speedup_vs_dense=r, speedup_vs_dense_min=r_min,
                                     speedup_vs_dense_folded=r_folded, gmac_per_s=gmacs, folded_tmac_per_s=fmacs,
                                     prefolded=op.endswith("_prefolded") or (prov == "dense_folded" and op == "fwd")))
    extra = {**precision_note(args), "batches": batches, "row_ops": ROW_OPS,
             "notes": "fwd runs the upsample-conv op on the 3x3 weight (fold included where the kernel folds); "
                      "fwd_prefolded the transposed conv with a weight folded once; fwd+bwd goes through the "
                      "autograd API. TMAC/s* = folded-equivalent MACs (2.25x fewer than upsample+3x3) per second."}
    save_op_results("sparse_conv", rows, env, args, extra, ROW_OPS)


if __name__ == "__main__":
    main()
