"""Checkpoints: safetensors + JSON (nothing unpickled), the newest N kept, fallback past corrupt files, the previous
format read with weights_only=True, pickles that would run code refused, nothing non-finite saved, stale temp
files removed, pictures and JSON written atomically, the log saying where a resume began."""
import json
import os
import pickle
import shutil
import warnings

import pytest
import torch

from sparsegen import RunConfig, TrainConfig, Trainer, load_run
from sparsegen.cli import main
from sparsegen.data import make_parts
from sparsegen.train import checkpoint as ckpt_io
from sparsegen.train.pictures import save_grid
from sparsegen.train.trainer import NonFiniteWeightsError

DATA = make_parts(24, 16, seed=0)


def run_config(**train):
    base = dict(iters=3, batch_size=8, langevin_steps=2, lr_g=1e-3, lr_d=1e-3, log_every=1, sample_every=100,
                ckpt_every=1, eval_examples=24)
    base.update(train)
    return RunConfig(model="tiny16", data="parts:n=24", train=TrainConfig(**base))


def silent(_msg):
    pass


def train_run(d, **train):
    trainer = Trainer(run_config(**train), DATA, run_dir=str(d), log=silent)
    trainer.train(progress=False)
    return trainer


@pytest.fixture(scope="module")
def three_iterations(tmp_path_factory):
    """A run of 3 iterations with a checkpoint after each (2 and 3 kept); tests work on copies of it."""
    d = tmp_path_factory.mktemp("trained") / "run"
    train_run(d, iters=3)
    return d


def copy_of(run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(run, d)
    return d


def names(d):
    return sorted(n for n in os.listdir(d) if n.startswith("checkpoint"))


def states_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_a_checkpoint_is_safetensors_and_json_and_loads_without_unpickling(tmp_path, monkeypatch):
    from safetensors import safe_open

    d = tmp_path / "run"
    trainer = train_run(d, iters=2)
    assert names(d) == ["checkpoint-00000001.json", "checkpoint-00000001.safetensors",
                        "checkpoint-00000002.json", "checkpoint-00000002.safetensors"]
    doc = json.loads((d / "checkpoint-00000002.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    state = doc["state"]
    assert doc["format"] == 2 and state["iteration"] == 2 and state["run_config"]["model"]["name"] == "tiny16"
    assert type(state["torch_version"]) is str and state["torch_version"] == str(torch.__version__)
    assert isinstance(state["rng"][0]["__uint8__"], str)  # the random states are in the JSON
    assert doc["tensors"]["bytes"] == os.path.getsize(d / "checkpoint-00000002.safetensors")
    with safe_open(str(d / "checkpoint-00000002.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "generator/out.weight" in keys and "latents" in keys and "opt_g/state/0/exp_avg" in keys

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a run was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = ckpt_io.load(d)
    assert states_equal(loaded, {**trainer.state_dict(), "format": 2})  # bit for bit, types included
    assert load_run(str(d)).iteration == 2
    resumed = Trainer.resume(str(d), iters=3, dataset=DATA, log=silent)
    assert resumed.iteration == 2
    assert main(["sample", "--run", str(d), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0


def test_the_newest_checkpoints_are_kept(tmp_path):
    train_run(tmp_path / "a", iters=5)
    assert names(tmp_path / "a") == ["checkpoint-00000004.json", "checkpoint-00000004.safetensors",
                                     "checkpoint-00000005.json", "checkpoint-00000005.safetensors"]
    train_run(tmp_path / "b", iters=5, keep_checkpoints=3, ckpt_every=2)
    assert [n for n in names(tmp_path / "b") if n.endswith(".json")] == [
        "checkpoint-00000002.json", "checkpoint-00000004.json", "checkpoint-00000005.json"]
    assert ckpt_io.list_checkpoints(tmp_path / "b")[0].endswith("checkpoint-00000005.json")


def _truncate(p):
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])


def _zero(p):
    p.write_bytes(bytes(len(p.read_bytes())))


def _garbage(p):
    p.write_bytes(os.urandom(len(p.read_bytes())))


def _flip_one_byte(p):
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))


CORRUPTIONS = {
    "tensors truncated": ("safetensors", _truncate, "truncated or altered"),
    "tensors zeroed": ("safetensors", _zero, "SHA-256 does not match"),
    "tensors garbage": ("safetensors", _garbage, "SHA-256 does not match"),
    "tensors one byte": ("safetensors", _flip_one_byte, "SHA-256 does not match"),
    "tensors empty": ("safetensors", lambda p: p.write_bytes(b""), "truncated or altered"),
    "tensors missing": ("safetensors", lambda p: p.unlink(), "is missing"),
    "json truncated": ("json", _truncate, "not a checkpoint's JSON"),
    "json empty": ("json", lambda p: p.write_bytes(b""), "not a checkpoint's JSON"),
    "json zeroed": ("json", _zero, "not a checkpoint's JSON"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, case, capsys, three_iterations):
    ext, corrupt, reason = CORRUPTIONS[case]
    d = copy_of(three_iterations, tmp_path)
    bad = d / f"checkpoint-00000003.{ext}"
    corrupt(bad)
    with pytest.warns(ckpt_io.CheckpointWarning, match=reason):
        assert load_run(str(d)).iteration == 2
    assert main(["sample", "--run", str(d), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped the corrupt checkpoint" in err and "checkpoint-00000003" in err and reason in err
    logged = []
    trainer = Trainer.resume(str(d), iters=4, dataset=DATA, log=logged.append)
    assert trainer.iteration == 2
    assert any("checkpoint-00000003" in m and reason in m for m in logged), logged
    assert not (d / "checkpoint-00000003.json").exists()  # set aside for inspection, no longer a checkpoint
    assert (d / "checkpoint-00000003.json.corrupt").exists()
    trainer.train(progress=False)
    assert [n for n in names(d) if n.endswith(".json")] == ["checkpoint-00000003.json", "checkpoint-00000004.json"]


def test_a_run_none_of_whose_checkpoints_loads_is_a_one_line_error(tmp_path, capsys, three_iterations):
    d = copy_of(three_iterations, tmp_path)
    for p in d.glob("checkpoint-*.safetensors"):
        _truncate(p)
    with pytest.raises(ckpt_io.NoCheckpointError, match="no checkpoint in .* loads: .*00000003.*; .*00000002"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ckpt_io.CheckpointWarning)
            load_run(str(d))
    for argv in (["train", "--out", str(d), "--resume", "--no-progress"], ["sample", "--run", str(d)],
                 ["reconstruct", "--run", str(d)], ["andor", "--run", str(d)], ["eval", "--run", str(d)],
                 ["report", "--run", str(d)]):
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if "warning:" not in ln]
        assert len(err) == 1 and "no checkpoint in" in err[0] and "loads" in err[0], (argv, err)
        assert err[0].startswith(f"sparsegen {argv[0]}: --r"), err  # --run / --resume


def _legacy_state(trainer):
    from torch.torch_version import TorchVersion

    state = trainer.state_dict()
    state["format"] = 1
    state["torch_version"] = TorchVersion(torch.__version__)  # what checkpoint.pt files hold
    return state


def test_a_checkpoint_of_the_previous_format_loads_with_weights_only(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir()
    trainer = Trainer(run_config(iters=2), DATA, log=silent)
    trainer.train(progress=False)
    torch.save(_legacy_state(trainer), d / "checkpoint.pt")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_run(str(d))
    assert loaded.iteration == 2 and calls == [True]
    assert torch.equal(loaded.latents, trainer.latents)
    resumed = Trainer.resume(str(d), iters=4, dataset=DATA, log=silent)
    resumed.train(progress=False)
    straight = Trainer(run_config(iters=4), DATA, log=silent)
    straight.train(progress=False)
    for key in ("generator", "critic", "opt_g", "opt_d", "latents", "rng", "history", "iteration"):
        assert states_equal(straight.state_dict()[key], resumed.state_dict()[key]), key
    assert names(d) == ["checkpoint-00000003.json", "checkpoint-00000003.safetensors",
                        "checkpoint-00000004.json", "checkpoint-00000004.safetensors"]  # the old one pruned


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    marker = tmp_path / "pwned"
    trainer = Trainer(run_config(iters=1), DATA, log=silent)
    state = _legacy_state(trainer)
    state["history"] = RunsCode(marker)
    torch.save(state, d / "checkpoint.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="pickle that would call .*system: refused, nothing was run"):
        ckpt_io.load_file(d / "checkpoint.pt")
    with pytest.raises(ckpt_io.NoCheckpointError):
        Trainer.resume(str(d), dataset=DATA, log=silent)
    for argv in (["sample", "--run", str(d)], ["sample", "--run", str(d / "checkpoint.pt")],
                 ["train", "--out", str(d), "--resume", "--no-progress"], ["report", "--run", str(d)],
                 ["eval", "--run", str(d)], ["andor", "--run", str(d)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refused, nothing was run" in err[0], (argv, err)
    assert not marker.exists()


def test_a_diverging_run_stops_before_saving_non_finite_weights_and_resumes_with_a_smaller_rate(tmp_path):
    # The run of the issue: the generator step of one iteration writes NaN weights while its losses are finite.
    d = tmp_path / "run"
    run = RunConfig(model="tiny16", data="parts:n=64", train=TrainConfig(
        iters=40, batch_size=8, lr_g=1e6, ckpt_every=1, log_every=100, sample_every=100, eval_examples=8))
    logged = []
    trainer = Trainer(run, make_parts(64, 16, seed=0), run_dir=str(d), log=logged.append)
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite weights after iteration \d+ .* kept") as exc:
        trainer.train(progress=False)  # its losses are still finite: the weights are what must be checked
    stopped = trainer.iteration
    found = ckpt_io.list_checkpoints(d)
    assert found and found[0].endswith(ckpt_io.checkpoint_name(stopped))
    for path in found:  # every checkpoint left is finite and loads
        assert ckpt_io.non_finite(ckpt_io.load_file(path)) is None
    assert f"after iteration {stopped + 1} (generator/" in str(exc.value) and "--lr-g" in str(exc.value)
    logged.clear()
    resumed = Trainer.resume(str(d), iters=stopped + 2, lr_g=1e-3, dataset=make_parts(64, 16, seed=0),
                             log=logged.append)
    assert resumed.iteration == stopped and resumed.opt_g.param_groups[0]["lr"] == 1e-3
    assert any("changed on resume: lr_g 1000000.0 -> 0.001" in m for m in logged), logged
    try:  # its weights are already ~1e6 here: it may well diverge again, and again save nothing non-finite
        resumed.train(progress=False)
    except NonFiniteWeightsError:
        pass
    for path in ckpt_io.list_checkpoints(d):
        assert ckpt_io.non_finite(ckpt_io.load_file(path)) is None


def test_an_iteration_that_makes_a_weight_non_finite_stops_the_run_and_is_not_saved(tmp_path):
    d = tmp_path / "run"
    trainer = train_run(d, iters=2)
    real_step = trainer.opt_g.step

    def poisoned_step(*args, **kwargs):  # the losses stay finite; the update is not
        out = real_step(*args, **kwargs)
        with torch.no_grad():
            trainer.generator.out.weight[0, 0, 0, 0] = float("nan")
        return out

    trainer.opt_g.step = poisoned_step
    with pytest.raises(NonFiniteWeightsError, match=r"after iteration 3 \(generator/out.weight: 1 of \d+ values "
                       r"NaN or infinite\).*checkpoint-00000002.json is kept.*--lr-g"):
        trainer.train(iters=4, progress=False)
    assert trainer.iteration == 2 and ckpt_io.load(d)["iteration"] == 2
    resumed = Trainer.resume(str(d), iters=4, lr_g=5e-4, dataset=DATA, log=silent)  # goes on from iteration 2
    resumed.train(progress=False)
    assert resumed.iteration == 4 and ckpt_io.non_finite(ckpt_io.load(d)) is None
    # An optimiser state that went non-finite is not written either.
    trainer = train_run(tmp_path / "b", iters=1)
    next(iter(trainer.opt_d.state.values()))["exp_avg_sq"].fill_(float("inf"))
    with pytest.raises(NonFiniteWeightsError, match="opt_d/state/0/exp_avg_sq"):
        trainer.save_checkpoint()
    with pytest.raises(ckpt_io.CheckpointError, match="not writing a checkpoint with opt_d"):
        ckpt_io.save(trainer.state_dict(), tmp_path / "b")


def test_stale_files_of_killed_writes_are_removed_at_start_up(tmp_path, three_iterations):
    d = copy_of(three_iterations, tmp_path)
    stale = [".checkpoint-00000004.safetensors.k2j4h1.tmp", ".samples.png.abc.tmp", ".config.json.x1.tmp",
             "checkpoint-00000004.safetensors"]  # the last: a tensor file whose JSON was never written
    for n in stale:
        (d / n).write_bytes(b"partial")
    logged = []
    Trainer.resume(str(d), iters=3, dataset=DATA, log=logged.append)
    assert not [n for n in stale if (d / n).exists()]
    assert any("removed 4 file(s) left by an interrupted write" in m for m in logged), logged
    assert names(d)[-1] == "checkpoint-00000003.safetensors"


def test_pictures_and_json_are_written_atomically(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "samples.png"
    save_grid(torch.zeros(4, 3, 8, 8), str(path))
    before = path.read_bytes()

    def broken_save(self, fp, format=None, **params):
        fp.write(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_grid(torch.ones(4, 3, 8, 8), str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["samples.png"]
    monkeypatch.undo()
    save_grid(torch.ones(4, 3, 8, 8), str(tmp_path / "named.any"))  # a PNG whatever the extension
    with Image.open(tmp_path / "named.any") as im:
        assert im.format == "PNG"
    ckpt_io.write_json_atomic({"a": 1}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_resuming_to_fewer_iterations_than_done_changes_nothing(tmp_path, three_iterations):
    d = copy_of(three_iterations, tmp_path)
    config = (d / "config.json").read_text()
    assert main(["train", "--out", str(d), "--resume", "--iters", "2", "--no-progress"]) == 0
    assert (d / "config.json").read_text() == config and json.loads(config)["train"]["iters"] == 3
    assert "already at iteration 3 >= 2: nothing to train" in (d / "log.txt").read_text()


def test_the_log_says_where_a_resume_began(tmp_path):
    d = tmp_path / "run"
    train_run(d, iters=4, ckpt_every=2, keep_checkpoints=3)
    for ext in ("json", "safetensors"):  # as if killed after logging iterations 3 and 4, before checkpoint 4
        (d / f"checkpoint-00000004.{ext}").unlink()
    Trainer.resume(str(d), iters=5, dataset=DATA, log=silent).train(progress=False)
    log = (d / "log.txt").read_text()
    assert ("checkpoint-00000002.json at iteration 2 (the log lines of iterations 3..4 above are from the "
            "interrupted run; those iterations are done again)") in log
    assert log.index("iter      4/4") < log.index("resumed") < log.index("iter      3/5")
