"""Issue 35: bad input and faults end in one line and exit status 2 (or work), before the long
work; no run is lost or overwritten, nothing half-written stays behind. A kill is simulated by
raising between the metrics line and the checkpoint, a full disk by a writer raising ENOSPC."""
import errno
import hashlib
import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dim_local
import eval_probe
import infoae
import infogan
import shared_exclusive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--embed-dim", "16", "--y-dim", "16", "--batch-size", "32", "--no-progress",
        "--device", "cpu", "--eval-every", "0"]


def script_module(path):
    """benchmarks/*.py, imported as the user runs them (not a package)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small_digits(monkeypatch):
    """32 training and 64 test digits: an epoch is one step."""
    tx, ty, vx, vy = common.load_digits_data()
    monkeypatch.setattr(common, "load_digits_data",
                        lambda test_fraction=0.2, size=32: (tx[:32], ty[:32], vx[:64], vy[:64]))


def run_folder(out_dir):
    (name,) = os.listdir(out_dir)
    return os.path.join(out_dir, name)


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def one_line_exit_2(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- 1. imagefolder: one class list, from train/ -----------------------------------------
def write_images(folder, classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(folder / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_imagefolder_labels_both_splits_by_train_classes(tmp_path):
    write_images(tmp_path / "train", ["c0", "c1", "c2", "c3"], 2)
    write_images(tmp_path / "test", ["c0", "c2", "c3"], 1)  # lacks c1: labels must not shift
    data = common.load_data("imagefolder", str(tmp_path))
    assert data.n_classes == 4
    assert data.train_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.test_y.tolist() == [0, 2, 3]
    write_images(tmp_path / "test", ["c4"], 1)  # a class train/ never saw
    with pytest.raises(common.UserError, match="c4"):
        common.load_data("imagefolder", str(tmp_path))


def test_imagefolder_empty_one_class_or_corrupt_is_one_line(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(common.UserError, match="train"):
        common.load_data("imagefolder", str(tmp_path))
    write_images(tmp_path / "train", ["only"], 2)
    write_images(tmp_path / "test", ["only"], 1)
    with pytest.raises(common.UserError, match="at least two classes"):
        common.load_data("imagefolder", str(tmp_path))
    write_images(tmp_path / "train", ["other"], 2)
    with open(tmp_path / "train" / "other" / "0.png", "r+b") as f:
        f.truncate(30)  # a truncated PNG
    with pytest.raises(common.UserError, match=r"other.0\.png"):
        common.load_data("imagefolder", str(tmp_path))


# ---- 2, 3, 8: resume never overwrites newer progress nor repeats a line ------------------
def test_resuming_an_older_copy_is_refused_and_leaves_the_run_as_it_was(tmp_path, small_digits):
    dim_local.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path)])
    run = run_folder(tmp_path)
    ckpt, old = os.path.join(run, "checkpoint.pt"), os.path.join(run, "ck1.pt")
    shutil.copy(ckpt, old)
    dim_local.main(["--resume", ckpt, "--epochs", "2", "--no-progress"])
    before = digest(ckpt), digest(os.path.join(run, "metrics.jsonl"))
    with pytest.raises(common.UserError, match="step 1 but .*checkpoint.pt beside it is at step 2"):
        dim_local.main(["--resume", old, "--epochs", "3", "--no-progress"])
    assert (digest(ckpt), digest(os.path.join(run, "metrics.jsonl"))) == before
    with pytest.raises(common.UserError, match="is a folder; pass the checkpoint.pt inside it"):
        dim_local.main(["--resume", run])


def test_a_kill_between_log_and_checkpoint_repeats_no_line_and_leaves_no_temp_file(
        tmp_path, small_digits, monkeypatch):
    dim_local.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path / "killed")])
    run = run_folder(tmp_path / "killed")
    ckpt = os.path.join(run, "checkpoint.pt")

    def killed(*a, **kw):
        raise KeyboardInterrupt  # after epoch 2's metrics line, before its checkpoint

    with monkeypatch.context() as m:
        m.setattr(common, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            dim_local.main(["--resume", ckpt, "--epochs", "3", "--no-progress"])
    assert [r.get("epoch") for r in metrics(run)] == [1, 2]  # 2: the orphaned line
    with open(os.path.join(run, ".checkpoint.pt.x1y2z3.tmp"), "wb") as f:
        f.write(b"\0" * 100)  # what SIGKILL in the middle of torch.save leaves
    dim_local.main(["--resume", ckpt, "--epochs", "3", "--no-progress"])
    dim_local.main([*TINY, "--epochs", "3", "--out-dir", str(tmp_path / "straight")])
    straight = run_folder(tmp_path / "straight")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
    assert strip(metrics(run)) == strip(metrics(straight))  # 1, 2, 3, final: no line twice
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    # resuming the finished run again writes its end-of-run line once, not a second time
    dim_local.main(["--resume", ckpt, "--no-progress"])
    assert strip(metrics(run)) == strip(metrics(straight))


def test_run_files_follow_the_umask_not_0600(tmp_path, small_digits):
    umask = os.umask(0o022)
    try:
        dim_local.main([*TINY, "--epochs", "1", "--eval-every", "1", "--out-dir", str(tmp_path)])
    finally:
        os.umask(umask)
    run = run_folder(tmp_path)
    modes = {f: os.stat(os.path.join(run, f)).st_mode & 0o777 for f in os.listdir(run)}
    assert {"args.json", "metrics.jsonl", "checkpoint.pt", "curves.png"} <= modes.keys()
    assert set(modes.values()) == {0o644}, modes


# ---- 3. a full disk: one line naming it, nothing half-written -----------------------------
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, small_digits, monkeypatch,
                                                            capsys):
    def full(obj, f, *a, **kw):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    err = one_line_exit_2(capsys, common.run_cli,
                          lambda: dim_local.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path)]))
    assert "no space left on the disk" in err
    for _, _, files in os.walk(tmp_path):
        assert not [f for f in files if f.endswith(".tmp")]


def test_a_metrics_line_is_never_half_written(tmp_path, monkeypatch):
    run = common.Run("dim_local", common.argparse.Namespace(out_dir=str(tmp_path), dataset="digits"))
    run.log(epoch=1, step=1, loss=0.5)

    class DiskFillsUp(io.FileIO):
        def write(self, b):
            if getattr(self, "full", False):
                raise OSError(errno.ENOSPC, "No space left on device")
            self.full = True
            return super().write(bytes(b)[:7])  # part of the line fits

    monkeypatch.setattr(common, "open", lambda path, mode, buffering=-1: DiskFillsUp(path, "a"),
                        raising=False)
    with pytest.raises(OSError) as e:
        run.log(epoch=2, step=2, loss=0.25)
    assert common.disk_full(e.value)
    monkeypatch.undo()
    assert metrics(run.dir) == [{"epoch": 1, "step": 1, "loss": 0.5}]
    run.remove_if_unfinished()


# ---- 4, 5, 6, 7: checked before the work ---------------------------------------------------
def test_bad_output_places_fail_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    err = one_line_exit_2(capsys, common.run_cli,
                          lambda: dim_local.main(["--out-dir", str(a_file / "runs")]))
    assert "is a file, not a folder" in err
    err = one_line_exit_2(capsys, eval_probe.main, ["missing.pt", "--out", str(tmp_path / "no" / "e.json")])
    assert "--out" in err and "not a writable folder" in err


def test_reproduce_checks_its_flags_and_fails_when_a_recipe_failed(tmp_path, monkeypatch, capsys):
    reproduce = script_module("benchmarks/reproduce.py")
    (tmp_path / "runs" / "dim_global-seed0").mkdir(parents=True)
    for argv in (["--max-steps", "-1"], ["--max-steps", "0"], ["--seeds", "0,0"],
                 ["--seeds", str(2**40)], ["--out", str(tmp_path / "no" / "r.json")],
                 ["--only", "dim_global", "--keep-runs", str(tmp_path / "runs")]):
        with pytest.raises(SystemExit) as e:
            reproduce.parse_args(argv)
        assert e.value.code == 2, argv
    capsys.readouterr()

    def failed(cmd, threads, log_path):
        raise reproduce.RunFailed("exit 2: error: something")

    monkeypatch.setattr(reproduce, "run", failed)
    monkeypatch.setattr(reproduce, "pixel_baselines", lambda dataset, root: {"pixels_linear": 0.9,
                                                                             "pixels_kmeans": 0.6})
    argv = ["--only", "dim_global,infogan", "--out", str(tmp_path / "r.json"),
            "--keep-runs", str(tmp_path / "new")]
    with pytest.raises(common.UserError, match="2 of 2 runs failed"):
        reproduce.main(argv)


def test_flags_that_would_fail_after_training_or_fill_the_memory_are_one_line(tmp_path, capsys):
    out = ["--out-dir", str(tmp_path)]
    for script, argv in ((dim_local, ["--epochs", str(10**12)]), (dim_local, ["--multi-global", str(10**12)]),
                         (dim_local, ["--embed-dim", str(10**12)]), (dim_local, ["--seed", str(10**15)]),
                         (shared_exclusive, ["--epochs", str(10**12)]),
                         (shared_exclusive, ["--exclusive-epochs", str(10**12)]),
                         (infogan, ["--n-cat", "0"])):
        err = one_line_exit_2(capsys, script.parse_args, [*argv, *out])  # before any work
        assert argv[0] in err
    speed = script_module("benchmarks/speed.py")
    err = one_line_exit_2(capsys, speed.parse_args, ["--batch-size", "1"])
    assert "--batch-size" in err
    with pytest.raises(common.UserError, match="--n-queries 361"):
        shared_exclusive.main(["--n-queries", "361", "--max-steps", "1", "--eval-every", "0",
                               "--no-progress", *out])
    assert not os.listdir(tmp_path)


def test_infogan_without_a_categorical_code_trains(tmp_path, small_digits):
    infogan.main(["--n-cat", "0", "--cluster-mi", "0", "--width", "8", "--fc-dim", "32",
                  "--q-dim", "16", "--batch-size", "32", "--epochs", "1", "--no-progress",
                  "--eval-every", "0", "--out-dir", str(tmp_path)])
    assert os.path.exists(os.path.join(run_folder(tmp_path), "checkpoint.pt"))


# ---- 6: broken datasets and checkpoints ----------------------------------------------------
def write_idx(path, magic, array):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_with_fewer_labels_than_images_and_a_failed_load_are_one_line(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n_labels in (("train", 8), ("t10k", 4)):
        write_idx(raw / f"{split}-images-idx3-ubyte", 0x803, np.zeros((10 if split == "train" else 4, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", 0x801, np.zeros(n_labels))
    with pytest.raises(common.UserError, match="train split has 10 images but 8 labels"):
        common.load_data("mnist", str(tmp_path))
    offline = tmp_path / "offline"
    with pytest.raises(common.UserError, match="could not load mnist"):
        common.load_data("mnist", str(offline))
    assert not offline.exists()  # no empty MNIST/raw left to mislead the next try


def tiny_checkpoint(path, encoder=None):
    torch.manual_seed(0)
    cfg = common.encoder_config("dcgan", (1, 32, 32), 8)
    encoder = encoder or common.build_encoder(cfg)
    data = common.Data("digits", torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.zeros(4),
                       torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.zeros(4), 10)
    common.save_checkpoint(str(path), script="dim_local", encoder=encoder, encoder_cfg=cfg,
                           args=common.argparse.Namespace(data_root="./data"), data=data,
                           epoch=1, step=1)


def test_eval_probe_refuses_an_edited_or_non_finite_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    for edit, message in (({"arch": "vgg"}, "no known architecture"), ({"y_dim": 9}, "does not match"),
                          ({"depth": 3}, "builds no encoder")):
        torch.save({**ckpt, "encoder_cfg": {**ckpt["encoder_cfg"], **edit}}, path)
        with pytest.raises(common.UserError, match=message):
            eval_probe.main([str(path)])
    weights = {k: v.clone() for k, v in ckpt["encoder"].items()}
    weights["out.weight"][0, 0] = float("nan")
    torch.save({**ckpt, "encoder": weights}, path)
    with pytest.raises(common.UserError, match="nan or inf"):
        eval_probe.main([str(path)])


def test_eval_probe_refuses_more_neighbours_than_images(tmp_path, small_digits):
    dim_local.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path)])
    ckpt = os.path.join(run_folder(tmp_path), "checkpoint.pt")
    with pytest.raises(common.UserError, match="--knn-k 33 is more than the 32 labelled"):
        eval_probe.main([ckpt, "--knn-k", "33", "--probes", "knn", "--taps", "y"])


# ---- 8: non-finite weights, SIGTERM ---------------------------------------------------------
def test_non_finite_weights_are_never_saved(tmp_path):
    torch.manual_seed(0)
    encoder = common.build_encoder(common.encoder_config("dcgan", (1, 32, 32), 8))
    with torch.no_grad():
        encoder.out.weight[0, 0] = float("inf")
    with pytest.raises(common.UserError, match="hold nan or inf after step 1; nothing was saved"):
        tiny_checkpoint(tmp_path / "checkpoint.pt", encoder)
    assert not os.listdir(tmp_path)
    with pytest.raises(common.UserError, match="y features hold nan or inf"):
        common.check_finite_features(np.array([[0.0, np.nan]]), "y")


def test_infoae_at_an_absurd_learning_rate_exits_in_one_line_with_nothing_saved(tmp_path, small_digits):
    with pytest.raises(common.UserError, match="nan or inf"):
        infoae.main(["--lr", "1e30", "--width", "4", "--hidden", "32", "--batch-size", "32",
                     "--epochs", "1", "--no-progress", "--eval-every", "0", "--out-dir", str(tmp_path)])
    assert not any(f == "checkpoint.pt" for _, _, files in os.walk(tmp_path) for f in files)


def test_whitening_overflowed_codes_is_one_line(capsys):
    """shared_exclusive --lr 1e30 ended in LinAlgError from the whitening's Cholesky."""
    whiten = shared_exclusive.Whitening(4).train()
    err = one_line_exit_2(capsys, common.run_cli, lambda: whiten(torch.full((8, 4), float("nan"))))
    assert "lower --lr" in err


def test_reproduce_with_an_empty_mnist_folder_is_one_line(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    p = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--data-root", str(tmp_path),
                        "--out", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "could not load mnist" in p.stderr


def test_sigterm_before_the_first_checkpoint_leaves_no_folder(tmp_path):
    code = ("import argparse, os, signal, time, common\n"
            "def main():\n"
            f"    common.Run('dim_local', argparse.Namespace(out_dir={str(tmp_path)!r}, dataset='digits'))\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "common.run_cli(main)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    assert not os.listdir(tmp_path)


# The state_dict keys of the encoders that lived in common.py before issue 36 (checkpoints
# written then hold exactly these): the scripts that own them now must keep them.
OLD_ENCODER_KEYS = {
    "infoae": ["c1.0.weight", "c1.0.bias", "c2.0.weight", "c2.1.weight", "c3.0.weight",
               "c3.1.weight", "fc.0.weight", "fc.1.weight", "out.weight", "out.bias"],
    "infogan": ["c1.0.weight", "c1.0.bias", "c2.0.weight", "c2.1.weight", "fc.0.weight",
                "fc.1.weight", "q_hidden.0.weight", "q_hidden.1.weight"],
    "dcgan-white": ["c1.0.weight", "c3.1.running_var", "out.weight", "y_norm.running_cov"],
}


@pytest.mark.parametrize("script, arch", [("infoae", "infoae"), ("infogan", "infogan"),
                                          ("shared_exclusive", "dcgan-white")])
def test_eval_probe_rebuilds_an_encoder_its_script_owns(tmp_path, script, arch):
    module = {"infoae": infoae, "infogan": infogan, "shared_exclusive": shared_exclusive}[script]
    cfg = common.encoder_config(arch, (1, 32, 32), 8, module.ENCODERS)
    encoder = common.build_encoder(cfg, module.ENCODERS)
    assert set(OLD_ENCODER_KEYS[arch]) <= set(encoder.state_dict())
    data = common.Data("digits", torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.zeros(4),
                       torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.zeros(4), 10)
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(str(path), script=script, encoder=encoder, encoder_cfg=cfg,
                           args=common.argparse.Namespace(), data=data, epoch=1, step=1)
    args = eval_probe.parse_args([str(path)])
    ckpt, found, rebuilt = eval_probe.load_encoder(args, torch.device("cpu"))
    assert found is module and type(rebuilt) is type(encoder)
    for k, v in encoder.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    # a checkpoint naming a script this copy lacks: common's encoders only, one line
    torch.save({**torch.load(path, weights_only=True), "script": "someone_elses"}, path)
    with pytest.raises(common.UserError, match="no known architecture.*code that wrote it"):
        eval_probe.load_encoder(args, torch.device("cpu"))
