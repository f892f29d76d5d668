"""Every training script: the per-epoch monitor leaves training untouched, `--resume PATH`
alone continues a run exactly, and a bad flag value is one line and exit status 2."""
import argparse
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import dim_global
import dim_local
import eval_probe
import infoae
import infogan
import shared_exclusive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"dim_local": dim_local, "dim_global": dim_global, "infogan": infogan,
           "infoae": infoae, "shared_exclusive": shared_exclusive}
# small networks, one step an epoch on the shrunken digits (below); instance noise off
# because its annealing schedule is set by --epochs, which resuming to 4 epochs changes
TINY = {
    # the paper's constant learning rate: a cosine schedule is set by --epochs (see
    # test_dim_resume_inside_a_cosine_schedule); gamma > 0: draws from torch's RNG
    "dim_local": ["--embed-dim", "16", "--y-dim", "16", "--lr-schedule", "constant", "--gamma", "0.1"],
    "dim_global": ["--y-dim", "16", "--lr-schedule", "constant"],
    "infogan": ["--width", "8", "--fc-dim", "32", "--q-dim", "16", "--instance-noise", "0"],
    "infoae": ["--width", "4", "--hidden", "32", "--instance-noise", "0"],
    "shared_exclusive": ["--stage", "1", "--embed-dim", "16", "--shared-dim", "8", "--probes", "linear"],
}
COMMON = ["--batch-size", "32", "--no-progress", "--device", "cpu", "--eval-every", "2"]


@pytest.fixture
def small_digits(monkeypatch):
    """32 training and 64 test digits, so an epoch is one step and the probes are quick."""
    tx, ty, vx, vy = common.load_digits_data()
    monkeypatch.setattr(common, "load_digits_data",
                        lambda test_fraction=0.2, size=32: (tx[:32], ty[:32], vx[:64], vy[:64]))


def run_folder(out_dir):
    (name,) = os.listdir(out_dir)
    return os.path.join(out_dir, name)


def epoch_lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in m.items() if k != "time"} for m in lines if "epoch" in m], lines


def weights(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)  # plain types
    return {f"{part}.{k}": v for part, sd in [("encoder", ckpt["encoder"]), *ckpt["modules"].items()]
            for k, v in sd.items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# the three others take 20-50 s each on 2 busy cores: RUN_SLOW=1 includes them (they pass)
SLOW = pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="RUN_SLOW=1 runs it")


@pytest.mark.parametrize("name", ["dim_local", "infogan", *(pytest.param(n, marks=SLOW) for n in
                                                             ("dim_global", "infoae", "shared_exclusive"))])
def test_resume_from_the_checkpoint_alone_continues_the_run_exactly(tmp_path, small_digits, name):
    script = SCRIPTS[name]
    flags = [*COMMON, *TINY[name]]
    script.main([*flags, "--epochs", "2", "--out-dir", str(tmp_path / "resumed")])
    run = run_folder(tmp_path / "resumed")
    ckpt = os.path.join(run, "checkpoint.pt")
    script.main(["--resume", ckpt, "--epochs", "4", "--no-progress"])  # nothing else given
    script.main([*flags, "--epochs", "4", "--out-dir", str(tmp_path / "straight")])
    straight = run_folder(tmp_path / "straight")

    resumed_epochs, lines = epoch_lines(run)
    straight_epochs, straight_lines = epoch_lines(straight)
    assert [m["epoch"] for m in resumed_epochs] == [1, 2, 3, 4]
    assert resumed_epochs == straight_epochs  # losses, MI and the monitor, epoch by epoch
    final = {k: v for k, v in lines[-1].items() if k != "time"}
    assert final == {k: v for k, v in straight_lines[-1].items() if k != "time"}
    assert_same_weights(weights(run), weights(straight))
    times = [m["time"] for m in lines if "epoch" in m]
    assert times == sorted(times)  # the resumed clock goes on from the checkpoint's
    monitor = [k for k in resumed_epochs[-1] if k.startswith(("knn_", "cluster_acc"))]
    assert monitor and all(0 <= resumed_epochs[-1][k] <= 1 for k in monitor)
    if name.startswith("dim"):
        assert "knn_y" in monitor
    assert sorted(os.listdir(run)).count("curves.png") == 1
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    if name == "dim_local":  # a flag that is not safe to change names itself
        with pytest.raises(common.UserError, match="--embed-dim"):
            script.main(["--resume", ckpt, "--embed-dim", "32"])


def test_shared_exclusive_resumed_inside_stage_2_continues_exactly(tmp_path, small_digits):
    """Stage 2 resumed from a checkpoint after 2 of its 4 epochs (cut by --max-steps, as a kill
    would: one step an epoch here): its HSIC term scores each batch with the (S, Z) of the
    batches before it, so the checkpoint must hold those rows, and Z's ramp onto the circle
    must go on where it stopped, for the lines and weights to be the uninterrupted run's."""
    flags = [*COMMON, "--embed-dim", "16", "--shared-dim", "8", "--probes", "linear", "--epochs", "1",
             "--exclusive-epochs", "4", "--exclusive-norm", "sphere", "--sphere-ramp", "0.75"]
    shared_exclusive.main([*flags, "--max-steps", "2", "--out-dir", str(tmp_path / "resumed")])
    run = run_folder(tmp_path / "resumed")
    shared_exclusive.main(["--resume", os.path.join(run, "checkpoint.pt"), "--max-steps", "4",
                           "--no-progress"])
    shared_exclusive.main([*flags, "--out-dir", str(tmp_path / "straight")])
    straight = run_folder(tmp_path / "straight")
    (resumed_lines, lines), (straight_lines, all_straight) = epoch_lines(run), epoch_lines(straight)
    assert [(m["stage"], m["epoch"]) for m in resumed_lines] == [(1, 1), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert resumed_lines == straight_lines  # HSIC, MI, losses and the monitor, epoch by epoch
    assert all(0 < abs(m["hsic_x"]) < 1 for m in resumed_lines[1:])
    final = {k: v for k, v in lines[-1].items() if k != "time"}
    assert final == {k: v for k, v in all_straight[-1].items() if k != "time"}
    assert_same_weights(weights(run), weights(straight))


def test_dim_resume_inside_a_cosine_schedule_continues_exactly(tmp_path, small_digits):
    """A run cut short by --max-steps (as a kill would) resumes to the end of its schedule;
    the learning rate, the metrics lines and the weights are the uninterrupted run's."""
    flags = [*COMMON, "--embed-dim", "16", "--y-dim", "16", "--epochs", "6", "--log-every", "2"]
    dim_local.main([*flags, "--max-steps", "3", "--out-dir", str(tmp_path / "resumed")])
    run = run_folder(tmp_path / "resumed")
    dim_local.main(["--resume", os.path.join(run, "checkpoint.pt"), "--max-steps", "6", "--no-progress"])
    dim_local.main([*flags, "--out-dir", str(tmp_path / "straight")])
    straight = run_folder(tmp_path / "straight")
    resumed_lines, straight_lines = epoch_lines(run)[0], epoch_lines(straight)[0]
    # lines every 2 steps and at the cut (step 3), which the straight run has no line at
    assert [m["step"] for m in resumed_lines] == [2, 3, 4, 6]
    assert [m["step"] for m in straight_lines] == [2, 4, 6]
    assert resumed_lines[-1] == straight_lines[-1]
    assert_same_weights(weights(run), weights(straight))
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert ckpt["args"]["lr_schedule"] == "cosine"
    assert ckpt["optimizers"]["opt"]["param_groups"][0]["lr"] == pytest.approx(
        1e-3 * 0.5 * (1 + np.cos(np.pi * 5 / 6)))  # set before the 6th (last) step


@pytest.mark.parametrize("name", ["dim_local", "infogan"])
def test_the_monitor_does_not_change_training(tmp_path, small_digits, name):
    """infogan: its BatchNorm recalibration each epoch belongs to the method, not the monitor."""
    script = SCRIPTS[name]
    flags = [*COMMON, *TINY[name], "--epochs", "2"]
    script.main([*flags, "--eval-every", "1", "--out-dir", str(tmp_path / "on")])
    script.main([*flags, "--eval-every", "0", "--out-dir", str(tmp_path / "off")])
    on, off = run_folder(tmp_path / "on"), run_folder(tmp_path / "off")
    monitor = ("knn_y", "cluster_acc")  # and cluster_acc_mixed_bn
    strip = lambda lines: [{k: v for k, v in m.items() if not k.startswith(monitor)} for m in lines]
    on_epochs, off_epochs = epoch_lines(on)[0], epoch_lines(off)[0]
    assert all(any(k.startswith(monitor) for k in m) for m in on_epochs)
    assert not any(k.startswith(monitor) for m in off_epochs for k in m)
    assert strip(on_epochs) == strip(off_epochs)
    assert_same_weights(weights(on), weights(off))


def test_knn_monitor_draws_nothing_and_keeps_batchnorm_still():
    data = common.Data("toy", torch.randint(0, 255, (40, 1, 32, 32), dtype=torch.uint8),
                       torch.arange(40) % 4, torch.randint(0, 255, (12, 1, 32, 32), dtype=torch.uint8),
                       torch.arange(12) % 4, 4)
    torch.manual_seed(0)
    encoder = common.build_encoder(common.encoder_config("dcgan", (1, 32, 32), 8)).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    streams = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    acc = common.knn_monitor(encoder, data, "cpu", k=3)
    assert 0 <= acc <= 1 and encoder.training
    assert torch.equal(torch.get_rng_state(), streams[0])
    assert np.array_equal(np.random.get_state()[1], streams[1]) and random.getstate() == streams[2]
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def parser_of(script, argv=()):
    """The ArgumentParser a script's parse_args builds, caught as it parses."""
    caught = []
    original = common.ArgumentParser.parse_args

    def catch(self, *a, **kw):
        caught.append(self)
        return original(self, *a, **kw)

    common.ArgumentParser.parse_args = catch
    try:
        script.parse_args(list(argv))
    finally:
        common.ArgumentParser.parse_args = original
    return caught[0]


VALIDATORS = {common.positive_int, common.nonneg_int, common.batch_size_int, common.seed_int,
              common.positive_float,
              common.nonneg_float, common.probability, common.decay_rate,
              shared_exclusive.probe_list}  # --probes: names from a list, so -1, nan, seven are bad too


def numeric_flags(parser):
    return [a for a in parser._actions if a.option_strings and a.type not in (None, str)
            and not a.option_strings[0].startswith("--club")]  # CLUB's flags are on their way out


@pytest.mark.parametrize("name", [*SCRIPTS, "eval_probe"])
def test_every_numeric_flag_rejects_a_bad_value_in_one_line(tmp_path, capsys, name):
    script = SCRIPTS.get(name, eval_probe)
    positional = ["checkpoint.pt"] if name == "eval_probe" else []
    flags = numeric_flags(parser_of(script, positional))
    assert len(flags) >= 5
    for action in flags:
        assert (action.type in VALIDATORS or action.choices or  # or bounded, common.int_range
                action.type.__name__.startswith("integer in")), action.option_strings
        for bad in ("-1", "nan", "seven") if not action.choices else ("7",):
            with pytest.raises(SystemExit) as e:
                script.main([*positional, action.option_strings[0], bad, "--out-dir", str(tmp_path)]
                            if name != "eval_probe" else [*positional, action.option_strings[0], bad])
            err = capsys.readouterr().err
            assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (action.option_strings, err)
            assert action.option_strings[-1] in err or action.option_strings[0] in err
    assert not os.listdir(tmp_path)


def test_the_issues_examples_from_the_shell(tmp_path):
    for argv in (["--lr", "-1"], ["--batch-size", "1"]):
        p = subprocess.run([sys.executable, "dim_local.py", *argv, "--out-dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert argv[0] in p.stderr and "Traceback" not in p.stderr
    assert not tmp_path.exists() or not os.listdir(tmp_path)


def test_a_run_that_ends_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    args = argparse.Namespace(out_dir=str(tmp_path), dataset="digits")
    unfinished, finished = common.Run("dim_local", args), common.Run("dim_local", args)
    open(finished.path("checkpoint.pt"), "wb").close()
    for run in (unfinished, finished):
        run.remove_if_unfinished()  # what exit does (atexit)
    assert os.listdir(tmp_path) == [os.path.basename(finished.dir)]


def test_too_large_a_batch_is_one_clear_error(tmp_path, small_digits):
    with pytest.raises(common.UserError, match="--batch-size 64 is larger"):
        dim_local.main(["--batch-size", "64", "--out-dir", str(tmp_path), "--no-progress"])
    assert not os.listdir(tmp_path)
