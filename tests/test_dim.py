"""Deep InfoMax scripts and eval_probe end to end on the bundled digits, plus error paths."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import dim_global
import dim_local
import eval_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--no-progress", "--max-steps", "3", "--batch-size", "32", "--epochs", "1"]


def run_script(*argv, env=None):
    """Run a top-level script as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=600)
    return p.returncode, p.stdout, p.stderr


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("script,extra", [
    (dim_local, ["--loss", "jsd", "--embed-dim", "64"]),
    (dim_local, ["--critic", "concat", "--loss", "dv", "--alpha", "0.5"]),
    (dim_global, ["--loss", "infonce"]),
])
def test_smoke_three_steps_write_a_checkpoint_that_eval_probe_rebuilds(tmp_path, script, extra):
    # a smoke test: three steps teach an encoder nothing measurable on digits (an untrained
    # one already probes at 0.94); test_training_raises_the_local_bound checks learning. What
    # it checks: the checkpoint format, and that eval_probe's rebuilt encoder is the trained
    # one, since its linear probe on y must equal the script's own to the last digit
    run = script.train(script.parse_args([*FAST, "--out-dir", str(tmp_path), *extra]))
    ckpt = torch.load(run.path("checkpoint.pt"), weights_only=True)  # plain types only
    assert ckpt["step"] == 3 and ckpt["script"] == script.__name__
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["encoder"])
    metrics = read_metrics(run.dir)
    lines = [m for m in metrics if "loss" in m]  # a line every --log-every steps and at the end
    assert lines[-1]["step"] == 3 and np.isfinite(lines[-1]["loss"])
    result = eval_probe.main([run.path("checkpoint.pt"), "--probes", "linear,knn,kmeans",
                              "--device", "cpu"])
    taps = [r["tap"] for r in result["results"]]
    assert taps == ["conv", "fc", "y"]
    assert result["results"][2]["linear"] == pytest.approx(metrics[-1]["linear_y"], abs=1e-9)
    final = metrics[-1]  # two encoders: one of their three probes differs (one can tie on 360 digits)
    assert ([final[k] for k in ("linear_y", "kmeans_y", "knn_y")]
            != [final[k + "_random_init"] for k in ("linear_y", "kmeans_y", "knn_y")])
    assert os.path.exists(os.path.join(run.dir, "eval.json"))


def test_training_raises_the_local_bound(tmp_path):
    run = dim_local.train(dim_local.parse_args(
        ["--paper", "--no-progress", "--epochs", "2", "--max-steps", "30", "--embed-dim", "256",
         "--gamma", "0", "--lr", "5e-4", "--log-every", "15", "--out-dir", str(tmp_path)]))
    epochs = [m for m in read_metrics(run.dir) if "local_mi" in m]
    # infoNCE with (N-1)*M^2+1 = 4033 candidates: the scaled critic starts near 0 (not
    # saturated far below it) and the bound must climb from there
    assert epochs[0]["local_mi"] > -0.5
    assert epochs[1]["local_mi"] > epochs[0]["local_mi"] + 0.2


def test_resume_continues_from_the_saved_step(tmp_path):
    args = ["--no-progress", "--batch-size", "32", "--embed-dim", "64", "--out-dir", str(tmp_path)]
    run = dim_local.train(dim_local.parse_args([*args, "--epochs", "1", "--max-steps", "2"]))
    ckpt_path = run.path("checkpoint.pt")
    first = torch.load(ckpt_path, weights_only=True)
    resumed = dim_local.train(dim_local.parse_args(
        [*args, "--epochs", "2", "--max-steps", "5", "--resume", ckpt_path]))
    assert resumed.dir == run.dir and len(os.listdir(tmp_path)) == 1  # same run folder
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert (first["step"], first["epoch"]) == (2, 1) and (ckpt["step"], ckpt["epoch"]) == (5, 2)
    epochs = [m for m in read_metrics(run.dir) if "epoch" in m]
    # the line every --log-every steps (resolved to 2 from the first run's length, kept in
    # its args) and the last step's
    assert [(m["epoch"], m["step"]) for m in epochs] == [(1, 2), (2, 4), (2, 5)]
    # optimiser state came back too: Adam's step count continues rather than restarting
    assert ckpt["optimizers"]["opt"]["state"][0]["step"].item() == 5


def test_cluster_accuracy_is_invariant_to_label_permutation():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    perm = rng.permutation(10)
    assert common.cluster_accuracy(perm[labels], labels) == 1.0
    noisy = np.where(rng.random(500) < 0.3, rng.integers(0, 10, 500), labels)
    acc = common.cluster_accuracy(noisy, labels)
    assert common.cluster_accuracy(perm[noisy], labels) == pytest.approx(acc)
    assert 0.6 < acc < 0.85
    assert common.cluster_accuracy(np.zeros(500, int), labels) == pytest.approx(np.bincount(labels).max() / 500)


def test_digits_split_is_fixed_and_stratified():
    a, b = common.load_digits_data(), common.load_digits_data()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    tx, ty, vx, vy = a
    assert tx.shape == (1437, 1, 32, 32) and vx.shape == (360, 1, 32, 32) and tx.dtype == torch.uint8
    assert np.bincount(vy.numpy()).min() >= 35  # every class in the test split


def test_stl_style_crop_and_flip_stay_on_the_batch():
    data = common.Data("toy", torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8).to(torch.uint8), torch.zeros(2),
                       torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1), 10, crop=4)
    g = torch.Generator().manual_seed(0)
    x = data.preprocess(data.train_x, train=True, rng=g)
    assert x.shape == (2, 3, 4, 4) and data.image_shape == (3, 4, 4)
    full = data.preprocess(data.train_x, train=False)
    assert full.shape == (2, 3, 4, 4)
    # every crop is a contiguous window of its own image (possibly mirrored)
    src = data.train_x.float() / 127.5 - 1
    for i in range(2):
        windows = [src[i, :, r:r + 4, c:c + 4] for r in range(5) for c in range(5)]
        assert any(torch.equal(x[i], w) or torch.equal(x[i], w.flip(2)) for w in windows)


def test_bad_flag_gives_one_line_and_exit_2(tmp_path):
    code, out, err = run_script("dim_local.py", "--loss", "nope", "--out-dir", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--loss" in err
    assert not os.listdir(tmp_path)


def test_missing_and_corrupt_checkpoints(tmp_path):
    code, _, err = run_script("eval_probe.py", str(tmp_path / "nothing.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = run_script("eval_probe.py", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a readable checkpoint" in err
    code, _, err = run_script("dim_local.py", "--resume", str(bad), "--out-dir", str(tmp_path / "runs"))
    assert code == 2 and "not a readable checkpoint" in err and not (tmp_path / "runs").exists()


def test_offline_dataset_says_where_to_put_the_files(tmp_path):
    dead = "http://127.0.0.1:9"  # nothing listens there: the download fails at once
    code, _, err = run_script("dim_local.py", "--dataset", "mnist", "--data-root", str(tmp_path / "data"),
                              "--out-dir", str(tmp_path / "runs"),
                              env={"http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead,
                                   "HTTPS_PROXY": dead})
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "MNIST/raw" in err and not (tmp_path / "runs").exists()


def test_dim_local_and_dim_global_differ_only_in_docstring_defaults_and_script_name():
    """The two scripts are one script with two sets of defaults (CleanRL-style variants):
    with the module docstring, every `default=` value, the defaults passed to
    common.add_common_args and the values of SCRIPT, PAPER and RECIPE blanked, their syntax trees are identical, so a
    fix to one cannot be forgotten in the other."""
    import ast

    def normalised(name):
        with open(os.path.join(ROOT, name)) as f:
            tree = ast.parse(f.read())
        tree.body[0].value.value = "docstring"
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "default":
                node.value = ast.Constant(None)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_common_args"):
                for kw in node.keywords:
                    kw.value = ast.Constant(None)
            if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in ("SCRIPT", "PAPER", "RECIPE")):
                node.value = ast.Constant(None)
        return ast.dump(tree)

    assert normalised("dim_local.py") == normalised("dim_global.py")
    assert (dim_local.SCRIPT, dim_global.SCRIPT) == ("dim_local", "dim_global")
    local, global_ = dim_local.parse_args(["--paper"]), dim_global.parse_args(["--paper"])
    assert (local.alpha, local.beta, local.gamma) == (0.0, 1.0, 0.1)  # DIM(L), the paper's
    assert (global_.alpha, global_.beta, global_.gamma) == (1.0, 0.0, 1.0)  # DIM(G), the paper's
    assert dim_local.parse_args([]).gamma == dim_global.parse_args([]).gamma == 0.0  # the recipe's


def test_paper_restores_the_papers_configuration_and_a_given_flag_wins():
    recipe, paper = dim_local.parse_args([]), dim_local.parse_args(["--paper"])
    assert (paper.embed_dim, paper.lr, paper.shift, paper.cross_view, paper.gamma) == (2048, 1e-4, 0, "none", 0.1)
    assert (paper.lr_schedule, paper.epochs, paper.score_scale) == ("constant", 200, 2048 ** -0.5)
    assert recipe.epochs is None  # the recipe's length comes from the data's size
    assert {k: getattr(recipe, k) for k in dim_local.RECIPE} == dim_local.RECIPE
    mixed = dim_local.parse_args(["--paper", "--gamma", "0", "--embed-dim", "512"])
    assert (mixed.gamma, mixed.embed_dim, mixed.lr) == (0.0, 512, 1e-4)
    assert dim_local.recipe_epochs(60000, 64) == 16 and dim_local.recipe_epochs(1437, 64) == 29
    assert dim_local.recipe_epochs(2000, 64) == 20  # mnist-dev: the 620 x 64-image rule, unchanged
