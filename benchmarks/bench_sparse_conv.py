"""Sparse upsample-conv (nearest x2 + 3x3 conv on a top-k input) vs F.interpolate + F.conv2d.

The CVPR generator's layers (Table 1), batch 16 on the CPU and 64 on a GPU: 512->256 at 8x8->16x16,
256->128 at 16->32 and 128->64 at 32->64 after a spatial top-k with k = H*W/4, and the FC layer's channel
top-8 of 3200 at 4x4 -> 512 at 8x8; plus a density sweep of the 512->256 layer (k / (H*W) from 1.6% to
100%). The sparse op is the stride-2 transposed conv with the folded 4x4 weight
(``reference.fold_upsample_weight``). Rows per case and provider:

* ``fwd+fold``  ``fold_upsample_weight(w3)`` then ``sparse_conv_transpose2d``: the per-call cost when the
  weight is folded at every call (what ``sparse_upsample_conv2d`` does);
* ``fwd``       ``sparse_conv_transpose2d`` with a weight folded once beforehand (prefolded);
* ``fold``      the fold alone;
* ``in_grad``, ``w_grad``  the two backward kernels (prefolded weight);
* ``fwd+bwd``   forward + backward through the public autograd API (``sparse_upsample_conv2d`` on a
  ``SparseActivation``: fold, conv and their gradients), against autograd of the dense baseline.

Ratios are of medians; the result rows also keep the fastest repeat (``ms_min``) and its ratio, which
on a shared machine are less disturbed by other work.

``dense`` = ``reference.sparse_upsample_conv2d_ref`` (``F.interpolate`` + ``F.conv2d``, oneDNN on the CPU).

    python benchmarks/bench_sparse_conv.py [--device cpu|cuda] [--quick] [--out FILE]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from backend_table import fastest_providers
from common import (environment, fmt_ms, fmt_ratio, load_ops, parse_args, precision_note, providers, ratio, try_time,
                    use_provider, write_results)


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


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], dtypes=True)
    dtype = args.torch_dtype
    device = args.device
    ops = load_ops()
    import sparsegen_kernels as sk
    from sparsegen_kernels import reference as R

    N = 2 if args.quick else (64 if device == "cuda" else 16)
    cases = [c for c in CASES if not (args.quick and c.sweep)]
    names = providers(device)
    env = environment(device)
    print(f"sparse upsample-conv on {env['device_name']} ({env['torch_threads']} threads), torch {env['torch']}, "
          f"batch {N}, {args.dtype}{' (TF32 allowed)' if args.tf32 and args.dtype == 'float32' else ''}")
    print(f"{'case':44s} {'provider':10s} {'op':9s} {'ms':>9s} {'vs dense':>8s} {'GMAC/s':>7s}")
    rows = []
    dense_ms = {}  # (Cin, Cout, H) -> {op: Timing}: the dense baseline does not depend on k
    torch.manual_seed(0)
    for case in cases:
        shape = [N, case.Cin, case.H, case.W]
        x = torch.randn(shape, device=device).to(dtype)
        w3 = (torch.randn(case.Cout, case.Cin, 3, 3, device=device) / (3 * case.Cin ** 0.5)).to(dtype)
        b = torch.randn(case.Cout, device=device).to(dtype)
        sa = sk.topk_compact(x, case.k, case.mode, None, True)
        v, i = sa.values.contiguous(), sa.indices
        dense_x = ops.compact_to_dense(v, i, case.mode, shape)
        w4 = R.fold_upsample_weight(w3)
        out = ops.sparse_conv_transpose2d(v, i, case.mode, shape, w4, b, [2, 2], [1, 1], [0, 0])
        go = torch.randn_like(out)
        nnz = int((v != 0).sum())
        sparse_macs = nnz * 16 * case.Cout
        dense_macs = N * case.Cout * case.Cin * 9 * 4 * case.H * case.W
        key = (case.Cin, case.Cout, case.H)

        def dense_fwdbwd():
            d = dense_x.detach().requires_grad_()
            w = w3.detach().requires_grad_()
            bb = b.detach().requires_grad_()
            R.sparse_upsample_conv2d_ref(d, w, bb).backward(go)

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
            else:
                variants = [
                    ("fwd+fold", lambda: ops.sparse_conv_transpose2d(v, i, case.mode, shape, R.fold_upsample_weight(w3),
                                                                     b, [2, 2], [1, 1], [0, 0]), sparse_macs),
                    ("fwd", lambda: ops.sparse_conv_transpose2d(v, i, case.mode, shape, w4, b, [2, 2], [1, 1],
                                                                [0, 0]), sparse_macs),
                ]
                if not case.sweep:
                    variants += [
                        ("fold", lambda: R.fold_upsample_weight(w3), None),
                        ("in_grad", lambda: ops.sparse_conv_transpose2d_input_grad(go, i, case.mode, shape, w4,
                                                                                   [2, 2], [1, 1]), sparse_macs),
                        ("w_grad", lambda: ops.sparse_conv_transpose2d_weight_grad(go, v, i, case.mode, shape,
                                                                                   list(w4.shape), [2, 2], [1, 1]),
                         sparse_macs),
                        ("fwd+bwd", sparse_fwdbwd, 3 * sparse_macs),
                    ]
            for op, fn, macs in variants:
                if prov == "dense" and op in dense_ms.get(key, {}):
                    tm = dense_ms[key][op]  # measured for an earlier case with the same layer
                else:
                    with use_provider(prov) as ok:
                        tm = try_time(fn, device, args.quick) if ok else None
                    if prov == "dense":
                        dense_ms.setdefault(key, {})[op] = tm
                t = None if tm is None else tm.median
                base_tm = dense_ms.get(key, {}).get("fwd+bwd" if op == "fwd+bwd" else "fwd")
                compared = op in ("fwd", "fwd+fold", "fwd+bwd") and prov != "dense" and base_tm is not None
                r = ratio(base_tm.median, t) if compared else None
                r_min = ratio(base_tm.min, tm.min) if compared and tm is not None else None
                gmacs = None if t is None or macs is None else macs / t / 1e9
                print(f"{case.name:44s} {prov:10s} {op:9s} {fmt_ms(t)} {fmt_ratio(r)} "
                      f"{'' if gmacs is None else f'{gmacs:7.1f}'}")
                rows.append(dict(asdict(case), N=N, in_shape=shape, out_shape=list(out.shape),
                                 density=case.k / case.group_size(), nnz=nnz, provider=prov, op=op,
                                 ms=None if t is None else t * 1e3, ms_min=None if tm is None else tm.min * 1e3,
                                 speedup_vs_dense=r, speedup_vs_dense_min=r_min, gmac_per_s=gmacs,
                                 prefolded=op not in ("fwd+fold", "fwd+bwd")))
    extra = {**precision_note(args),
             "notes": "fwd+fold folds the 3x3 weight at every call; fwd uses a weight folded once (prefolded); "
                      "fwd+bwd goes through the autograd API, fold and its gradient included."}
    if device == "cuda":
        extra["fastest"] = fastest_providers("sparse_conv", rows)
        print("fastest GPU provider per op:", extra["fastest"])
    path = write_results("sparse_conv", rows, device, args.out, extra, quick=args.quick)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
