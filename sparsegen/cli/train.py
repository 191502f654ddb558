"""The ``train`` subcommand: Algorithm 1 on a new run, or the continuation of one.

    sparsegen train --config cpu32 --data parts --iters 600 --out runs/demo
    sparsegen train --out runs/demo --resume --iters 1000        # continue the same run up to 1000
    sparsegen train --config paper64 --data ~/celeba --out runs/celeba --dry-run
    torchrun --nproc_per_node=4 -m sparsegen train --config paper64 --data ~/celeba --device cuda --out runs/c

Exit status: 0 on success, 1 when training stops on a non-finite loss (the last good checkpoint is kept),
2 for bad arguments, 130 when interrupted.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from ..model.configs import MODEL_CONFIGS, RunConfig, TrainConfig
from .options import PROG, nonneg_float, nonneg_int, positive_float, positive_int

# option -> TrainConfig field, for the training hyper-parameters that may be given on the command line
TRAIN_OPTIONS = {
    "iters": "iters", "batch_size": "batch_size", "sigma": "sigma", "step_size": "step_size",
    "langevin_steps": "langevin_steps", "lr_g": "lr_g", "lr_d": "lr_d", "critic_weight": "critic_weight",
    "gp_weight": "gp_weight", "seed": "seed", "device": "device", "amp": "amp", "log_every": "log_every",
    "sample_every": "sample_every", "ckpt_every": "ckpt_every", "eval_examples": "eval_examples",
    "langevin_noise": "langevin_noise",
}
RESUME_OPTIONS = {"iters", "device", "log_every", "sample_every", "ckpt_every", "eval_examples"}


def add_subcommands(subparsers) -> dict:
    """Add ``train`` to ``subparsers``; returns ``{"train": handler(args, parser) -> int}``."""
    t = subparsers.add_parser("train", help="train with Algorithm 1 (alternating back-propagation + energy critic)",
                       description="Train a sparse generator and its energy critic. Options left out take the "
                       "defaults of sparsegen.model.configs.TrainConfig (or, with --resume, the run's own values).")
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

    return {"train": cmd_train}


# ---- train -------------------------------------------------------------------------------------------
def _train_overrides(args) -> dict:
    return {f: getattr(args, opt) for opt, f in TRAIN_OPTIONS.items() if getattr(args, opt, None) is not None}


def _resolve_new_run(args, parser) -> RunConfig:
    """The RunConfig of the options (defaults filled in); bad values end in ``parser.error`` (exit 2)."""
    from ..data import parse_spec

    try:
        train = TrainConfig(**_train_overrides(args))
        run = RunConfig(model=args.config or "cpu32", sparse=not args.dense, data=args.data or "parts", train=train)
        parse_spec(run.data)
        return run
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def cmd_train(args, parser) -> int:
    from ..train import checkpoint as ckpt_io
    from ..train.trainer import CHECKPOINT

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
    from ..train.distributed import init_distributed, shutdown
    from ..train.trainer import NonFiniteLossError, Trainer

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
    from ..train import checkpoint as ckpt_io

    return RunConfig.from_dict(ckpt_io.load(os.path.join(run_dir, "checkpoint.pt"))["run_config"])
