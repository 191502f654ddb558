"""Fault injection: a training process killed with SIGKILL at random moments, in the middle of writing a
checkpoint's tensor file and between a checkpoint's two files, resumed each time, ends with the weights of a run
that was never interrupted; then its newest checkpoint is corrupted and the one before is taken."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparsegen.cli import main
from sparsegen.train import checkpoint as ckpt_io
from sparsegen.train.trainer import load_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 16
NEW_RUN = ["--config", "tiny16", "--data", "parts:n=16", "--batch-size", "8", "--langevin-steps", "2",
           "--ckpt-every", "1", "--sample-every", "4", "--log-every", "1", "--eval-examples", "8"]
COMMON = ["--iters", str(ITERS), "--no-progress", "--threads", "1"]

# The training process: the CLI, with a pause planted in the checkpoint writer when FAULT asks for one, so the
# test can kill it at that exact moment (in the middle of the tensor file, or after it and before its JSON).
DRIVER = r"""
import os, sys, time
from sparsegen.train import checkpoint as ck
fault, at = os.environ.get("FAULT", ""), int(os.environ.get("FAULT_AT", "0"))
write_bytes = ck.write_bytes_atomic

def faulty(data, path):
    if not fault or int(os.path.basename(path).split("-")[1].split(".")[0]) < at:
        return write_bytes(data, path)
    if fault == "in_write":
        def write(f):
            f.write(data[:len(data) // 2]); f.flush(); os.fsync(f.fileno())
            print("PAUSED", flush=True); time.sleep(120)
            f.write(data[len(data) // 2:])
        return ck.write_atomic(path, write)
    out = write_bytes(data, path)
    print("PAUSED", flush=True); time.sleep(120)
    return out

ck.write_bytes_atomic = faulty
from sparsegen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def newest_iteration(run):
    found = ckpt_io.list_checkpoints(run)
    return int(os.path.basename(found[0]).split("-")[1].split(".")[0]) if found else 0


def start(driver, run, fault="", at=0):
    args = ["train", "--out", str(run), *COMMON] + (["--resume"] if newest_iteration(run) else NEW_RUN)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), FAULT=fault,
               FAULT_AT=str(at), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(driver), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def kill_at_random(proc, run, rng, after):
    """SIGKILL ``proc`` a random moment after its run has a checkpoint beyond ``after``."""
    deadline = time.monotonic() + 120
    while newest_iteration(run) <= after:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.15))
    if proc.poll() is None:
        kill(proc)


def kill_when_paused(proc):
    seen = []
    for line in proc.stdout:  # the log lines come first
        seen.append(line)
        if line.strip() == "PAUSED":
            kill(proc)
            return
    pytest.fail(f"the process never paused: {''.join(seen)} {proc.communicate()[1]}")


def test_killed_training_resumes_to_the_uninterrupted_weights(tmp_path, capsys):
    rng = random.Random(1234)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    # 1. killed at a random moment after its second checkpoint
    kill_at_random(start(driver, run), run, rng, after=1)
    # 2. killed halfway through writing a tensor file: a temp file is left, the checkpoints before are intact
    at = newest_iteration(run) + 2
    kill_when_paused(start(driver, run, "in_write", at))
    assert [n for n in os.listdir(run) if n.endswith(".tmp")], os.listdir(run)
    # 3. killed after a tensor file and before its JSON: a tensor file without a checkpoint
    at = newest_iteration(run) + 2
    kill_when_paused(start(driver, run, "between_files", at))
    assert os.path.exists(run / f"checkpoint-{at:08d}.safetensors") and newest_iteration(run) == at - 1
    # 4., 5. killed at random moments again
    for _ in range(2):
        kill_at_random(start(driver, run), run, rng, after=min(newest_iteration(run) + 1, ITERS - 2))
    # 6. resumed to the end
    proc = start(driver, run)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]  # the leftovers were removed at start-up
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == sorted(
        f"checkpoint-{i:08d}.{e}" for i in (ITERS - 1, ITERS) for e in ("json", "safetensors"))
    assert "left by an interrupted write" in (run / "log.txt").read_text()

    # The same run, never interrupted (same thread count, same options).
    straight = tmp_path / "straight"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(straight), *COMMON, *NEW_RUN]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = ckpt_io.load(straight), ckpt_io.load(run)
    assert a["iteration"] == b["iteration"] == ITERS
    for key in ("generator", "critic", "opt_g", "opt_d", "latents", "rng", "history"):
        assert _equal(a[key], b[key]), key

    # The newest checkpoint corrupted: the one before is taken, and the file is named.
    tensors = run / f"checkpoint-{ITERS:08d}.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.warns(ckpt_io.CheckpointWarning, match=f"checkpoint-{ITERS:08d}.safetensors: 1000 bytes"):
        assert load_run(str(run)).iteration == ITERS - 1
    assert main(["train", "--out", str(run), "--resume", *COMMON]) == 0
    assert f"checkpoint-{ITERS:08d}.safetensors: 1000 bytes" in (run / "log.txt").read_text()
    c = ckpt_io.load(run)
    assert c["iteration"] == ITERS and _equal(c["generator"], a["generator"])  # redone, identically
    capsys.readouterr()


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
