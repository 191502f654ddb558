"""`sparsegen train | sample | reconstruct`: typed options, dry run, resume, errors, pictures."""
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
    assert main(["reconstruct", "--run", str(out / "checkpoint.pt"), "--data", "parts:n=5,seed=9", "--n", "5",
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
    (["--device", "tpu"], "TrainConfig.device = 'tpu' is invalid"),
    (["--amp"], "TrainConfig.amp = True is invalid"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
])
def test_bad_options_are_rejected_with_messages(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "x"), *args, "--dry-run"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


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
    assert main(["sample", "--run", str(tmp_path / "missing")]) == 1


def test_module_entry_point():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "sparsegen", "train", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and "--dry-run" in r.stdout
