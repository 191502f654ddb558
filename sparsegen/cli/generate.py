"""The ``sample`` and ``reconstruct`` subcommands: images from a trained generator.

    sparsegen sample --run runs/demo --n 64
    sparsegen reconstruct --run runs/demo --data faces --steps 300
"""
from __future__ import annotations

import os
import sys

from .options import (PROG, UsageError, check_device, check_out_file, nonneg_int, positive_float,
                      positive_int)


def add_subcommands(subparsers) -> dict:
    """Add ``sample`` and ``reconstruct`` to ``subparsers``; returns ``{name: handler(args, parser) -> int}``."""
    s = subparsers.add_parser("sample", help="generate images from Z ~ N(0, I)")
    s.add_argument("--run", required=True, metavar="DIR", help="run directory or checkpoint file")
    s.add_argument("--n", type=positive_int, default=64, help="number of images (default 64)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="seed of the latents (default 0)")
    s.add_argument("--out", metavar="FILE", help="PNG to write (default DIR/samples_seed<seed>.png)")
    s.add_argument("--device", default="cpu", help="device to compute on (default cpu)")

    c = subparsers.add_parser("reconstruct", help="infer latents of images by Langevin dynamics and reconstruct them")
    c.add_argument("--run", required=True, metavar="DIR", help="run directory or checkpoint file")
    c.add_argument("--data", metavar="SPEC", help="images to reconstruct (default: the training set, starting "
                   "from its persistent latents)")
    c.add_argument("--n", type=positive_int, default=32, help="number of images (default 32)")
    c.add_argument("--steps", type=nonneg_int, default=200, help="Langevin steps (default 200)")
    c.add_argument("--step-size", type=positive_float, help="Langevin step size (default: the run's)")
    c.add_argument("--noise", action="store_true", help="keep the noise term (posterior sample, not the mode)")
    c.add_argument("--seed", type=nonneg_int, default=0, help="seed of the Langevin noise (default 0)")
    c.add_argument("--out", metavar="FILE", help="PNG to write (default DIR/reconstruct.png)")
    c.add_argument("--device", default="cpu", help="device to compute on (default cpu)")
    return {"sample": cmd_sample, "reconstruct": cmd_reconstruct}


def warn(args):
    """A callback printing ``sparsegen <command>: warning: <message>`` on stderr (a corrupt checkpoint skipped)."""
    return lambda msg: print(f"{PROG} {args.command}: warning: {msg}", file=sys.stderr)


def load_run_or_fail(args, device: str = None):
    """The run of ``--run`` (its newest checkpoint that loads); a :class:`UsageError` when none does."""
    from ..train.trainer import load_run

    try:
        return load_run(args.run, device=device or args.device, on_skip=warn(args))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--run {args.run}: {exc}") from None


def _load(args):
    check_device("--device", args.device)
    loaded = load_run_or_fail(args)
    check_out_file("--out", _out_path(args, "x.png"))
    return loaded


def _out_path(args, default_name: str) -> str:
    if args.out:
        return args.out
    base = args.run if os.path.isdir(args.run) else os.path.dirname(os.path.abspath(args.run))
    return os.path.join(base, default_name)


def cmd_sample(args, parser) -> int:
    import torch

    from ..train.pictures import save_grid

    loaded = _load(args)
    rng = torch.Generator().manual_seed(args.seed)
    images = loaded.generator.sample(args.n, rng=rng).float().cpu()
    path = save_grid(images, _out_path(args, f"samples_seed{args.seed}.png"))
    print(f"{args.n} samples from {loaded.path} (iteration {loaded.iteration}) written to {path}")
    return 0


def cmd_reconstruct(args, parser) -> int:
    import torch

    from ..data import load_dataset
    from ..train.langevin import langevin_infer
    from ..train.pictures import save_grid

    loaded = _load(args)
    run, g = loaded.config, loaded.generator
    try:
        data = load_dataset(args.data or run.data, run.model.image_size, run.model.image_channels)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--data {args.data or run.data}: {exc}") from None
    n = min(args.n, len(data))
    y = data.batch(torch.arange(n)).to(args.device)
    if args.data is None:
        z0, start = loaded.latents[:n].to(args.device), "their persistent latents"
    else:
        z0, start = torch.zeros(n, run.model.z_dim, device=args.device), "Z = 0"
    rng = torch.Generator().manual_seed(args.seed)
    z = langevin_infer(g, y, z0, n_steps=args.steps, step_size=args.step_size or run.train.step_size,
                       sigma=run.train.sigma, noise=args.noise, rng=rng)
    with torch.no_grad():
        rec = g(z).float().cpu()
    y = y.cpu()
    mse = float((y - rec).pow(2).mean())
    rows = []
    for s in range(0, n, 8):
        rows += [y[s:s + 8], rec[s:s + 8]]
    path = save_grid(torch.cat(rows), _out_path(args, "reconstruct.png"))
    print(f"reconstructed {n} images of {data.name} ({args.steps} Langevin steps from {start}): "
          f"MSE {mse:.5f} (images in [-1, 1]); grid (rows: observed, reconstructed) written to {path}")
    return 0
