"""Algorithm 1 trainer: learning, sparse and dense, exact resume, atomic checkpoints, non-finite stops."""
import json
import os

import pytest
import torch
from PIL import Image

from sparsegen import NonFiniteLossError, RunConfig, TrainConfig, Trainer, load_run
from sparsegen.data import make_parts
from sparsegen.train import checkpoint as ckpt_io

DATA = make_parts(48, 16, seed=0)


def run_config(sparse=True, **train):
    base = dict(iters=4, batch_size=12, langevin_steps=3, lr_g=1e-3, lr_d=1e-3, log_every=100, sample_every=100,
                ckpt_every=100, eval_examples=48)
    base.update(train)
    return RunConfig(model="tiny16", sparse=sparse, data="parts:n=48", train=TrainConfig(**base))


def silent(_msg):
    pass


@pytest.mark.parametrize("sparse", [True, False])
def test_a_short_run_lowers_the_reconstruction_error(sparse):
    trainer = Trainer(run_config(sparse, iters=40, langevin_steps=5), DATA, log=silent)
    before = trainer.evaluate_reconstruction()
    metrics = trainer.train(progress=False)
    assert metrics["iteration"] == 40
    assert metrics["recon_mse"] < 0.6 * before, (before, metrics["recon_mse"])
    h = trainer.history
    assert len(h["recon_mse"]) == 40
    assert sum(h["recon_mse"][-5:]) < sum(h["recon_mse"][:5])
    assert all(v == v for v in h["loss_d"])  # critic trained, finite


def test_plain_abp_without_the_critic_trains():
    trainer = Trainer(run_config(critic_weight=0.0, iters=20), DATA, log=silent)
    before = trainer.evaluate_reconstruction()
    critic_before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    assert trainer.train(progress=False)["recon_mse"] < before
    assert all(torch.equal(v, trainer.critic.state_dict()[k]) for k, v in critic_before.items())


def test_langevin_updates_only_the_batch_latents():
    trainer = Trainer(run_config(), DATA, log=silent)
    bank = trainer.latents.clone()
    pos = trainer.batch_positions(0)
    trainer.step()
    changed = (trainer.latents != bank).any(1)
    assert changed[pos].all() and changed.sum() == len(pos)


def test_epochs_visit_every_example_once():
    trainer = Trainer(run_config(), DATA, log=silent)
    seen = torch.cat([trainer.batch_positions(t) for t in range(trainer.iters_per_epoch)])
    assert sorted(seen.tolist()) == list(range(48))
    assert not torch.equal(trainer.batch_positions(0), trainer.batch_positions(trainer.iters_per_epoch))


def states_equal(a, b, path=""):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_continues_exactly(tmp_path):
    straight = Trainer(run_config(iters=6), DATA, run_dir=str(tmp_path / "a"), log=silent)
    straight.train(progress=False)
    first = Trainer(run_config(iters=3), DATA, run_dir=str(tmp_path / "b"), log=silent)
    first.train(progress=False)
    resumed = Trainer.resume(str(tmp_path / "b"), iters=6, dataset=DATA, log=silent)
    assert resumed.iteration == 3
    resumed.train(progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    for key in ("generator", "critic", "opt_g", "opt_d", "latents", "rng", "history", "iteration"):
        assert states_equal(a[key], b[key]), key
    on_disk = ckpt_io.load(tmp_path / "b")
    assert on_disk["iteration"] == 6 and torch.equal(on_disk["latents"], a["latents"])


def test_run_directory_contents(tmp_path):
    d = str(tmp_path / "run")
    Trainer(run_config(iters=2), DATA, run_dir=d, log=silent).train(progress=False)
    for name in ("config.json", "log.txt", "checkpoint-00000002.json", "checkpoint-00000002.safetensors",
                 "samples.png", "reconstructions.png", "loss.png", "metrics.json"):
        assert os.path.isfile(os.path.join(d, name)), name
    for name in ("samples.png", "reconstructions.png", "loss.png"):
        with Image.open(os.path.join(d, name)) as im:
            assert im.format == "PNG" and im.width > 50
    with open(os.path.join(d, "config.json")) as f:
        assert RunConfig.from_json(f.read()) == run_config(iters=2)
    with open(os.path.join(d, "metrics.json")) as f:
        assert json.load(f)["iteration"] == 2
    loaded = load_run(d)
    assert loaded.iteration == 2 and loaded.latents.shape == (48, 8) and not loaded.generator.training
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    trainer = Trainer(run_config(iters=2), DATA, run_dir=d, log=silent)
    trainer.train(progress=False)
    good = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    with torch.no_grad():
        trainer.generator.out.weight.fill_(float("nan"))  # a blow-up
    with pytest.raises(NonFiniteLossError, match="non-finite .* at iteration 3.*last good checkpoint"):
        trainer.train(iters=4, progress=False)
    assert trainer.iteration == 2
    saved = ckpt_io.load(d)
    assert saved["iteration"] == 2
    assert all(torch.equal(saved["generator"][k], v) for k, v in good.items())


def test_checkpoints_are_atomic(tmp_path):
    path = str(tmp_path / "c.bin")
    ckpt_io.write_bytes_atomic(b"first", path)

    def failing_write(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt_io.write_atomic(path, failing_write)
    assert open(path, "rb").read() == b"first"
    assert os.listdir(tmp_path) == ["c.bin"]


def test_resume_refuses_changes_that_break_continuation(tmp_path):
    d = str(tmp_path / "run")
    Trainer(run_config(iters=1), DATA, run_dir=d, log=silent).train(progress=False)
    with pytest.raises(ValueError, match="cannot change \\['sigma'\\]"):
        Trainer.resume(d, dataset=DATA, sigma=0.5)
    with pytest.raises(ValueError, match="latent bank has 48 entries but the dataset has 24"):
        Trainer.resume(d, dataset=make_parts(24, 16), log=silent)
    with pytest.raises(FileNotFoundError):
        Trainer.resume(str(tmp_path / "nothing"))


def test_dataset_and_batch_checks():
    with pytest.raises(ValueError, match="dataset images are"):
        Trainer(run_config(), make_parts(48, 32), log=silent)
    with pytest.raises(ValueError, match="batch_size 64 exceeds the 48 training examples"):
        Trainer(run_config(batch_size=64), DATA, log=silent)


@pytest.mark.parametrize("changes, field", [
    (dict(iters=0), "iters"), (dict(batch_size=-2), "batch_size"), (dict(sigma=0.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"), (dict(step_size=-0.1), "step_size"), (dict(langevin_steps=0), "langevin_steps"),
    (dict(lr_g=0), "lr_g"), (dict(beta1=1.0), "beta1"), (dict(critic_weight=-1.0), "critic_weight"),
    (dict(device="tpu"), "device"), (dict(amp=True), "amp"), (dict(seed=-1), "seed"), (dict(iters=2.5), "iters"),
    (dict(langevin_noise="yes"), "langevin_noise"),
])
def test_bad_train_configs_are_rejected_with_the_field_named(changes, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} = .* is invalid: expected"):
        TrainConfig(**changes)


def test_run_config_round_trip_and_errors():
    rc = RunConfig(model="paper64", sparse=False, data="faces", train=TrainConfig(iters=7))
    assert RunConfig.from_json(rc.to_json()) == rc
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        RunConfig(train={"iterations": 3})
    with pytest.raises(ValueError, match="unknown model config"):
        RunConfig(model="huge")


def test_the_aaai_architecture_takes_training_steps():
    run = RunConfig(model="aaai", data="parts:n=4", train=TrainConfig(batch_size=2, langevin_steps=1))
    trainer = Trainer(run, make_parts(4, 64), log=silent)
    before = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    stats = trainer.step()
    assert all(v == v for v in stats.values())
    assert all(not torch.equal(v, trainer.generator.state_dict()[k]) for k, v in before.items())
