"""Stride-1 3x3 convolution skipping the zeros of its input vs the dense convolution, over input density.

The four stride-1 convolutions of the CVPR generator (512@8x8, 256@16x16, 128@32x32, 64@64x64, Cin = Cout) on an
input with a given fraction of non-zeros (a ReLU's output has about 50%), batch 16 on the CPU. Rows per case:

* ``dense``   ``F.conv2d`` (oneDNN on the CPU);
* ``sparse``  the sparse kernel forced: ``sparse_conv_transpose2d`` of the dense input (zeros skipped) with the
  flipped, transposed weight (padding ``k - 1 - p``, the same for a 3x3 kernel with padding 1);
* ``op``      ``sparse_conv2d``, which picks the sparse kernel below the crossover density of
  ``ops.sparse_conv2d_crossover`` and the dense conv above it.

The crossover density per channel count is where ``sparse`` stops beating ``dense``; ``ops.sparse_conv2d_crossover``
is set from these measurements.

    python benchmarks/bench_sparse_conv2d.py [--device cpu|cuda] [--quick] [--batch N ...] [--out FILE]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from common import (default_batches, environment, fmt_ms, fmt_ratio, load_ops, parse_args, precision_note,
                    save_op_results, speedups, time_provider, warn_fallbacks)


@dataclass(frozen=True)
class Conv2dCase:
    """A stride-1 3x3 conv, ``C -> C`` channels at ``H x H``, on an input of the given density."""

    C: int
    H: int
    density: float


LAYERS = ((512, 8), (256, 16), (128, 32), (64, 64))
DENSITIES = (0.5, 0.25, 0.1, 0.05, 0.02)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], dtypes=True, batches=True)
    device, dtype = args.device, args.torch_dtype
    ops = load_ops()
    batches = default_batches(args)
    env = environment(device, args.dtype, args.tf32)
    densities = DENSITIES[:2] if args.quick else DENSITIES
    layers = LAYERS[2:3] if args.quick else LAYERS
    print(f"stride-1 sparse conv on {env['device_name']} ({env['torch_threads']} threads), torch {env['torch']}, "
          f"batch {batches}, {args.dtype}")
    warn_fallbacks(env, "the op runs")
    print(f"{'case':28s} {'N':>4s} {'provider':8s} {'ms':>9s} {'vs dense':>8s}")
    rows = []
    torch.manual_seed(0)
    for N in batches:
        for C, H in layers:
            w = (torch.randn(C, C, 3, 3, device=device) / (3 * C ** 0.5)).to(dtype)
            b = torch.randn(C, device=device).to(dtype)
            wt = w.flip(2, 3).transpose(0, 1)
            for d in densities:
                case = Conv2dCase(C, H, d)
                x = (torch.rand(N, C, H, H, device=device) * (torch.rand(N, C, H, H, device=device) < d)).to(dtype)
                measured = float((x != 0).float().mean())
                base = None
                for prov, fn in (("dense", lambda: F.conv2d(x, w, b, padding=1)),
                                 ("sparse", lambda: ops.sparse_conv_transpose2d(x, None, "spatial", list(x.shape), wt,
                                                                                b, [1, 1], [1, 1], [0, 0])),
                                 ("op", lambda: ops.sparse_conv2d(x, w, b, [1, 1]))):
                    tm = time_provider("dense", fn, device, args.quick)
                    if prov == "dense":
                        base = tm
                    r, r_min = speedups(base, tm)
                    t = None if tm is None else tm.median
                    name = f"{C}@{H}x{H}, density {measured:.2f}"
                    print(f"{name:28s} {N:4d} {prov:8s} {fmt_ms(t)} {fmt_ratio(r)}")
                    rows.append(dict(asdict(case), name=name, N=N, measured_density=measured, provider=prov, op="fwd",
                                     ms=None if t is None else t * 1e3, ms_min=None if tm is None else tm.min * 1e3,
                                     speedup_vs_dense=r, speedup_vs_dense_min=r_min,
                                     crossover=ops_crossover(C)))
    save_op_results("sparse_conv2d", rows, env, args, {**precision_note(args), "batches": batches})


def ops_crossover(C: int) -> float:
    from sparsegen_kernels.ops import sparse_conv2d_crossover

    return sparse_conv2d_crossover(C)


if __name__ == "__main__":
    main()
