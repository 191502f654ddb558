"""The gradient penalty's memory settings: gp_every (lazy, StyleGAN2-style) and gp_batch (a sub-batch).

The defaults compute exactly what the trainer computed before these settings existed (the reference below is
that version of ``critic_loss``, verbatim); gp_every=N puts the penalty, N times heavier, on iterations N, 2N, ...
and nothing on the others; gp_batch=M takes it on the first M examples; resume stays bit-exact with both set,
on one process and (gp_batch's second forward pass) under DDP.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsegen import RunConfig, TrainConfig, Trainer
from sparsegen.data import make_parts
from sparsegen.model.configs import ConfigError
from sparsegen.model.critic import EnergyCritic, critic_loss
from sparsegen.train import trainer as trainer_module

DATA = make_parts(24, 16, seed=0)
KEYS = ("generator", "critic", "opt_g", "opt_d", "latents", "rng", "history", "iteration")


def run_config(**train):
    base = dict(iters=4, batch_size=8, langevin_steps=2, lr_g=1e-3, lr_d=1e-3, log_every=100, sample_every=100,
                ckpt_every=100, eval_examples=24)
    base.update(train)
    return RunConfig(model="tiny16", data="parts:n=24", train=TrainConfig(**base))


def silent(_msg):
    pass


def states_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


def critic_loss_before(critic, real, fake, *, gp_weight=10.0, eps=None, energy_l2=0.0):
    """``critic_loss`` as it was before gp_every / gp_batch (verbatim): the reference of the defaults."""
    n = real.shape[0]
    parts = [real, fake.detach()]
    if gp_weight > 0:
        if eps is None:
            raise ValueError("critic_loss needs eps [N, 1, 1, 1] when gp_weight > 0")
        x = (eps * real + (1 - eps) * fake.detach()).detach().requires_grad_(True)
        parts.append(x)
    with torch.enable_grad():
        f = critic(torch.cat(parts))
        f_real, f_fake = f[:n], f[n:2 * n]
        loss = f_real.mean() - f_fake.mean()
        gp = torch.zeros((), device=real.device)
        if gp_weight > 0:
            (g,) = torch.autograd.grad(f[2 * n:].sum(), x, create_graph=True)
            gp = ((g.float().flatten(1).norm(dim=1) - 1) ** 2).mean()
            loss = loss + gp_weight * gp
        if energy_l2 > 0:
            loss = loss + energy_l2 * (f_real.float() ** 2).mean()
    stats = {"energy_real": f_real.mean().detach(), "energy_fake": f_fake.mean().detach(), "gp": gp.detach()}
    return loss, stats


def spy_on_critic_loss(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append({"gp_weight": kwargs["gp_weight"], "gp_batch": kwargs.get("gp_batch")})
        return critic_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "critic_loss", spy)
    return calls


def test_the_defaults_compute_exactly_what_the_trainer_computed_before(monkeypatch):
    new = Trainer(run_config(), DATA, log=silent)
    new.train(progress=False)

    def before(*args, gp_batch=None, **kwargs):
        assert gp_batch is None
        return critic_loss_before(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "critic_loss", before)
    old = Trainer(run_config(), DATA, log=silent)
    old.train(progress=False)
    assert new.history == old.history and all(v > 0 for v in new.history["gp"])  # the losses, bit for bit
    a, b = new.state_dict(), old.state_dict()
    for key in KEYS:
        assert states_equal(a[key], b[key]), key


def test_gp_every_puts_the_penalty_n_times_heavier_on_every_nth_iteration(monkeypatch):
    calls = spy_on_critic_loss(monkeypatch)
    trainer = Trainer(run_config(iters=6, gp_every=3), DATA, log=silent)
    trainer.train(progress=False)
    assert [c["gp_weight"] for c in calls] == [0.0, 0.0, 30.0, 0.0, 0.0, 30.0]
    gp = trainer.history["gp"]
    assert gp[2] > 0 and gp[5] > 0 and gp[0] == gp[1] == gp[3] == gp[4] == 0.0
    # what a weight of 30 means: the loss is the unpenalised one plus 30 times the penalty
    critic = EnergyCritic("tiny16")
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1, torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    eps = torch.rand(6, 1, 1, 1, generator=g)
    with_gp, stats = critic_loss(critic, real, fake, gp_weight=30.0, eps=eps, energy_l2=1e-3)
    without, stats0 = critic_loss(critic, real, fake, gp_weight=0.0, eps=eps, energy_l2=1e-3)
    assert float(stats0["gp"]) == 0.0 and float(stats["gp"]) > 0
    torch.testing.assert_close(with_gp, without + 30.0 * stats["gp"], rtol=1e-6, atol=1e-6)


def test_gp_batch_takes_the_penalty_on_the_first_m_examples(monkeypatch):
    critic = EnergyCritic("tiny16").double()
    g = torch.Generator().manual_seed(2)
    real = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    fake = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.rand(6, 1, 1, 1, generator=g, dtype=torch.float64)
    loss, stats = critic_loss(critic, real, fake, gp_weight=10.0, eps=eps, gp_batch=2)
    x = (eps[:2] * real[:2] + (1 - eps[:2]) * fake[:2]).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x)
    gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(stats["gp"].double(), gp, rtol=1e-5, atol=1e-6)  # the penalty's norm is float32
    f = critic(torch.cat([real, fake]))
    torch.testing.assert_close(loss, f[:6].mean() - f[6:].mean() + 10.0 * gp, rtol=1e-5, atol=1e-5)
    # examples from the third on do not enter the penalty
    real2, fake2 = real.clone(), fake.clone()
    real2[2:] = 0.5
    fake2[2:] = -0.5
    assert torch.equal(critic_loss(critic, real2, fake2, gp_weight=10.0, eps=eps, gp_batch=2)[1]["gp"], stats["gp"])
    # the gradients reach the critic's weights from both passes (the last bias cancels out of Eq. 21)
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in critic.named_parameters()
               if n != "fc.bias")
    # and the trainer hands gp_batch on
    calls = spy_on_critic_loss(monkeypatch)
    Trainer(run_config(iters=1, gp_batch=3), DATA, log=silent).train(progress=False)
    assert calls == [{"gp_weight": 10.0, "gp_batch": 3}]
    with pytest.raises(ConfigError, match="gp_batch = 9 is invalid: expected at most batch_size = 8"):
        TrainConfig(batch_size=8, gp_batch=9)
    with pytest.raises(ConfigError, match="gp_every = 0 is invalid"):
        TrainConfig(gp_every=0)


def test_resume_is_bit_exact_with_gp_every_and_gp_batch(tmp_path):
    cfg = dict(gp_every=3, gp_batch=4, ckpt_every=1)
    straight = Trainer(run_config(iters=5, **cfg), DATA, log=silent)
    straight.train(progress=False)
    first = Trainer(run_config(iters=2, **cfg), DATA, run_dir=str(tmp_path / "b"), log=silent)
    first.train(progress=False)
    resumed = Trainer.resume(str(tmp_path / "b"), iters=5, dataset=DATA, log=silent)  # a penalty at 3, not at 4, 5
    resumed.train(progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    for key in KEYS:
        assert states_equal(a[key], b[key]), key
    assert [v > 0 for v in a["history"]["gp"]] == [False, False, True, False, False]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, run_dir, result_dir):
    from sparsegen.train.distributed import init_distributed, shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        trainer = Trainer(run_config(iters=2, batch_size=4, gp_batch=2, gp_every=2, ckpt_every=1),
                          make_parts(24, 16), run_dir=run_dir, dist=ctx, log=silent)
        trainer.train(progress=False)
        torch.save({"generator": trainer.generator.state_dict(), "critic": trainer.critic.state_dict(),
                    "history": trainer.history}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        shutdown()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_gp_batch_under_ddp_keeps_the_ranks_equal(tmp_path):
    run_dir, res = str(tmp_path / "run"), str(tmp_path / "res")
    os.makedirs(res)
    mp.spawn(_ddp_worker, args=(2, _free_port(), run_dir, res), nprocs=2, join=True)
    r = [torch.load(os.path.join(res, f"rank{i}.pt")) for i in range(2)]
    for part in ("generator", "critic"):  # gradients of both forward passes averaged over the ranks
        for k, v in r[0][part].items():
            assert torch.equal(v, r[1][part][k]), (part, k)
    assert r[0]["history"]["gp"][0] == 0.0 and r[0]["history"]["gp"][1] > 0
