"""Algorithm 1 of CVPR 2020: alternating back-propagation with an energy-based critic.

One iteration on a minibatch ``{Y_i}`` of the training set:

1. critic step (Eq. 21): draw ``Z_hat ~ N(0, I)``, ``Y_hat = g(Z_hat)``; lower ``f(Y_i)`` and raise
   ``f(Y_hat)`` (WGAN-GP gradient penalty optional, as in the authors' code);
2. ``l_G`` Langevin steps (Eq. 13-14) on the *persistent* latent ``Z_i`` of every example in the batch,
   kept in a latent bank for the whole training set (saved in checkpoints);
3. generator step: ``||Y_i - g(Z_i)||^2 / (2 sigma^2)`` (Eq. 15) ``+ critic_weight * f(g(Z_hat))`` (Eq. 20).

A run directory holds ``config.json`` (the resolved :class:`~sparsegen.model.configs.RunConfig`), ``log.txt``,
the ``keep_checkpoints`` newest checkpoints (``checkpoint-<iteration>.json`` + ``.safetensors``, see
:mod:`.checkpoint`), ``samples.png``, ``reconstructions.png``, ``loss.png`` and, at the end, ``metrics.json``;
every file is written atomically. Resuming continues exactly: weights, optimisers, latent bank, random state and
loss history are all in the checkpoint, so N + M iterations equal N, then a resume to N + M (bitwise on a
CPU with the same number of threads). Resume takes the newest checkpoint that loads and verifies.

Nothing non-finite is ever saved: after every iteration the weights, buffers and optimiser states of both
networks are checked, and an iteration that made any of them NaN or infinite stops the run
(:class:`NonFiniteWeightsError`) before a checkpoint is written, so the newest checkpoint is the one from before
it, to be resumed with a smaller learning rate.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..data import ImageDataset, load_dataset
from ..model.configs import RunConfig
from ..model.critic import EnergyCritic, critic_loss
from ..model.generator import SparseGenerator
from . import checkpoint as ckpt_io
from .distributed import DistContext
from .langevin import frozen, langevin_infer

HISTORY_KEYS = ("iter", "recon_mse", "loss_g", "loss_d", "energy_real", "energy_fake", "gp")
#: the TrainConfig fields a resumed run may change: the new total of iterations, the bookkeeping, and the
#: settings a run that diverged or ran out of memory is resumed with (these end the exact continuation)
RESUMABLE = frozenset({"iters", "device", "log_every", "sample_every", "ckpt_every", "keep_checkpoints",
                       "eval_examples", "lr_g", "lr_d", "step_size", "gp_every", "gp_batch"})
#: of those, the ones that change what the following iterations compute
CHANGES_THE_CONTINUATION = frozenset({"lr_g", "lr_d", "step_size", "gp_every", "gp_batch"})


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN / inf; nothing was saved from it and the last good checkpoint is kept."""


class NonFiniteWeightsError(NonFiniteLossError):
    """An iteration made a weight, buffer or optimiser state NaN / inf; no checkpoint holds it, the last good
    checkpoint (from before that iteration) is kept."""


def _tensors(obj):
    """Every tensor in nested dicts / lists / tuples."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (stable across runs, platforms and processes)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


@dataclass
class LoadedRun:
    """A trained run read back from disk (see :func:`load_run`)."""

    generator: SparseGenerator
    critic: EnergyCritic
    config: RunConfig
    latents: Tensor  # [N, z_dim], the persistent latent of every training example
    iteration: int
    path: str


class Trainer:
    """Trains a :class:`SparseGenerator` and an :class:`EnergyCritic` with Algorithm 1.

    Args:
        run: the :class:`~sparsegen.model.configs.RunConfig`.
        dataset: the training images (default: ``load_dataset(run.data)`` at the model's image size).
        run_dir: where the config, log, checkpoints and pictures go (None: nothing is written).
        dist: this process's :class:`~sparsegen.train.distributed.DistContext` (default: a single process on
            ``run.train.device``).
        log: called with each log line (default: ``print`` on the main process).
    """

    def __init__(self, run: RunConfig, dataset: Optional[ImageDataset] = None, *, run_dir: Optional[str] = None,
                 dist: Optional[DistContext] = None, log: Optional[Callable[[str], None]] = None):
        self.run = run
        cfg = self.cfg = run.train
        self.dist = dist or DistContext(device=torch.device(cfg.device))
        self.device = self.dist.device
        self.run_dir = run_dir
        self._log_fn = log
        mcfg = run.model
        if dataset is None:
            dataset = load_dataset(run.data, mcfg.image_size, mcfg.image_channels)
        if tuple(dataset.image_shape) != tuple(mcfg.image_shape):
            raise ValueError(f"dataset images are {tuple(dataset.image_shape)} but model {mcfg.name!r} makes "
                             f"{tuple(mcfg.image_shape)}")
        self.dataset = dataset
        n = len(dataset)
        per_rank = n // self.dist.world_size
        if cfg.batch_size > per_rank:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the {per_rank} training examples per process "
                             f"({n} examples, {self.dist.world_size} process(es))")
        self.iters_per_epoch = per_rank // cfg.batch_size
        self.shard = self.dist.shard(n)  # global indices of the examples this rank owns

        # Weights and bank from the seed alone: the same on every rank, whatever the device.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            generator = SparseGenerator(mcfg, sparse=run.sparse)
            critic = EnergyCritic(mcfg)
        self.generator = generator.to(self.device)
        self.critic = critic.to(self.device)
        bank = torch.randn(n, mcfg.z_dim, generator=torch.Generator().manual_seed(derived_seed(cfg.seed, "bank")))
        self.latents = bank[self.shard].to(self.device)  # this rank's shard of the persistent latent bank
        self.rng = torch.Generator().manual_seed(derived_seed(cfg.seed, "rng", self.dist.rank))
        self.z_vis = torch.randn(64, mcfg.z_dim, generator=torch.Generator().manual_seed(derived_seed(cfg.seed, "vis")))

        self.gen_train = self.dist.wrap(self.generator)
        self.critic_train = self.dist.wrap(self.critic)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_d, betas=betas)
        self.iteration = 0
        self.history = {k: [] for k in HISTORY_KEYS}
        self.last_checkpoint: Optional[str] = None
        if run_dir is not None and self.dist.is_main:
            stale = ckpt_io.remove_stale(run_dir)
            if stale:
                self.log(f"removed {len(stale)} file(s) left by an interrupted write: {', '.join(stale)}")

    # ---------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[str]:
        """Where the checkpoint of the current iteration goes (None without a run directory)."""
        return None if self.run_dir is None else os.path.join(self.run_dir, ckpt_io.checkpoint_name(self.iteration))

    def log(self, msg: str) -> None:
        """A line to the log (main process only): ``log.txt`` in the run directory and the console."""
        if not self.dist.is_main:
            return
        if self.run_dir is not None:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
                f.write(msg + "\n")
        if self._log_fn is not None:
            self._log_fn(msg)
        else:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def _autocast(self):
        if self.cfg.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _randn(self, *shape) -> Tensor:
        return torch.randn(*shape, generator=self.rng).to(self.device)

    def batch_positions(self, t: int) -> Tensor:
        """Positions in this rank's shard of the examples of iteration ``t`` (a fresh permutation per epoch)."""
        epoch, pos = divmod(t, self.iters_per_epoch)
        g = torch.Generator().manual_seed(derived_seed(self.cfg.seed, "perm", epoch, self.dist.rank))
        perm = torch.randperm(len(self.shard), generator=g)
        b = self.cfg.batch_size
        return perm[pos * b:(pos + 1) * b]

    def _kept(self) -> str:
        if self.last_checkpoint:
            return f"the last good checkpoint {self.last_checkpoint} is kept"
        return "no checkpoint had been written yet"

    def _check_finite(self, name: str, value: Tensor) -> None:
        if not self.dist.all_true(bool(torch.isfinite(value).all())):
            raise NonFiniteLossError(f"non-finite {name} at iteration {self.iteration + 1}: training stopped "
                                     f"before applying it; {self._kept()}. Try a smaller --lr-g / --lr-d or "
                                     "--step-size.")

    def _trained_state(self) -> dict:
        """The tensors an iteration changes: both networks' parameters and buffers, both optimisers' states."""
        return {"generator": self.generator.state_dict(), "critic": self.critic.state_dict(),
                "opt_g": self.opt_g.state_dict()["state"], "opt_d": self.opt_d.state_dict()["state"]}

    def _check_weights_finite(self) -> None:
        """Stop (:class:`NonFiniteWeightsError`) when the iteration just done made a weight, buffer or optimiser
        state NaN or infinite (on any process)."""
        state = self._trained_state()
        flags = [torch.isfinite(t).all() for part in state.values() for t in _tensors(part) if t.is_floating_point()]
        ok = bool(torch.stack(flags).all()) if flags else True
        if not self.dist.all_true(ok):
            bad = ckpt_io.non_finite(state) or "non-finite values on another process"
            lr = {"generator": "--lr-g", "opt_g": "--lr-g", "critic": "--lr-d", "opt_d": "--lr-d"}.get(
                bad.split("/")[0], "--lr-g / --lr-d")
            raise NonFiniteWeightsError(
                f"non-finite weights after iteration {self.iteration + 1} ({bad}): training stopped and nothing of "
                f"that iteration was saved; {self._kept()}. Resume from it with a smaller learning rate "
                f"(--resume {lr} ...).")

    # ---------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """One iteration of Algorithm 1; returns its statistics (floats, averaged over processes)."""
        cfg = self.cfg
        pos = self.batch_positions(self.iteration)
        y = self.dataset.batch(self.shard[pos]).to(self.device)
        b = y.shape[0]
        use_critic = cfg.critic_weight > 0
        # Lazy regularisation: the penalty on iterations gp_every, 2 gp_every, ..., weighted by gp_every there.
        gp_on = cfg.gp_weight > 0 and (self.iteration + 1) % cfg.gp_every == 0
        gp_weight = cfg.gp_weight * cfg.gp_every if gp_on else 0.0
        zero = torch.zeros((), device=self.device)
        loss_d, cstats = zero, {"energy_real": zero, "energy_fake": zero, "gp": zero}

        # Step 1: critic (Eq. 21) on observed Y and syntheses Y_hat = g(Z_hat), Z_hat ~ N(0, I).
        if use_critic:
            z_hat = self._randn(b, self.generator.z_dim)
            eps = torch.rand(b, 1, 1, 1, generator=self.rng).to(self.device)
            with torch.no_grad(), self._autocast():
                y_hat = self.generator(z_hat)
            with self._autocast():
                loss_d, cstats = critic_loss(self.critic_train, y, y_hat.to(y.dtype), gp_weight=gp_weight,
                                             eps=eps, energy_l2=cfg.energy_l2, gp_batch=cfg.gp_batch or None)
            self._check_finite("critic loss", loss_d)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()

        # Step 2: l_G Langevin steps on the persistent latents of this batch (Eq. 13-14).
        with self._autocast():
            z = langevin_infer(self.generator, y, self.latents[pos], n_steps=cfg.langevin_steps,
                               step_size=cfg.step_size, sigma=cfg.sigma, noise=cfg.langevin_noise, rng=self.rng)
        self._check_finite("latent after Langevin", z)

        # Step 3: generator (Eq. 15 + Eq. 20); one forward pass over [Z_i; Z_hat].
        with self._autocast():
            out = self.gen_train(torch.cat([z, z_hat]) if use_critic else z)
            rec = out[:b].float()
            sq = (y - rec).pow(2).flatten(1).sum(1)
            loss_g = sq.mean() / (2 * cfg.sigma ** 2)
            if use_critic:
                with frozen(self.critic):
                    loss_g = loss_g + cfg.critic_weight * self.critic(out[b:]).float().mean()
        self._check_finite("generator loss", loss_g)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.latents[pos] = z.to(self.latents.dtype)
        self._check_weights_finite()

        mse = sq.detach().mean() / y[0].numel()
        vec = torch.stack([mse, loss_g.detach().float(), loss_d.detach().float(), cstats["energy_real"].float(),
                           cstats["energy_fake"].float(), cstats["gp"].float()])
        vals = self.dist.mean(vec).tolist()
        return dict(zip(HISTORY_KEYS[1:], vals))

    def train(self, iters: Optional[int] = None, progress: bool = True) -> dict:
        """Run iterations until ``iters`` (default ``run.train.iters``) have been done in total.

        Writes checkpoints, pictures and log lines as configured; returns the final metrics (also in
        ``metrics.json``). Raises :class:`NonFiniteLossError` on a NaN / inf (the last checkpoint is kept).
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        total = cfg.iters if iters is None else iters
        if self.run_dir is not None and self.dist.is_main and self.iteration < total:
            os.makedirs(self.run_dir, exist_ok=True)
            ckpt_io.write_text_atomic(self.run.to_json() + "\n", os.path.join(self.run_dir, "config.json"))
        if self.iteration >= total:
            self.log(f"already at iteration {self.iteration} >= {total}: nothing to train")
        else:
            self.log(f"training {self.run.model.name} ({'sparse' if self.run.sparse else 'dense'}, "
                     f"{self.generator.num_parameters():,} generator parameters) on {self.dataset.name}: "
                     f"iterations {self.iteration + 1}..{total}, batch {cfg.batch_size} x {self.dist.world_size} "
                     f"process(es), l_G={cfg.langevin_steps}, sigma={cfg.sigma}, delta={cfg.step_size}")
        bar = tqdm(total=total, initial=self.iteration, disable=not (progress and self.dist.is_main),
                   desc="train", unit="it", dynamic_ncols=True)
        t0, start_iter = time.perf_counter(), self.iteration
        try:
            while self.iteration < total:
                stats = self.step()
                self.iteration += 1
                self.history["iter"].append(self.iteration)
                for k, v in stats.items():
                    self.history[k].append(v)
                bar.update(1)
                bar.set_postfix(mse=f"{stats['recon_mse']:.4f}", refresh=False)
                done = self.iteration == total
                if self.iteration % cfg.log_every == 0 or done:
                    rate = (time.perf_counter() - t0) / max(1, self.iteration - start_iter)
                    self.log(f"iter {self.iteration:6d}/{total} | recon_mse {stats['recon_mse']:.5f} | "
                             f"loss_g {stats['loss_g']:.2f} | loss_d {stats['loss_d']:.3f} | "
                             f"f(Y) {stats['energy_real']:.3f} f(g(Z)) {stats['energy_fake']:.3f} | "
                             f"{rate:.2f} s/it")
                if self.iteration % cfg.ckpt_every == 0 or done:
                    self.save_checkpoint()
                if self.iteration % cfg.sample_every == 0 or done:
                    self.write_pictures()
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        metrics = {"iteration": self.iteration, "recon_mse": self.evaluate_reconstruction(),
                   "seconds": elapsed, "seconds_per_iter": elapsed / max(1, self.iteration - start_iter),
                   "sparse": self.run.sparse, "model": self.run.model.name, "data": self.dataset.name}
        if self.run_dir is not None and self.dist.is_main:
            ckpt_io.write_json_atomic(metrics, os.path.join(self.run_dir, "metrics.json"))
        self.log(f"final reconstruction MSE (images in [-1, 1], {min(self.cfg.eval_examples, len(self.shard))} "
                 f"training examples per process): {metrics['recon_mse']:.5f}")
        return metrics

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, positions: Tensor) -> tuple:
        """``(observed, reconstructed)`` images of this rank's examples at ``positions``, from the bank."""
        y = self.dataset.batch(self.shard[positions])
        with self._autocast():
            rec = self.generator(self.latents[positions])
        return y, rec.float().cpu()

    @torch.no_grad()
    def evaluate_reconstruction(self, n: Optional[int] = None) -> float:
        """Per-pixel MSE (images in [-1, 1]) of ``g(Z_i)`` against ``Y_i`` over the first ``n`` examples of each
        process's shard (default ``eval_examples``), with the latents of the bank; averaged over processes."""
        n = min(n or self.cfg.eval_examples, len(self.shard))
        tot = torch.zeros((), dtype=torch.float64)
        for s in range(0, n, 256):
            y, rec = self.reconstruct(torch.arange(s, min(n, s + 256)))
            tot += (y - rec).double().pow(2).sum()
        mse = tot / (n * self.dataset.images[0].numel())
        return float(self.dist.mean(mse.to(self.device)).item())

    def write_pictures(self) -> dict:
        """Write ``samples.png`` (64 samples from fixed latents), ``reconstructions.png`` (rows of observed
        images, each followed by its reconstruction) and ``loss.png`` to the run directory."""
        if self.run_dir is None or not self.dist.is_main:
            return {}
        from .pictures import save_grid, save_loss_plot

        with torch.no_grad(), self._autocast():
            samples = self.generator(self.z_vis.to(self.device)).float().cpu()
        y, rec = self.reconstruct(torch.arange(min(32, len(self.shard))))
        rows = []
        for s in range(0, y.shape[0], 8):
            rows += [y[s:s + 8], rec[s:s + 8]]
        kind = "sparse" if self.run.sparse else "dense"
        paths = {
            "samples": save_grid(samples, os.path.join(self.run_dir, "samples.png")),
            "reconstructions": save_grid(torch.cat(rows), os.path.join(self.run_dir, "reconstructions.png")),
            "loss": save_loss_plot(self.history, os.path.join(self.run_dir, "loss.png"),
                                   title=f"{self.run.model.name} ({kind}) on {self.dataset.name}"),
        }
        return paths

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (collective under DDP: every rank must call it)."""
        n = len(self.dataset)
        shards = self.dist.gather_objects((self.shard, self.latents.detach().cpu()))
        bank = torch.empty(n, self.generator.z_dim, dtype=self.latents.dtype)
        for idx, lat in shards:
            bank[idx] = lat
        return {
            "format": ckpt_io.FORMAT_VERSION,
            "iteration": self.iteration,
            "run_config": self.run.to_dict(),
            "generator": self.generator.state_dict(),
            "critic": self.critic.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "latents": bank,
            "rng": self.dist.gather_objects(self.rng.get_state()),
            "world_size": self.dist.world_size,
            "history": {k: list(v) for k, v in self.history.items()},
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (the run configs must describe the same model and data size)."""
        saved = RunConfig.from_dict(state["run_config"])
        if saved.model != self.run.model or saved.sparse != self.run.sparse:
            raise ValueError("the checkpoint was written for another model: "
                             f"{saved.model.name} (sparse={saved.sparse}) vs {self.run.model.name} "
                             f"(sparse={self.run.sparse})")
        bank = state["latents"]
        if bank.shape[0] != len(self.dataset):
            raise ValueError(f"the checkpoint's latent bank has {bank.shape[0]} entries but the dataset has "
                             f"{len(self.dataset)} images")
        self.generator.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        for opt, lr in ((self.opt_g, self.cfg.lr_g), (self.opt_d, self.cfg.lr_d)):  # a resume may change them
            for group in opt.param_groups:
                group["lr"] = lr
        self.latents = bank[self.shard].to(self.device, copy=True)
        if state.get("world_size") == self.dist.world_size:
            self.rng.set_state(state["rng"][self.dist.rank])
        else:
            self.rng.manual_seed(derived_seed(self.cfg.seed, "rng", self.dist.rank, "resume", state["iteration"]))
            self.log(f"checkpoint written by {state.get('world_size')} process(es), resuming with "
                     f"{self.dist.world_size}: random draws continue from a fresh seed")
        self.iteration = int(state["iteration"])
        self.history = {k: list(state["history"].get(k, [])) for k in HISTORY_KEYS}

    def save_checkpoint(self) -> Optional[str]:
        """Write the checkpoint of the current iteration to the run directory (atomically, tensors in
        safetensors, the rest in JSON) and remove all but the ``keep_checkpoints`` newest; collective under DDP.
        Refuses (:class:`NonFiniteWeightsError`) to write a non-finite weight, buffer or optimiser state."""
        path = self.checkpoint_path
        if path is None:
            return None
        state = self.state_dict()
        if self.dist.is_main:
            bad = ckpt_io.non_finite(state)
            if bad:
                raise NonFiniteWeightsError(f"non-finite state at iteration {self.iteration} ({bad}): the checkpoint "
                                            f"is not written; {self._kept()}")
            ckpt_io.save(state, self.run_dir, keep=self.cfg.keep_checkpoints)
        self.dist.barrier()
        self.last_checkpoint = path
        return path

    @classmethod
    def resume(cls, run_dir: str, *, iters: Optional[int] = None, dataset: Optional[ImageDataset] = None,
               dist: Optional[DistContext] = None, log: Optional[Callable[[str], None]] = None,
               **train_changes) -> "Trainer":
        """A trainer continuing the run in ``run_dir`` from its newest checkpoint that loads and verifies.

        ``iters`` sets a new total; ``train_changes`` may change the bookkeeping fields of the
        :class:`~sparsegen.model.configs.TrainConfig` (``device``, ``log_every``, ``sample_every``, ``ckpt_every``,
        ``keep_checkpoints``, ``eval_examples``), and ``lr_g``, ``lr_d``, ``step_size``, ``gp_every``,
        ``gp_batch`` (to go on after a divergence or with less memory; the run then no longer continues exactly
        as it would have); anything else is refused. Newer checkpoints that do not load are named in the log and
        renamed to ``*.corrupt``. Raises :class:`~sparsegen.train.checkpoint.NoCheckpointError` when none loads.
        """
        allowed = RESUMABLE - {"iters"}
        bad = sorted(set(train_changes) - allowed)
        if bad:
            raise ValueError(f"cannot change {bad} when resuming (only {sorted(allowed)} and iters)")
        skips: list = []
        state, path, skipped = ckpt_io.load_latest(run_dir, on_skip=skips.append)
        run = RunConfig.from_dict(state["run_config"])
        changes = dict(train_changes)
        if iters is not None:
            changes["iters"] = iters
        if changes:
            run = RunConfig(model=run.model, sparse=run.sparse, data=run.data, train=run.train.replace(**changes))
        trainer = cls(run, dataset, run_dir=run_dir, dist=dist, log=log)
        trainer.load_state_dict(state)
        trainer.last_checkpoint = path
        saved = RunConfig.from_dict(state["run_config"]).train
        for msg in skips:
            trainer.log(f"warning: {msg}")
        trainer.dist.barrier()  # every process has read its checkpoint: the corrupt ones can be moved
        if skipped and trainer.dist.is_main:
            moved = [n for p in skipped for n in ckpt_io.set_aside(p)]
            trainer.log(f"moved aside: {', '.join(os.path.basename(n) for n in moved)}")
        trainer.dist.barrier()
        trainer.log(f"resumed {path} at iteration {trainer.iteration}{trainer._redone_note()}")
        changed = [f"{k} {getattr(saved, k)} -> {getattr(run.train, k)}" for k in sorted(CHANGES_THE_CONTINUATION)
                   if getattr(saved, k) != getattr(run.train, k)]
        if changed:
            trainer.log(f"changed on resume: {', '.join(changed)} (from here on the run differs from the one "
                        "configured)")
        return trainer

    def _redone_note(self) -> str:
        """Which logged iterations beyond the checkpoint an interrupted run had done (and this one redoes)."""
        if self.run_dir is None:
            return ""
        last = 0
        try:
            with open(os.path.join(self.run_dir, "log.txt"), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("resumed "):
                        last = 0  # iterations logged before an earlier resume were redone by it
                    elif line.startswith("iter "):
                        try:
                            last = max(last, int(line.split()[1].split("/")[0]))
                        except (IndexError, ValueError):
                            pass
        except OSError:
            return ""
        if last > self.iteration:
            return (f" (the log lines of iterations {self.iteration + 1}..{last} above are from the interrupted run; "
                    "those iterations are done again)")
        return ""


def load_run(path: str, device: Union[str, torch.device] = "cpu",
             on_skip: Optional[Callable[[str], None]] = None) -> LoadedRun:
    """Read a trained run: ``path`` is a run directory (its newest checkpoint that loads and verifies; each newer
    one skipped is reported to ``on_skip``, default: a :class:`~sparsegen.train.checkpoint.CheckpointWarning`) or a checkpoint file.

    Returns a :class:`LoadedRun` with the generator and critic (eval mode, on ``device``), the run config,
    the latent bank and the iteration. Raises ``FileNotFoundError`` or
    :class:`~sparsegen.train.checkpoint.CheckpointError` (a ``ValueError``), with a one-line message, when
    nothing loads. Nothing is unpickled (a checkpoint of the previous format is read with ``weights_only=True``).
    """
    if on_skip is None:
        def on_skip(msg):
            warnings.warn(msg, ckpt_io.CheckpointWarning, stacklevel=3)
    if os.path.isdir(path):
        state, file, _ = ckpt_io.load_latest(path, on_skip=on_skip)
    else:
        state, file = ckpt_io.load_file(path), path
    try:
        run = RunConfig.from_dict(state["run_config"])
        g = SparseGenerator(run.model, sparse=run.sparse)
        g.load_state_dict(state["generator"])
        c = EnergyCritic(run.model)
        c.load_state_dict(state["critic"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ckpt_io.CheckpointError(f"{file}: does not describe a model this version builds: "
                                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return LoadedRun(g.to(device).eval(), c.to(device).eval(), run, state["latents"], int(state["iteration"]), file)
