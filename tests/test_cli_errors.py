"""Every mistake a user can make on the command line ends in one line naming the option, and exit status 2."""
import os

import pytest
import torch

from sparsegen.cli import main

TINY = ["--config", "tiny16", "--batch-size", "8", "--langevin-steps", "1", "--iters", "1", "--no-progress"]
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--out", str(d), "--data", "parts:n=16", *TINY]) == 0
    return d


def unwritable_dir(tmp_path):
    """A directory this process cannot create files in (root ignores permission bits: /proc then)."""
    if os.geteuid() == 0:
        return "/proc/sparsegen-cannot-write-here"
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    return str(d / "run")


def cases(tmp_path, run):
    empty = tmp_path / "no_images"
    empty.mkdir()
    unreadable = tmp_path / "bad_images"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"not a picture")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = str(tmp_path / "new")
    return {
        "device cuda": (["train", "--out", out, "--data", "parts:n=16", "--device", "cuda", *TINY],
                        "--device cuda: CUDA is not available"),
        "device cuda:7": (["train", "--out", out, "--data", "parts:n=16", "--device", "cuda:7", *TINY],
                          "--device cuda:7: CUDA is not available"),
        "sample on cuda": (["sample", "--run", run, "--device", "cuda"], "--device cuda: CUDA is not available"),
        "eval on cuda": (["eval", "--run", run, "--device", "cuda"], "--device cuda: CUDA is not available"),
        "no examples": (["train", "--out", out, "--data", "parts:n=0", *TINY], "--data parts:n=0: "),
        "negative n": (["train", "--out", out, "--data", "parts:n=-3", *TINY], "--data parts:n=-3: "),
        "batch > data": (["train", "--out", out, "--data", "parts:n=4", *TINY],
                         "--batch-size 8: batch_size 8 exceeds the 4 training examples"),
        "folder of no images": (["train", "--out", out, "--data", str(empty), *TINY],
                                f"--data {empty}: no image files"),
        "folder of unreadable images": (["train", "--out", out, "--data", str(unreadable), *TINY],
                                        f"--data {unreadable}: none of the 1 image files"),
        "out is a file": (["train", "--out", str(a_file), "--data", "parts:n=16", *TINY],
                          f"--out {a_file}: exists and is not a directory"),
        "out is a file (dry run)": (["train", "--out", str(a_file), "--data", "parts:n=16", "--dry-run"],
                                    f"--out {a_file}: exists and is not a directory"),
        "out unwritable": (["train", "--out", unwritable_dir(tmp_path), "--data", "parts:n=16", *TINY],
                           f"--out {unwritable_dir(tmp_path)}: cannot write there"),
        "out under a file": (["train", "--out", str(a_file / "run"), "--data", "parts:n=16", *TINY],
                             f"--out {a_file / 'run'}: cannot write there"),
        "sample --out DIR": (["sample", "--run", run, "--out", str(tmp_path)],
                             f"--out {tmp_path}: is a directory; name the file to write"),
        "reconstruct --out DIR": (["reconstruct", "--run", run, "--out", str(tmp_path)],
                                  f"--out {tmp_path}: is a directory"),
        "reconstruct --data bad": (["reconstruct", "--run", run, "--data", "parts:n=0"], "--data parts:n=0: "),
        "eval --out DIR": (["eval", "--run", run, "--out", str(tmp_path)], f"--out {tmp_path}: is a directory"),
        "andor --out file": (["andor", "--run", run, "--out", str(a_file)],
                             f"--out {a_file}: exists and is not a directory"),
        "missing --inception": (["eval", "--run", run, "--fid-samples", "4", "--inception", "/missing.pt"],
                                "--inception /missing.pt: no such file"),
        "missing --inception in report": (["report", "--run", run, "--inception", "/missing.pt"],
                                          "--inception /missing.pt: no such file"),
        "no run": (["sample", "--run", str(tmp_path / "nothing")], f"--run {tmp_path / 'nothing'}: "),
        "no run to resume": (["train", "--out", str(tmp_path / "none"), "--resume"], "--resume: no checkpoint"),
    }


CASES = ["device cuda", "device cuda:7", "sample on cuda", "eval on cuda", "no examples", "negative n",
         "batch > data", "folder of no images", "folder of unreadable images", "out is a file",
         "out is a file (dry run)", "out unwritable", "out under a file", "sample --out DIR", "reconstruct --out DIR",
         "reconstruct --data bad", "eval --out DIR", "andor --out file", "missing --inception",
         "missing --inception in report", "no run", "no run to resume"]


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_and_exit_status_2(case, tmp_path, run_dir, capsys):
    if CUDA and "cuda" in case:
        pytest.skip("a CUDA device is there")
    argv, message = cases(tmp_path, str(run_dir))[case]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors (usage line + one error line) exit with 2 too
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("usage:")
             and not ln.startswith(" ")]
    assert len(lines) == 1, lines
    assert message in lines[0], lines[0]
    assert lines[0].startswith(f"sparsegen {argv[0]}: "), lines[0]


def test_the_cases_are_all_listed(tmp_path):
    assert sorted(cases(tmp_path, "x")) == sorted(CASES)
