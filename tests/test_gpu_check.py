"""benchmarks/gpu_check.py: one line and exit status 2 without CUDA; its timing, FLOP count
and table, driven on the CPU."""
import os
import subprocess
import sys

import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "error: gpu_check needs a CUDA GPU and torch sees none here; "
        "benchmarks/speed.py times the scripts on a CPU"]


def test_without_cuda_main_raises_the_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.UserError, match="needs a CUDA GPU"):
        gpu_check.main([])


def test_step_times_skip_warmup_and_group_optimiser_steps():
    stamps = [0, 1, 10, 11, 30, 31, 60, 61]  # two optimiser steps per training step
    assert gpu_check.step_times(stamps, 2, warmup=0) == [10, 20, 30]
    assert gpu_check.step_times(stamps, 2, warmup=1) == [20, 30]
    assert gpu_check.step_times(stamps, 1, warmup=5) == [29, 1]


def test_stage_2_runs_from_the_stage_1_checkpoint_it_is_given():
    argv = gpu_check.script_argv("shared_exclusive-2", 5, 64, torch.device("cpu"), ["--amp"], "s1.pt")
    assert argv[argv.index("--stage") + 1] == "2" and argv[argv.index("--shared-from") + 1] == "s1.pt"
    assert argv[-1] == "--amp" and gpu_check.SHARED_FROM not in argv


def test_markdown_table_has_one_row_per_run_and_names_failures():
    row = gpu_check.row_of("infogan", "plain", [0.02, 0.01, 0.03], 512.0, 16, 1e9, 1e11)
    assert row["ms/step"] == pytest.approx(20) and row["images/s"] == pytest.approx(800)
    assert row["fraction of matmul peak"] == pytest.approx(1e9 / 0.02 / 1e11)
    lines = gpu_check.markdown_table([row, {"script": "infoae", "mode": "compile", "error": "boom"}]).splitlines()
    assert lines[0] == "| script | mode | ms/step | images/s | peak MiB | fraction of matmul peak |"
    assert lines[2] == "| infogan | plain | 20.00 | 800 | 512 | 0.500 |" and "failed: boom" in lines[3]


def test_the_table_goes_on_past_a_failing_run(monkeypatch, capsys):
    # on the CPU the torchrun worker refuses (no CUDA): that row carries the error, and the
    # script's other rows are measured all the same
    tx, ty, vx, vy = common.load_digits_data()
    monkeypatch.setattr(common, "load_digits_data",
                        lambda test_fraction=0.2, size=32: (tx[:64], ty[:64], vx[:64], vy[:64]))
    args = gpu_check.parse_args(["--scripts", "dim_global", "--steps", "4", "--warmup", "1",
                                 "--batch-size", "16"])
    cpu = torch.device("cpu")
    flops, per_step = gpu_check.flops_per_step("dim_global", 16, cpu)
    assert per_step == 1 and flops > 1e8  # the recipe has no prior term: one optimiser step
    rows = gpu_check.run_all(args, cpu, 1, {"tf32": 1e11, "bf16": 1e11}, modes={"plain": []})
    assert [(r["script"], r["mode"]) for r in rows] == [("dim_global", "plain"), ("dim_global", "torchrun")]
    assert rows[0]["images/s"] > 0 and rows[0]["steps timed"] == 2
    assert rows[0]["fraction of matmul peak"] == pytest.approx(flops / (rows[0]["ms/step"] / 1000) / 1e11)
    assert "torchrun exited" in rows[1]["error"] and "needs a CUDA GPU" in rows[1]["error"]
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # a line per run as it ends
