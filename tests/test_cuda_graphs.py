"""No host synchronisation on the sparse generator's GPU paths.

(a)-(c) capture one forward, one Langevin step (d/dZ with the generator frozen) and one generator training step
(forward + backward into pre-allocated gradients) of the sparse "tiny16" generator in a CUDA graph, replay it on
new inputs copied into the static input tensors, and compare with the same computation run eagerly. A capture
fails if anything in the step waits for the device (``.item()``, ``torch.unique``, ``nonzero``, a copy to the
host) or creates a tensor on the CPU from device data. (d) runs an eager forward + backward of "paper64" under
``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising CUDA call.

Each runs under both GPU providers (``sparsegen_kernels.set_backend("triton" | "cuda")``) in float32 and
bfloat16. All tests are marked ``gpu`` and skipped without a CUDA device.
"""
import copy
import functools

import pytest
import torch

import sparsegen
from conftest import GPU_BACKENDS, gpu_backend
from sparsegen.train.langevin import langevin_infer

pytestmark = pytest.mark.gpu

DEV = "cuda"
BATCH = 4
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]
LANGEVIN = dict(n_steps=1, step_size=0.1, sigma=0.3, noise=False)
# Replay and eager run the same kernels on the same inputs. They agree bit for bit except where a kernel sums
# in a varying order (float atomics in the scatter strategies, cuDNN's choice of algorithm), which changes the
# last bits of float32 and at most an ulp or so of bfloat16 results: the allowed difference, relative to the
# largest magnitude of the eager result.
REPLAY_TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -6}


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    """Each GPU provider in turn (skipped where it cannot run), restored afterwards."""
    with gpu_backend(request.param):
        yield request.param


@functools.lru_cache(maxsize=None)
def _cpu_generator(config):
    torch.manual_seed(0)
    return sparsegen.SparseGenerator(config, sparse=True, use_kernels=True)


def make_generator(config, dtype):
    """A sparse generator with the kernels on, built (seeded) on the CPU once per config, then a copy of it
    moved to the GPU in ``dtype``."""
    return copy.deepcopy(_cpu_generator(config)).to(device=DEV, dtype=dtype)


def capture(step, warmup=3):
    """Run ``step()`` ``warmup`` times on a side stream (kernel compilation, cuDNN/cuBLAS set-up, lazily
    allocated state such as parameter gradients), then capture one call into a CUDA graph.

    Returns ``(graph, outputs)``: ``outputs`` are the captured call's results, rewritten by every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    torch.cuda.synchronize()
    return graph, outputs


def assert_replay_matches(replayed, eager, what, dtype):
    """``max |replayed - eager| <= REPLAY_TOL[dtype] * max |eager|`` (``dtype``: the model's precision)."""
    assert replayed.shape == eager.shape and replayed.dtype == eager.dtype, what
    a, b = replayed.float(), eager.float()
    assert torch.isfinite(b).all(), f"{what}: the eager result is not finite"
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    limit = REPLAY_TOL[dtype] * max(scale, 1e-30)
    assert diff <= limit, (f"{what}: replay differs from eager by {diff:.3e} (largest eager magnitude {scale:.3e}, "
                           f"allowed {limit:.3e}, {dtype})")


def reconstruction_loss(gen, z, images):
    """The generator's reconstruction term (Eq. 15 up to constants), accumulated in float32."""
    r = (images - gen(z)).flatten(1).float()
    return (r ** 2).sum(1).mean() / (2 * LANGEVIN["sigma"] ** 2)


# ---------------------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_replays_in_a_cuda_graph(backend, dtype):
    gen = make_generator("tiny16", dtype)
    z = torch.randn(BATCH, gen.z_dim, device=DEV, dtype=dtype)  # static input

    def step():
        with torch.no_grad():
            return gen(z)

    graph, images = capture(step)
    for _ in range(2):
        fresh = torch.randn(BATCH, gen.z_dim, device=DEV, dtype=dtype)
        z.copy_(fresh)
        graph.replay()
        replayed = images.clone()
        with torch.no_grad():
            eager = gen(fresh)
        assert_replay_matches(replayed, eager, f"forward ({backend}, {dtype})", dtype)


# ---------------------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("dtype", DTYPES)
def test_langevin_step_replays_in_a_cuda_graph(backend, dtype):
    gen = make_generator("tiny16", dtype)
    images = torch.rand(BATCH, *gen.image_shape, device=DEV, dtype=dtype) * 2 - 1  # static inputs
    z = torch.randn(BATCH, gen.z_dim, device=DEV, dtype=dtype)

    graph, z_next = capture(lambda: langevin_infer(gen, images, z, **LANGEVIN))
    assert all(p.grad is None for p in gen.parameters()), "a Langevin step formed a weight gradient"
    assert all(p.requires_grad for p in gen.parameters()), "langevin_infer left the generator's parameters frozen"
    for _ in range(2):
        new_images = torch.rand(BATCH, *gen.image_shape, device=DEV, dtype=dtype) * 2 - 1
        new_z = torch.randn(BATCH, gen.z_dim, device=DEV, dtype=dtype)
        images.copy_(new_images)
        z.copy_(new_z)
        graph.replay()
        replayed = z_next.clone()
        eager = langevin_infer(gen, new_images, new_z, **LANGEVIN)
        assert not torch.equal(eager, new_z), "the Langevin step did not move the latents"
        assert_replay_matches(replayed, eager, f"Langevin step ({backend}, {dtype})", dtype)


# ---------------------------------------------------------------------------------------------------------- (c)
@pytest.mark.parametrize("dtype", DTYPES)
def test_generator_training_step_replays_in_a_cuda_graph(backend, dtype):
    gen = make_generator("tiny16", dtype)
    params = list(gen.parameters())
    images = torch.rand(BATCH, *gen.image_shape, device=DEV, dtype=dtype) * 2 - 1  # static inputs
    z = torch.randn(BATCH, gen.z_dim, device=DEV, dtype=dtype)
    optimizer = torch.optim.SGD(params, lr=0.0)  # only its zero_grad is used

    def step():
        # Static gradients: the first warm-up call allocates them; from then on they are zeroed in place and
        # backward accumulates into the same tensors (inside the graph too).
        optimizer.zero_grad(set_to_none=False)
        loss = reconstruction_loss(gen, z, images)
        loss.backward()
        return loss.detach()

    graph, loss = capture(step)
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads), "a parameter got no gradient"
    for _ in range(2):
        new_images = torch.rand(BATCH, *gen.image_shape, device=DEV, dtype=dtype) * 2 - 1
        new_z = torch.randn(BATCH, gen.z_dim, device=DEV, dtype=dtype)
        images.copy_(new_images)
        z.copy_(new_z)
        graph.replay()
        assert all(p.grad is g for p, g in zip(params, grads))
        replayed_loss, replayed = loss.clone(), [g.clone() for g in grads]

        optimizer.zero_grad(set_to_none=False)
        eager_loss = reconstruction_loss(gen, new_z, new_images)
        eager_loss.backward()
        assert_replay_matches(replayed_loss, eager_loss.detach(), f"loss ({backend}, {dtype})", dtype)
        for (name, p), r in zip(gen.named_parameters(), replayed):
            assert p.grad.abs().max().item() > 0, f"{name}: zero gradient"
            assert_replay_matches(r, p.grad, f"grad {name} ({backend}, {dtype})", dtype)


# ---------------------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paper64_forward_backward_never_synchronises(backend, dtype):
    gen = make_generator("paper64", dtype)
    z = torch.randn(2, gen.z_dim, device=DEV, dtype=dtype, requires_grad=True)
    images = torch.rand(2, *gen.image_shape, device=DEV, dtype=dtype) * 2 - 1

    def step():
        reconstruction_loss(gen, z, images).backward()

    step()  # first call: kernel compilation, library handles, allocator growth
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # raises RuntimeError at the first synchronising CUDA call
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(z.grad.float()).all() and z.grad.abs().max().item() > 0
    assert all(p.grad is not None for p in gen.parameters())
