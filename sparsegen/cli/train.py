"""The ``train`` subcommand: Algorithm 1 on a new run, or the continuation of one.

    sparsegen train --config cpu32 --data parts --iters 600 --out runs/demo
    sparsegen train --out runs/demo --resume --iters 1000        # continue the same run up to 1000
    sparsegen train --config paper64 --data ~/celeba --out runs/celeba --dry-run
    torchrun --nproc_per_node=4 -m sparsegen train --config paper64 --data ~/celeba --device cuda --out runs/c

Exit status: 0 on success, 1 when training stops on a non-finite loss or weight (the last good checkpoint is
kept), 2 for anything the user can fix (one line naming the option), 130 when interrupted.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from ..model.configs import MODEL_CONFIGS, ModelConfig, RunConfig, TrainConfig
from ..train.trainer import RESUMABLE
from .options import (PROG, UsageError, add_config_options, check_device, check_out_dir, config_options, flag_of,
                      given, positive_int)

#: the options derived from the config dataclasses (see sparsegen.cli.options): RunConfig's own fields, then
#: Algorithm 1's hyper-parameters, then the architecture's fields (overriding those of --config)
RUN_OPTIONS = config_options(RunConfig, flags={"sparse": "--dense"})
TRAIN_OPTIONS = config_options(TrainConfig)
MODEL_OPTIONS = config_options(ModelConfig)
DEFAULT_MODEL = RunConfig().model.name


def add_subcommands(subparsers) -> dict:
    """Add ``train`` to ``subparsers``; returns ``{"train": handler(args, parser) -> int}``."""
    t = subparsers.add_parser(
        "train", help="train with Algorithm 1 (alternating back-propagation + energy critic)",
        description="Train a sparse generator and its energy critic. The options below the first group are the "
        "fields of sparsegen.model.configs.TrainConfig and ModelConfig; options left out take their defaults "
        "(with --resume: the run's own values; only --iters and the bookkeeping options may change then).")
    t.add_argument("--out", required=True, metavar="DIR", help="run directory (config, log, checkpoint, pictures)")
    t.add_argument("--config", choices=sorted(MODEL_CONFIGS), default=None,
                   help=f"the named architecture of sparsegen.model.configs.MODEL_CONFIGS (default {DEFAULT_MODEL})")
    add_config_options(t, RUN_OPTIONS)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint that "
                   "loads (a corrupt newer one is named and set aside)")
    t.add_argument("--dry-run", action="store_true", help="write the resolved config.json to --out and stop")
    t.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_options(t.add_argument_group("Algorithm 1 and its bookkeeping (TrainConfig)"), TRAIN_OPTIONS)
    add_config_options(t.add_argument_group("architecture (ModelConfig): changes to the fields of --config"),
                       MODEL_OPTIONS, default_note="that of --config")
    return {"train": cmd_train}


def _resolve_new_run(args, parser) -> RunConfig:
    """The RunConfig of the options (defaults filled in); bad values end in ``parser.error`` (exit 2)."""
    from ..data import parse_spec

    try:
        model = MODEL_CONFIGS[args.config or DEFAULT_MODEL]
        changes = given(args, MODEL_OPTIONS)
        if changes:
            model = model.replace(**changes)
        run = RunConfig(model=model, train=TrainConfig(**given(args, TRAIN_OPTIONS)), **given(args, RUN_OPTIONS))
        parse_spec(run.data)
        return run
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def _refuse_changes_on_resume(args, parser) -> dict:
    """The TrainConfig changes a resume may make; any other option ends in ``parser.error``."""
    train = given(args, TRAIN_OPTIONS)
    fixed = [flag_of(TRAIN_OPTIONS, f) for f in train if f not in RESUMABLE]
    fixed += [flag_of(RUN_OPTIONS, f) for f in given(args, RUN_OPTIONS)]
    fixed += [flag_of(MODEL_OPTIONS, f) for f in given(args, MODEL_OPTIONS)]
    fixed += ["--config"] if args.config else []
    if fixed:
        allowed = ", ".join(flag_of(TRAIN_OPTIONS, f) for f in sorted(RESUMABLE))
        parser.error(f"--resume continues the run as configured; {', '.join(fixed)} cannot change (only {allowed})")
    return train


def cmd_train(args, parser) -> int:
    from ..train import checkpoint as ckpt_io

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    if args.resume:
        if args.dry_run:
            parser.error("--dry-run and --resume do not go together")
        if not ckpt_io.has_checkpoint(args.out):
            parser.error(f"--resume: no checkpoint in {args.out}")
        return _run_training(args, resume_changes=_refuse_changes_on_resume(args, parser))

    run = _resolve_new_run(args, parser)
    check_out_dir("--out", args.out)
    if args.dry_run:
        path = os.path.join(args.out, "config.json")
        ckpt_io.write_text_atomic(run.to_json() + "\n", path)
        print(run.to_json())
        print(f"resolved config written to {path} (dry run: nothing trained)")
        return 0
    if ckpt_io.has_checkpoint(args.out):
        parser.error(f"{args.out} already holds a run (checkpoints); pass --resume to continue it or choose "
                     "another --out")
    return _run_training(args, run=run)


def _dataset(run: RunConfig):
    """The training images of ``run``; data that do not load are a :class:`UsageError` naming ``--data``."""
    from ..data import load_dataset

    try:
        return load_dataset(run.data, run.model.image_size, run.model.image_channels)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--data {run.data}: {exc}") from None


def _run_training(args, run: Optional[RunConfig] = None, resume_changes: Optional[dict] = None) -> int:
    from ..train import checkpoint as ckpt_io
    from ..train.distributed import init_distributed, shutdown
    from ..train.trainer import NonFiniteLossError, Trainer

    if run is not None:
        saved = run
        device = run.train.device
    else:
        saved = _saved_run(args.out)
        device = resume_changes.get("device") or saved.train.device
    check_device("--device", device)
    check_out_dir("--out", args.out)
    dataset = _dataset(saved)
    ctx = init_distributed(device)
    trainer = None
    try:
        try:
            if run is not None:
                trainer = Trainer(run, dataset, run_dir=args.out, dist=ctx)
            else:
                changes = dict(resume_changes)
                iters = changes.pop("iters", None)
                trainer = Trainer.resume(args.out, iters=iters, dataset=dataset, dist=ctx, **changes)
        except ckpt_io.NoCheckpointError as exc:
            raise UsageError(f"--resume: {exc}") from None
        except ValueError as exc:
            text = str(exc)
            if text.startswith("batch_size"):
                raise UsageError(f"--batch-size {(run or saved).train.batch_size}: {text}") from None
            if text.startswith("dataset images are") or "latent bank" in text:
                raise UsageError(f"--data {saved.data}: {text}") from None
            raise
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
        print(f"  checkpoint:      {trainer.last_checkpoint}")
        print(f"final reconstruction MSE: {metrics['recon_mse']:.5f} after {metrics['iteration']} iterations "
              f"({metrics['seconds']:.0f} s)")
    return 0


def _saved_run(run_dir: str) -> RunConfig:
    """The run config of ``run_dir``: its config.json, else the newest checkpoint that loads (no pickle is read)."""
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return RunConfig.from_json(f.read())
        except (ValueError, TypeError, KeyError):
            pass  # damaged: the checkpoint has the same
    from ..train import checkpoint as ckpt_io

    try:
        return RunConfig.from_dict(ckpt_io.load_latest(run_dir)[0]["run_config"])
    except ckpt_io.NoCheckpointError as exc:
        raise UsageError(f"--resume: {exc}") from None
