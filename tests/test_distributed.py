"""Data-parallel training with DDP on the gloo backend, 2 CPU processes, each owning its latent shard."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsegen import RunConfig, TrainConfig, Trainer
from sparsegen.data import make_parts
from sparsegen.train import checkpoint as ckpt_io
from sparsegen.train.distributed import DistContext, init_distributed, shutdown

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(iters=3):
    return RunConfig(model="tiny16", data="parts:n=24", train=TrainConfig(
        iters=iters, batch_size=4, langevin_steps=2, ckpt_every=3, sample_every=100, log_every=100))


def _worker(rank, world, port, run_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        assert ctx.enabled and ctx.world_size == world and ctx.rank == rank and ctx.backend == "gloo"
        trainer = Trainer(run_config(), make_parts(24, 16), run_dir=run_dir, dist=ctx, log=lambda m: None)
        assert isinstance(trainer.gen_train, torch.nn.parallel.DistributedDataParallel)
        init = trainer.latents.clone()
        init_weights = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
        trainer.train(progress=False)
        torch.save({"shard": trainer.shard, "init": init, "latents": trainer.latents, "init_weights": init_weights,
                    "generator": trainer.generator.state_dict(), "critic": trainer.critic.state_dict(),
                    "history": trainer.history},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        shutdown()


def test_two_processes_on_gloo(tmp_path):
    run_dir, result_dir = str(tmp_path / "run"), str(tmp_path / "res")
    os.makedirs(result_dir)
    mp.spawn(_worker, args=(2, free_port(), run_dir, result_dir), nprocs=2, join=True)
    r = [torch.load(os.path.join(result_dir, f"rank{i}.pt")) for i in range(2)]
    # each rank owns every other example and its latents
    assert r[0]["shard"].tolist() == list(range(0, 24, 2)) and r[1]["shard"].tolist() == list(range(1, 24, 2))
    for res in r:  # 3 iterations x 4 examples: each rank's 12 latents were all refined by Langevin
        assert (res["latents"] != res["init"]).any(1).all()
    # gradients were averaged: both ranks hold the same, trained, weights
    for k, v in r[0]["generator"].items():
        assert torch.equal(v, r[1]["generator"][k]), k
    assert any(not torch.equal(v, r[0]["init_weights"][k]) for k, v in r[0]["generator"].items())
    for k, v in r[0]["critic"].items():
        assert torch.equal(v, r[1]["critic"][k]), k
    assert r[0]["history"] == r[1]["history"]  # statistics averaged over ranks
    # the checkpoint holds the whole bank, gathered from both ranks
    state = ckpt_io.load(run_dir)  # its newest checkpoint
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    for res in r:
        assert torch.equal(state["latents"][res["shard"]], res["latents"])
    # ... so one process can carry on from it
    trainer = Trainer.resume(run_dir, iters=4, dataset=make_parts(24, 16), log=lambda m: None)
    assert torch.equal(trainer.latents, state["latents"])
    trainer.train(progress=False)
    assert trainer.iteration == 4


def test_single_process_context():
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main and ctx.all_true(True) and not ctx.all_true(False)
    assert ctx.shard(5).tolist() == [0, 1, 2, 3, 4]
    m = torch.nn.Linear(2, 2)
    assert ctx.wrap(m) is m and ctx.gather_objects(3) == [3]


def test_torchrun_cli(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sparsegen", "train", "--config", "tiny16", "--data", "parts:n=16", "--batch-size", "4",
           "--langevin-steps", "1", "--iters", "2", "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("final reconstruction MSE:") == 1  # printed by rank 0 only
    assert "x 2 process(es)" in (out / "log.txt").read_text()
    assert ckpt_io.load(out)["latents"].shape == (16, 8)
