"""Algorithm 1's loss terms, checked for sign and makeup.

* A fixed critic whose energy is the mean pixel value, with the reconstruction term made negligible: the
  generator step (Eq. 20) must lower the energy of syntheses, i.e. the mean of ``g(z)`` must go down.
* One ``Trainer.step()`` on tiny16 against a hand computation of every term (Eq. 15, 20, 21, the gradient
  penalty and the energy L2) from a copy of the models taken before the step, in float64: the returned
  statistics and the gradients each optimiser receives.
"""
import copy

import pytest
import torch
from torch import nn

from sparsegen import RunConfig, TrainConfig, Trainer
from sparsegen.data import make_parts

F64 = torch.float64
DATA = make_parts(48, 16, seed=0)


def silent(_msg):
    pass


def run_config(sparse=True, **train):
    base = dict(iters=10, batch_size=12, langevin_steps=2, lr_g=1e-3, lr_d=1e-3, log_every=100, sample_every=100,
                ckpt_every=100, eval_examples=48)
    base.update(train)
    return RunConfig(model="tiny16", sparse=sparse, data="parts:n=48", train=TrainConfig(**base))


class MeanPixelEnergy(nn.Module):
    """``f(y) = scale * mean(y)`` per image; ``scale`` is a parameter only so that the critic step has
    something to differentiate (with a learning rate near 0 it stays at 1)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, y):
        return self.scale * y.flatten(1).mean(1)


@pytest.mark.parametrize("sparse", [True, False])
def test_generator_step_lowers_the_energy_of_syntheses(sparse):
    # sigma huge: the reconstruction term (Eq. 15) is ~1e-8 of the critic term, so Eq. 20 alone drives g.
    run = run_config(sparse, sigma=1e4, gp_weight=0.0, energy_l2=0.0, lr_d=1e-12, critic_weight=1.0)
    trainer = Trainer(run, DATA, log=silent)
    critic = MeanPixelEnergy()
    trainer.critic = trainer.critic_train = critic
    trainer.opt_d = torch.optim.Adam(critic.parameters(), lr=run.train.lr_d)
    z = torch.randn(32, trainer.generator.z_dim, generator=torch.Generator().manual_seed(123))

    def mean_pixel():
        with torch.no_grad():
            return trainer.generator(z).mean().item()

    before = mean_pixel()
    means = [before]
    for _ in range(5):
        trainer.step()
        means.append(mean_pixel())
    assert critic.scale.item() == pytest.approx(1.0, abs=1e-9)  # the critic stayed fixed
    # Eq. 20: the generator lowers f(g(Z)) = mean pixel; every step must push the mean down.
    assert all(b < a for a, b in zip(means, means[1:])), means
    assert means[-1] < before - 0.01, means


def _grads_at_step(opt, store, key):
    """Make ``opt.step`` record the gradients it is about to apply."""
    original = opt.step

    def step(*args, **kwargs):
        store[key] = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for group in opt.param_groups for p in group["params"]]
        return original(*args, **kwargs)

    opt.step = step


@pytest.mark.parametrize("sparse", [True, False])
def test_one_step_matches_a_hand_computation(sparse):
    sigma, cw, gp_w, l2 = 10.0, 1.5, 10.0, 0.05
    run = run_config(sparse, sigma=sigma, critic_weight=cw, gp_weight=gp_w, energy_l2=l2)
    trainer = Trainer(run, DATA, log=silent)
    with torch.no_grad():  # energies far from 0 with a sizeable gradient: every term weighs in
        trainer.critic.fc.weight.mul_(30.0)
        trainer.critic.fc.bias.fill_(0.7)
    g0 = copy.deepcopy(trainer.generator).to(F64)
    c0 = copy.deepcopy(trainer.critic).to(F64)
    rng_state = trainer.rng.get_state()
    pos = trainer.batch_positions(0)
    y = DATA.batch(trainer.shard[pos]).to(F64)
    b = y.shape[0]
    grads = {}
    _grads_at_step(trainer.opt_g, grads, "g")
    _grads_at_step(trainer.opt_d, grads, "d")

    stats = trainer.step()

    # The draws of the step, replayed: Z_hat ~ N(0, I), then the gradient-penalty mixing weights.
    rng = torch.Generator()
    rng.set_state(rng_state)
    z_hat = torch.randn(b, g0.z_dim, generator=rng).to(F64)
    eps = torch.rand(b, 1, 1, 1, generator=rng).to(F64)
    z = trainer.latents[pos].to(F64)  # the latents after Langevin, used by the generator step
    c1 = copy.deepcopy(trainer.critic).to(F64)  # the critic after its step: the one the generator step sees

    # Critic step (Eq. 21): f(Y) - f(g(Z_hat)) + WGAN-GP + energy L2, minimised over Phi.
    c_params = list(c0.parameters())
    with torch.no_grad():
        y_hat = g0(z_hat)
    f_real, f_fake = c0(y), c0(y_hat)
    x = (eps * y + (1 - eps) * y_hat).requires_grad_(True)
    (gx,) = torch.autograd.grad(c0(x).sum(), x, create_graph=True)
    gp = ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss_d = f_real.mean() - f_fake.mean() + gp_w * gp + l2 * (f_real ** 2).mean()
    grad_d = torch.autograd.grad(loss_d, c_params)

    # Generator step: ||Y - g(Z)||^2 / (2 sigma^2) (Eq. 15) + critic_weight * f(g(Z_hat)) (Eq. 20).
    g_params = list(g0.parameters())
    sq = (y - g0(z)).pow(2).flatten(1).sum(1)
    recon = sq.mean() / (2 * sigma ** 2)
    energy = c1(g0(z_hat)).mean()
    loss_g = recon + cw * energy
    grad_g = torch.autograd.grad(loss_g, g_params)

    # Every term must matter at the tolerance used, or a wrong sign could hide.
    assert abs(cw * energy.item()) > 0.2 * abs(recon.item()) and abs(energy.item()) > 0.1
    assert abs(f_real.mean().item()) > 0.1 and abs(f_fake.mean().item()) > 0.1 and gp.item() > 0.1

    expected = {"recon_mse": sq.mean().item() / y[0].numel(), "loss_g": loss_g.item(), "loss_d": loss_d.item(),
                "energy_real": f_real.mean().item(), "energy_fake": f_fake.mean().item(), "gp": gp.item()}
    for k, v in expected.items():
        assert stats[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (k, stats[k], v)

    assert len(grads["d"]) == len(grad_d) and len(grads["g"]) == len(grad_g)
    names_d = [n for n, _ in c0.named_parameters()]
    for n, got, want in zip(names_d, grads["d"], grad_d):
        torch.testing.assert_close(got.to(F64), want, rtol=1e-3, atol=1e-5, msg=f"critic grad {n}")
    names_g = [n for n, _ in g0.named_parameters()]
    for n, got, want in zip(names_g, grads["g"], grad_g):
        torch.testing.assert_close(got.to(F64), want, rtol=1e-3, atol=1e-5, msg=f"generator grad {n}")
