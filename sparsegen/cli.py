"""Command line: ``sparsegen train | sample | reconstruct`` (also ``python -m sparsegen``).

    sparsegen train --config cpu32 --data parts --iters 600 --out runs/demo
    sparsegen train --out runs/demo --resume --iters 1000        # continue the same run up to 1000
    sparsegen train --config paper64 --data ~/celeba --out runs/celeba --dry-run
    torchrun --nproc_per_node=4 -m sparsegen train --config paper64 --data ~/celeba --device cuda --out runs/c
    sparsegen sample --run runs/demo --n 64
    sparsegen reconstruct --run runs/demo --data faces --steps 300

Exit status: 0 on success, 1 when training stops on a non-finite loss (the last good checkpoint is kept)
or a run cannot be read, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .configs import MODEL_CONFIGS, RunConfig, TrainConfig

PROG = "sparsegen"


# ---- typed option values ------------------------------------------------------------------------------
def _int(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = what
    return parse


def _float(lo: float, strict: bool, what: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not (v > lo if strict else v >= lo) or v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = what
    return parse


positive_int = _int(1, "a positive integer")
nonneg_int = _int(0, "an integer >= 0")
positive_float = _float(0.0, True, "a positive number")
nonneg_float = _float(0.0, False, "a number >= 0")

# option -> TrainConfig field, for the training hyper-parameters that may be given on the command line
TRAIN_OPTIONS = {
    "iters": "iters", "batch_size": "batch_size", "sigma": "sigma", "step_size": "step_size",
    "langevin_steps": "langevin_steps", "lr_g": "lr_g", "lr_d": "lr_d", "critic_weight": "critic_weight",
    "gp_weight": "gp_weight", "seed": "seed", "device": "device", "amp": "amp", "log_every": "log_every",
    "sample_every": "sample_every", "ckpt_every": "ckpt_every", "eval_examples": "eval_examples",
    "langevin_noise": "langevin_noise",
}
RESUME_OPTIONS = {"iters", "device", "log_every", "sample_every", "ckpt_every", "eval_examples"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Sparsely activated generator networks (CVPR 2020): "
                                "train, sample, reconstruct.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,reconstruct,andor,eval,report}")

    t = sub.add_parser("train", help="train with Algorithm 1 (alternating back-propagation + energy critic)",
                       description="Train a sparse generator and its energy critic. Options left out take the "
                       "defaults of sparsegen.configs.TrainConfig (or, with --resume, the run's own values).")
    t.add_argument("--config", choices=sorted(MODEL_CONFIGS), default=None,
                   help="model architecture (default cpu32)")
    t.add_argument("--data", default=None, metavar="SPEC",
                   help="parts[:n=1024,seed=0] | textures[:n=600,seed=0] | faces | a folder of images (PATH or "
                   "folder:PATH, PATH@N for the first N); default parts")
    t.add_argument("--out", required=True, metavar="DIR", help="run directory (config, log, checkpoint, pictures)")
    t.add_argument("--iters", type=positive_int, help="total learning iterations T (with --resume: the new total)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--dry-run", action="store_true", help="write the resolved config.json to --out and stop")
    t.add_argument("--dense", action="store_true", help="train the same network without top-k (the baseline)")
    g = t.add_argument_group("Algorithm 1")
    g.add_argument("--batch-size", type=positive_int, help="examples per iteration (per process)")
    g.add_argument("--langevin-steps", type=nonneg_int, help="l_G, Langevin steps per iteration")
    g.add_argument("--step-size", type=positive_float, help="Langevin step size delta (Eq. 13)")
    g.add_argument("--sigma", type=positive_float, help="observation noise sigma (Eq. 14)")
    g.add_argument("--no-langevin-noise", dest="langevin_noise", action="store_const", const=False, default=None,
                   help="drop the noise term of Eq. 13 (gradient ascent to the posterior mode)")
    g.add_argument("--lr-g", type=positive_float, help="generator learning rate")
    g.add_argument("--lr-d", type=positive_float, help="critic learning rate")
    g.add_argument("--critic-weight", type=nonneg_float, help="weight of the critic term Eq. 20 (0: no critic)")
    g.add_argument("--gp-weight", type=nonneg_float, help="WGAN-GP gradient penalty weight")
    g.add_argument("--seed", type=nonneg_int, help="random seed of the run")
    r = t.add_argument_group("run")
    r.add_argument("--device", help="cpu | cuda | cuda:N (under torchrun: cuda means the local rank's GPU)")
    r.add_argument("--amp", action="store_const", const=True, default=None, help="bfloat16 autocast (CUDA)")
    r.add_argument("--log-every", type=positive_int, help="iterations between log lines")
    r.add_argument("--sample-every", type=positive_int, help="iterations between pictures")
    r.add_argument("--ckpt-every", type=positive_int, help="iterations between checkpoints")
    r.add_argument("--eval-examples", type=positive_int, help="examples in the final reconstruction MSE")
    r.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="generate images from Z ~ N(0, I)")
    s.add_argument("--run", required=True, metavar="DIR", help="run directory or checkpoint file")
    s.add_argument("--n", type=positive_int, default=64, help="number of images (default 64)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="seed of the latents (default 0)")
    s.add_argument("--out", metavar="FILE", help="PNG to write (default DIR/samples_seed<seed>.png)")
    s.add_argument("--device", default="cpu")

    c = sub.add_parser("reconstruct", help="infer latents of images by Langevin dynamics and reconstruct them")
    c.add_argument("--run", required=True, metavar="DIR", help="run directory or checkpoint file")
    c.add_argument("--data", metavar="SPEC", help="images to reconstruct (default: the training set, starting "
                   "from its persistent latents)")
    c.add_argument("--n", type=positive_int, default=32, help="number of images (default 32)")
    c.add_argument("--steps", type=nonneg_int, default=200, help="Langevin steps (default 200)")
    c.add_argument("--step-size", type=positive_float, help="Langevin step size (default: the run's)")
    c.add_argument("--noise", action="store_true", help="keep the noise term (posterior sample, not the mode)")
    c.add_argument("--seed", type=nonneg_int, default=0)
    c.add_argument("--out", metavar="FILE", help="PNG to write (default DIR/reconstruct.png)")
    c.add_argument("--device", default="cpu")
    from .report_cli import add_subcommands

    p.set_defaults(handlers=add_subcommands(sub))
    return p


# ---- train -------------------------------------------------------------------------------------------
def _train_overrides(args) -> dict:
    return {f: getattr(args, opt) for opt, f in TRAIN_OPTIONS.items() if getattr(args, opt, None) is not None}


def _resolve_new_run(args, parser) -> RunConfig:
    """The RunConfig of the options (defaults filled in); bad values end in ``parser.error`` (exit 2)."""
    from .data import parse_spec

    try:
        train = TrainConfig(**_train_overrides(args))
        run = RunConfig(model=args.config or "cpu32", sparse=not args.dense, data=args.data or "parts", train=train)
        parse_spec(run.data)
        return run
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def _cmd_train(args, parser) -> int:
    from . import checkpoint as ckpt_io
    from .trainer import CHECKPOINT

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ckpt_file = os.path.join(args.out, CHECKPOINT)
    if args.resume:
        if args.dry_run:
            parser.error("--dry-run and --resume do not go together")
        if not os.path.isfile(ckpt_file):
            parser.error(f"--resume: no checkpoint at {ckpt_file}")
        given = _train_overrides(args)
        fixed = sorted(k for k in given if k not in RESUME_OPTIONS)
        if args.config or args.data or args.dense or fixed:
            names = [f"--{k.replace('_', '-')}" for k in fixed]
            names += [o for o, v in (("--config", args.config), ("--data", args.data), ("--dense", args.dense)) if v]
            parser.error(f"--resume continues the run as configured; {', '.join(names)} cannot change "
                         f"(only --iters and {', '.join('--' + k.replace('_', '-') for k in sorted(RESUME_OPTIONS - {'iters'}))})")
        return _run_training(args, resume_changes={k: v for k, v in given.items()})

    run = _resolve_new_run(args, parser)
    if args.dry_run:
        path = os.path.join(args.out, "config.json")
        ckpt_io.write_text_atomic(run.to_json() + "\n", path)
        print(run.to_json())
        print(f"resolved config written to {path} (dry run: nothing trained)")
        return 0
    if os.path.exists(ckpt_file):
        parser.error(f"{args.out} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose "
                     "another --out")
    return _run_training(args, run=run)


def _run_training(args, run: Optional[RunConfig] = None, resume_changes: Optional[dict] = None) -> int:
    from .distributed import init_distributed, shutdown
    from .trainer import NonFiniteLossError, Trainer

    if run is not None:
        device = run.train.device
    else:
        device = resume_changes.get("device") or _saved_run(args.out).train.device
    ctx = init_distributed(device)
    trainer = None
    try:
        if run is not None:
            trainer = Trainer(run, run_dir=args.out, dist=ctx)
        else:
            changes = dict(resume_changes)
            iters = changes.pop("iters", None)
            trainer = Trainer.resume(args.out, iters=iters, dist=ctx, **changes)
        metrics = trainer.train(progress=not args.no_progress)
    except NonFiniteLossError as exc:
        print(f"{PROG} train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        last = trainer.last_checkpoint if trainer is not None else None
        print(f"{PROG} train: interrupted; the last checkpoint is {last}", file=sys.stderr)
        return 130
    finally:
        shutdown()
    if ctx.is_main:
        out = args.out
        print(f"\nrun directory: {out}")
        print(f"  samples:         {os.path.join(out, 'samples.png')}")
        print(f"  reconstructions: {os.path.join(out, 'reconstructions.png')} (rows: observed, reconstructed)")
        print(f"  loss curves:     {os.path.join(out, 'loss.png')}")
        print(f"  checkpoint:      {os.path.join(out, 'checkpoint.pt')}")
        print(f"final reconstruction MSE: {metrics['recon_mse']:.5f} after {metrics['iteration']} iterations "
              f"({metrics['seconds']:.0f} s)")
    return 0


def _saved_run(run_dir: str) -> RunConfig:
    """The run config of ``run_dir`` (its config.json, else its checkpoint)."""
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return RunConfig.from_json(f.read())
    from . import checkpoint as ckpt_io

    return RunConfig.from_dict(ckpt_io.load(os.path.join(run_dir, "checkpoint.pt"))["run_config"])


# ---- sample / reconstruct ------------------------------------------------------------------------------
def _load(args):
    from .trainer import load_run

    try:
        return load_run(args.run, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return None


def _out_path(args, default_name: str) -> str:
    if args.out:
        return args.out
    base = args.run if os.path.isdir(args.run) else os.path.dirname(os.path.abspath(args.run))
    return os.path.join(base, default_name)


def _cmd_sample(args, parser) -> int:
    import torch

    from .viz import save_grid

    loaded = _load(args)
    if loaded is None:
        return 1
    rng = torch.Generator().manual_seed(args.seed)
    images = loaded.generator.sample(args.n, rng=rng).float().cpu()
    path = save_grid(images, _out_path(args, f"samples_seed{args.seed}.png"))
    print(f"{args.n} samples from {loaded.path} (iteration {loaded.iteration}) written to {path}")
    return 0


def _cmd_reconstruct(args, parser) -> int:
    import torch

    from .data import load_dataset
    from .langevin import langevin_infer
    from .viz import save_grid

    loaded = _load(args)
    if loaded is None:
        return 1
    run, g = loaded.config, loaded.generator
    try:
        data = load_dataset(args.data or run.data, run.model.image_size, run.model.image_channels)
    except ValueError as exc:
        parser.error(str(exc))
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sparsegen`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's parser, for its errors
    cmd = {"train": _cmd_train, "sample": _cmd_sample, "reconstruct": _cmd_reconstruct, **args.handlers}[args.command]
    return cmd(args, sub)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
