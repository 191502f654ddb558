"""`sparsegen train | sample | reconstruct`: options derived from the configs, dry run, resume, errors, pictures."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from sparsegen.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "tiny16", "--data", "parts:n=24", "--batch-size", "8", "--langevin-steps", "2",
        "--no-progress", "--log-every", "1"]


def train(out, *extra):
    return main(["train", "--out", str(out), *TINY, *extra])


def test_train_then_resume_sample_and_reconstruct(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iters", "2") == 0
    text = capsys.readouterr().out
    for name in ("samples.png", "reconstructions.png", "loss.png"):
        assert str(out / name) in text  # says where the pictures are
        assert (out / name).is_file()
    assert "final reconstruction MSE" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["name"] == "tiny16" and cfg["train"]["batch_size"] == 8 and cfg["sparse"] is True

    assert main(["train", "--out", str(out), "--resume", "--iters", "3", "--no-progress"]) == 0
    assert "after 3 iterations" in capsys.readouterr().out

    assert main(["sample", "--run", str(out), "--n", "5", "--seed", "1"]) == 0
    with Image.open(out / "samples_seed1.png") as im:
        assert im.format == "PNG"
    assert main(["reconstruct", "--run", str(out), "--n", "4", "--steps", "3",
                 "--out", str(tmp_path / "r.png")]) == 0
    assert "MSE" in capsys.readouterr().out and (tmp_path / "r.png").is_file()
    assert main(["reconstruct", "--run", str(out / "checkpoint-00000003.json"), "--data", "parts:n=5,seed=9", "--n", "5",
                 "--steps", "2", "--out", str(tmp_path / "r2.png")]) == 0


def test_dense_flag_and_dry_run(tmp_path, capsys):
    out = tmp_path / "dry"
    assert train(out, "--dense", "--iters", "7", "--sigma", "0.2", "--dry-run") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sparse"] is False and cfg["train"]["iters"] == 7 and cfg["train"]["sigma"] == 0.2
    assert cfg["train"]["step_size"] == 0.1  # defaults resolved into the file
    assert sorted(os.listdir(out)) == ["config.json"]  # nothing trained
    assert "dry run" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--iters", "-3"], "--iters: expected a positive integer, got '-3'"),
    (["--iters", "x"], "--iters: expected a positive integer, got 'x'"),
    (["--sigma", "0"], "--sigma: expected a positive number, got '0'"),
    (["--critic-weight", "nan"], "--critic-weight: expected a number >= 0"),
    (["--config", "huge"], "invalid choice: 'huge'"),
    (["--data", "no/such/folder"], "unknown dataset 'no/such/folder'"),
    (["--device", "tpu"], "--device: expected 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
    (["--beta1", "1"], "--beta1: expected a number >= 0 and <= 0.9999999, got '1'"),
    (["--block-channels", "8,x"], "--block-channels: expected a non-empty tuple of ints >= 1, got '8,x'"),
    (["--config", "tiny16", "--fc-k", "64"], "ModelConfig.fc_k = 64 is invalid: expected at most fc_channels = 32"),
    (["--amp"], "TrainConfig.amp = True is invalid"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
])
def test_bad_options_are_rejected_with_messages(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "x"), *args, "--dry-run"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_model_fields_change_the_named_architecture(tmp_path):
    out = tmp_path / "dry"
    assert train(out, "--fc-k", "2", "--block-channels", "12", "--no-langevin-noise", "--beta1", "0.8",
                 "--dry-run") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["name"] == "tiny16" and cfg["model"]["fc_k"] == 2 and cfg["model"]["block_channels"] == [12]
    assert cfg["model"]["fc_channels"] == 32  # the rest is tiny16's
    assert cfg["train"]["langevin_noise"] is False and cfg["train"]["beta1"] == 0.8


def _help_text(parser) -> str:
    return " ".join(parser.format_help().split())


def test_every_commented_config_field_is_an_option_with_its_comment_as_help():
    from sparsegen.cli import build_parser
    from sparsegen.cli.options import field_comments
    from sparsegen.model.configs import ModelConfig, RunConfig, TrainConfig

    text = _help_text(build_parser().parse_args(["train", "--out", "x"]).parser)  # the train subcommand's
    comments = {**field_comments(ModelConfig), **field_comments(TrainConfig), **field_comments(RunConfig)}
    assert len(comments) == 38 and "name" not in comments and "train" not in comments  # nested / unnamed: none
    for name, comment in comments.items():
        flag = {"sparse": "--dense", "langevin_noise": "--no-langevin-noise"}.get(name, "--" + name.replace("_", "-"))
        assert flag in text, flag
        assert " ".join(comment.split()) in text, name
    assert "--batch-size N training examples per iteration (per process under DDP) (default 64)" in text


def test_options_are_derived_from_any_config_dataclass():
    """A new field with a one-line comment is an option, typed, defaulted and checked by its dataclass."""
    import argparse
    import dataclasses

    from sparsegen.cli.options import add_config_options, config_options, given

    @dataclasses.dataclass(frozen=True)
    class Toy:
        steps: int = 3  # how many steps
        rate: float = 0.5  # how fast
        sizes: tuple = (4, 8)  # one per layer
        fast: bool = False  # go fast
        slow: bool = True  # go slow
        name: str = "toy"

        @classmethod
        def check_field(cls, name, value):
            if name == "steps" and not (isinstance(value, int) and value > 0):
                raise ValueError("a positive integer")

    opts = config_options(Toy, flags={"slow": "--quick"})
    assert [(o.field, o.flag, o.type) for o in opts] == [
        ("steps", "--steps", int), ("rate", "--rate", float), ("sizes", "--sizes", tuple),
        ("fast", "--fast", bool), ("slow", "--quick", bool)]
    p = argparse.ArgumentParser()
    add_config_options(p, opts)
    args = p.parse_args(["--steps", "5", "--sizes", "1,2,3", "--quick"])
    assert given(args, opts) == {"steps": 5, "sizes": (1, 2, 3), "slow": False}
    assert given(p.parse_args([]), opts) == {}
    assert "how fast (default 0.5)" in _help_text(p) and "sets fast=True; fast: go fast" in _help_text(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "0"])
    with pytest.raises(ValueError, match="not options"):
        config_options(Toy, flags={"name": "--title"})


def test_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--resume"])
    assert "no checkpoint" in capsys.readouterr().err
    assert train(out, "--iters", "1") == 0
    with pytest.raises(SystemExit):
        train(out, "--iters", "2")  # a second run into the same directory
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--resume", "--sigma", "0.5"])
    assert "--sigma cannot change" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--resume", "--fc-k", "2", "--dense"])
    err = capsys.readouterr().err
    assert "--dense, --fc-k cannot change" in err and "only --ckpt-every, --device" in err
    assert main(["sample", "--run", str(tmp_path / "missing")]) == 2


def test_module_entry_point():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "sparsegen", "train", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and "--dry-run" in r.stdout


def test_every_option_of_every_subcommand_has_a_help_text():
    from sparsegen.cli import build_parser

    parser = build_parser()
    for command in ("train", "sample", "reconstruct", "andor", "eval", "report"):
        sub = parser.parse_args([command, "--out" if command == "train" else "--run", "x"]).parser
        assert not [a.option_strings for a in sub._actions if not a.help], command
