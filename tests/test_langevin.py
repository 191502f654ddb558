"""Langevin inference (Eq. 13-14) against a linear-Gaussian generator whose posterior is known exactly.

For g(z) = A z + b, Y = g(Z) + eps, eps ~ N(0, sigma^2 I), Z ~ N(0, I):
p(Z | Y) = N(mu, Sigma), Sigma = (I + A^T A / sigma^2)^-1, mu = Sigma A^T (Y - b) / sigma^2.
"""
import math

import pytest
import torch
from torch import nn

from sparsegen import SparseGenerator
from sparsegen.train.langevin import frozen, langevin_infer, log_joint

D, d, SIGMA = 6, 3, 0.5


class Linear(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(0.3 * torch.randn(D, d, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, z):
        return z @ self.A.T + self.b


def posterior(gen, y):
    A, b = gen.A.detach(), gen.b.detach()
    precision = torch.eye(d, dtype=torch.float64) + A.T @ A / SIGMA ** 2
    cov = torch.linalg.inv(precision)
    mu = (y - b) @ A @ cov / SIGMA ** 2  # [..., d] for y [..., D]
    return mu, cov, precision


def test_log_joint_is_eq14():
    gen = Linear()
    y = torch.randn(2, D, dtype=torch.float64)
    z = torch.randn(2, d, dtype=torch.float64)
    expected = -((y - gen(z)) ** 2).sum(1) / (2 * SIGMA ** 2) - (z ** 2).sum(1) / 2
    torch.testing.assert_close(log_joint(gen, y, z, SIGMA), expected, rtol=0, atol=1e-12)


def test_noise_free_dynamics_reach_the_posterior_mode():
    gen = Linear()
    y = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mu, _, precision = posterior(gen, y)
    lam_max = torch.linalg.eigvalsh(precision).max().item()
    delta = math.sqrt(2 * 0.5 / lam_max)  # (delta^2 / 2) * lam_max = 0.5: a contraction
    z = langevin_infer(gen, y, torch.zeros(4, d, dtype=torch.float64), n_steps=400, step_size=delta, sigma=SIGMA,
                       noise=False)
    torch.testing.assert_close(z, mu, rtol=0, atol=1e-10)


def test_noisy_chains_sample_the_posterior_mean_and_covariance():
    gen = Linear()
    y = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mu, cov, precision = posterior(gen, y)
    lam = torch.linalg.eigvalsh(precision)
    h = 0.04 / lam.max().item()  # step h = delta^2 / 2: discretisation bias of the variances <= 2 %
    chains = 5000
    steps = int(8 / (h * lam.min().item()))  # ~8 relaxation times of the slowest direction
    z = langevin_infer(gen, y.expand(chains, D), torch.zeros(chains, d, dtype=torch.float64), n_steps=steps,
                       step_size=math.sqrt(2 * h), sigma=SIGMA, rng=torch.Generator().manual_seed(3))
    se = (cov.diagonal() / chains).sqrt()
    assert ((z.mean(0) - mu).abs() <= 4 * se).all(), (z.mean(0), mu)
    # sample covariance: relative standard error sqrt(2 / chains) = 2 %, plus the <= 2 % bias
    emp_cov = torch.cov(z.T)
    assert ((emp_cov - cov).abs() <= 0.08 * cov.diagonal().max()).all(), (emp_cov, cov)
    assert ((emp_cov.diagonal() / cov.diagonal() - 1).abs() < 0.08).all(), (emp_cov.diagonal(), cov.diagonal())


def test_no_weight_gradients_and_flags_restored():
    gen = Linear()
    y = torch.randn(3, D, dtype=torch.float64)
    z0 = torch.randn(3, d, dtype=torch.float64)
    seen = []
    gen.A.register_hook(lambda g: seen.append(g))  # would fire if a gradient reached the weight
    with torch.no_grad():  # works where autograd is off, too
        z = langevin_infer(gen, y, z0, n_steps=5, step_size=0.1, sigma=SIGMA)
    assert not z.requires_grad and z.shape == z0.shape
    assert not seen and gen.A.grad is None and gen.b.grad is None
    assert gen.A.requires_grad and gen.b.requires_grad
    assert not torch.equal(z, z0)


def test_frozen_restores_flags_after_an_error():
    gen = Linear()
    gen.b.requires_grad_(False)
    with pytest.raises(RuntimeError):
        with frozen(gen):
            assert not gen.A.requires_grad
            raise RuntimeError("boom")
    assert gen.A.requires_grad and not gen.b.requires_grad


def test_same_rng_same_chain_and_starting_latents_untouched():
    gen = Linear()
    y = torch.randn(5, D, dtype=torch.float64)
    z0 = torch.randn(5, d, dtype=torch.float64)
    keep = z0.clone()
    a = langevin_infer(gen, y, z0, n_steps=10, step_size=0.1, sigma=SIGMA, rng=torch.Generator().manual_seed(7))
    b = langevin_infer(gen, y, z0, n_steps=10, step_size=0.1, sigma=SIGMA, rng=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(z0, keep)


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_generator_posterior_mode_search_improves_fit(sparse):
    torch.manual_seed(0)
    g = SparseGenerator("tiny16", sparse=sparse).double()
    z_true = torch.randn(4, g.z_dim, dtype=torch.float64)
    with torch.no_grad():
        y = g(z_true)
    # A random start: z = 0 is a stationary point (every ReLU input is the bias alone, often <= 0).
    z0 = 0.1 * torch.randn_like(z_true)
    z = langevin_infer(g, y, z0, n_steps=30, step_size=0.05, sigma=0.3, noise=False)
    assert (log_joint(g, y, z, 0.3) > log_joint(g, y, z0, 0.3)).all()
    assert all(p.grad is None for p in g.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_steps=-1), "n_steps"), (dict(n_steps=1.5), "n_steps"), (dict(step_size=0.0), "step_size"),
    (dict(sigma=-1.0), "sigma"),
])
def test_bad_arguments(kwargs, match):
    gen = Linear()
    args = dict(n_steps=1, step_size=0.1, sigma=SIGMA)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        langevin_infer(gen, torch.zeros(2, D, dtype=torch.float64), torch.zeros(2, d, dtype=torch.float64), **args)


def test_shape_mismatch():
    gen = Linear()
    with pytest.raises(ValueError, match="z must be"):
        langevin_infer(gen, torch.zeros(2, D), torch.zeros(3, d), n_steps=1, step_size=0.1, sigma=1.0)
    with pytest.raises(ValueError, match="shape"):
        langevin_infer(gen, torch.zeros(2, D + 1, dtype=torch.float64), torch.zeros(2, d, dtype=torch.float64),
                       n_steps=1, step_size=0.1, sigma=1.0)
