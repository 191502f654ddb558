"""Fused bias + ReLU + top-k selection vs what a dense PyTorch model does (relu + torch.topk + scatter_).

Shapes are the sparsified layers of the CVPR generator (Table 1), batch 16 on the CPU and 64 and 256 on a GPU
(``--batch``): spatial top-k (k = H*W/4) of 512@8x8, 256@16x16, 128@32x32 and the FC layer's channel top-8 of
3200@4x4. GB/s counts the bytes each op must move (input read once, outputs written once); on a GPU the run
also measures a device-to-device copy, the practical bandwidth ceiling, and every row gives its share of it.
Providers (see benchmarks/common.py): ``dense`` = ``baselines.topk_mask_torch_baseline``;
``sparsegen`` = ``torch.ops.sparsegen.topk_mask`` (dense output, like for like) and ``topk_compact``
(the compact output the sparse convolutions consume); on CUDA also ``triton`` and ``cuda``.
Ratios are of medians; the result rows also keep the fastest repeat (``ms_min``) and its ratio.

    python benchmarks/bench_topk.py [--device cpu|cuda] [--quick] [--out FILE]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from common import (default_batches, environment, fmt_ms, fmt_ratio, load_ops, parse_args, precision_note, providers,
                    save_op_results, speedups, time_provider, warn_fallbacks)


@dataclass(frozen=True)
class TopkCase:
    """One top-k layer: input [N, C, H, W], k per group, grouping mode; bias + ReLU fused."""

    name: str
    C: int
    H: int
    W: int
    k: int
    mode: str

    def group_size(self) -> int:
        return {"spatial": self.H * self.W, "channel": self.C, "global": self.C * self.H * self.W}[self.mode]


CASES = (
    TopkCase("spatial 512@8x8 (paper layer 3)", 512, 8, 8, 16, "spatial"),
    TopkCase("spatial 256@16x16 (paper layer 4)", 256, 16, 16, 64, "spatial"),
    TopkCase("spatial 128@32x32 (paper layer 5)", 128, 32, 32, 256, "spatial"),
    TopkCase("channel top-8 of 3200@4x4 (paper FC)", 3200, 4, 4, 8, "channel"),
)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (bytes read + bytes written): the bandwidth ceiling."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], dtypes=True, batches=True)
    dtype = args.torch_dtype
    device = args.device
    ops = load_ops()
    from sparsegen_kernels.baselines import topk_mask_torch_baseline

    batches = default_batches(args)
    names = providers(device)
    env = environment(device, args.dtype, args.tf32)
    copy_gbs = copy_bandwidth() if device == "cuda" else None
    print(f"top-k on {env['device_name']} ({env['torch_threads']} threads), torch {env['torch']}, batch {batches}, "
          f"{args.dtype}" + (f"; device-to-device copy {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    warn_fallbacks(env, "the sparsegen provider runs")
    print(f"{'case':40s} {'N':>4s} {'provider':10s} {'op':8s} {'ms':>9s} {'vs dense':>8s} {'GB/s':>7s} {'% copy':>6s}")
    rows = []
    torch.manual_seed(0)
    for N, case in ((n, c) for n in batches for c in CASES):
        shape = (N, case.C, case.H, case.W)
        x = torch.randn(shape, device=device).to(dtype)
        b = torch.randn(case.C, device=device).to(dtype)
        G = x.numel() // N // case.group_size()
        idx_bytes = 2 if case.group_size() <= 32767 else 4
        el = x.element_size()
        nbytes = {"mask": x.numel() * el * 2 + N * G * case.k * idx_bytes,
                  "compact": x.numel() * el + N * G * case.k * (el + idx_bytes)}
        base = None
        for prov in names:
            variants = [("mask", lambda: topk_mask_torch_baseline(x, case.k, case.mode, b, True))] if prov == "dense" \
                else [("mask", lambda: ops.topk_mask(x, case.k, case.mode, b, True)),
                      ("compact", lambda: ops.topk_compact(x, case.k, case.mode, b, True))]
            for op, fn in variants:
                tm = time_provider(prov, fn, device, args.quick)
                if prov == "dense":
                    base = tm
                t = None if tm is None else tm.median
                r, r_min = speedups(base, tm)
                gbs = None if t is None else nbytes[op] / t / 1e9
                pct = None if gbs is None or not copy_gbs else 100 * gbs / copy_gbs
                print(f"{case.name:40s} {N:4d} {prov:10s} {op:8s} {fmt_ms(t)} {fmt_ratio(r)} "
                      f"{'' if gbs is None else f'{gbs:7.1f}'} {'' if pct is None else f'{pct:5.0f}%'}")
                rows.append(dict(asdict(case), N=N, shape=list(shape), density=case.k / case.group_size(),
                                 provider=prov, op=op, ms=None if t is None else t * 1e3,
                                 ms_min=None if tm is None else tm.min * 1e3, speedup_vs_dense=r,
                                 speedup_vs_dense_min=r_min, gb_per_s=gbs, pct_of_copy_bandwidth=pct))
    save_op_results("topk", rows, env, args, {**precision_note(args), "batches": batches, "copy_gb_per_s": copy_gbs})


if __name__ == "__main__":
    main()
