"""benchmarks/reproduce.py end to end at a few steps: every recipe's keys reach the JSON."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reproduce_writes_every_key_of_a_dim_recipe_and_the_baselines(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--only", "dim_global",
                           "--max-steps", "3", "--threads", "1", "--out", str(out),
                           "--keep-runs", str(tmp_path / "runs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["environment"]["threads"] == 1 and r["environment"]["torch"]
    m = r["dim_global"]["0"]
    for k in ("y_linear", "y_knn", "y_kmeans", "conv_linear", "minutes"):
        assert 0 <= m[k] <= 1 or k == "minutes"
    # the untrained encoder is a different network: its probes are not the trained one's copies
    assert m["untrained_conv_linear"] != m["conv_linear"] or m["untrained_y_knn"] != m["y_knn"]
    # raw pixels of the bundled digits: logistic regression is far above chance
    assert r["baselines"]["pixels_linear"] > 0.85
    assert "| dim_global | `python dim_global.py --seed 0` | 0 |" in proc.stdout


def test_reproduce_refuses_an_unknown_method_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--only", "dim_lokal"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown method(s) dim_lokal" in proc.stderr


def test_merge_joins_calls_run_side_by_side_and_refuses_a_clash(tmp_path):
    env = {"threads": 1, "torch": "2.x", "device": "cpu"}
    base = {"environment": env, "dataset": "mnist",
            "baselines": {"pixels_linear": 0.886, "pixels_kmeans": 0.54}}
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    a.write_text(json.dumps({**base, "infogan": {"0": {"cluster_acc": 0.61, "minutes": 9.0}}}))
    b.write_text(json.dumps({**base, "infoae": {"0": {"cluster_acc": 0.7, "minutes": 8.0}},
                             "infogan": {"1": {"cluster_acc": 0.52, "minutes": 9.5}}}))
    proc = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--merge", str(a), str(b),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["infogan"] == {"0": {"cluster_acc": 0.61, "minutes": 9.0},
                            "1": {"cluster_acc": 0.52, "minutes": 9.5}}
    assert r["infoae"]["0"]["cluster_acc"] == 0.7
    rows = [l.split(" | ") for l in proc.stdout.splitlines() if l.startswith("| info")]
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        ("| infogan", "0", "cluster_acc 0.610", "9.0 |"), ("| infogan", "1", "cluster_acc 0.520", "9.5 |"),
        ("| infoae", "0", "cluster_acc 0.700", "8.0 |")]
    assert all("--data-root DIR" in r[1] for r in rows)
    proc = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--merge", str(a), str(a),
                           "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "infogan seed 0 is in two files" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_merge_refuses_files_from_cpus_with_other_vector_units(tmp_path):
    """Minutes measured on AVX2 and on AVX-512 do not belong in one table; a file written
    before the instruction set was recorded still joins one that records it."""
    base = {"dataset": "mnist", "baselines": {}}
    env = {"threads": 2, "torch": "2.x", "device": "cpu"}
    files = {}
    for name, isa, seed in (("old", None, "0"), ("avx2", "AVX2", "1"), ("avx512", "AVX512", "2")):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({**base, "environment": {**env, **({"cpu_capability": isa} if isa else {})},
                                           "infogan": {seed: {"cluster_acc": 0.6, "minutes": 9.0}}}))
    merge = lambda *names: subprocess.run(
        [sys.executable, "benchmarks/reproduce.py", "--merge", *map(str, (files[n] for n in names)),
         "--out", str(tmp_path / "all.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    for names in (("old", "avx2"), ("avx2", "old")):
        proc = merge(*names)
        assert proc.returncode == 0 and "mnist; CPU (AVX2), 2 threads" in proc.stdout, proc.stderr[-2000:]
    (tmp_path / "all.json").unlink()
    for names in (("avx2", "avx512"), ("old", "avx2", "avx512")):  # the old file hides no clash
        proc = merge(*names)
        assert proc.returncode == 1 and "environment cpu_capability 'AVX512' differs from 'AVX2'" in proc.stderr
        assert not (tmp_path / "all.json").exists()



@pytest.mark.parametrize("script", ["dim_local", "dim_global", "infogan", "infoae", "shared_exclusive"])
def test_no_default_is_keyed_to_the_datasets_name(script):
    """What a run gets by default follows from the data (its size, its images), never from
    the name passed to --dataset: every value but --dataset parses the same for each name."""
    module = importlib.import_module(script)
    names = (module.PAIR_DATASETS if script == "shared_exclusive" else  # its pairs
             ("digits", "mnist", "fashion-mnist", "cifar10"))
    # --paper's epochs may be the paper's own per dataset (DIM: 1000 on CIFAR, 200 elsewhere)
    parsed = [{k: v for k, v in vars(module.parse_args(["--dataset", name, *flags])).items()
               if k != "dataset" and not (flags and k == "epochs")}
              for name in names for flags in ([], ["--paper"])]
    assert len(parsed) >= 6 and parsed[0] != parsed[1]  # --paper changes something
    assert all(p == parsed[0] for p in parsed[0::2]) and all(p == parsed[1] for p in parsed[1::2])


def test_shared_exclusive_stage_lengths_follow_the_datas_size():
    """The recipe's stage lengths, in whole epochs of --batch-size: colourful digits and 2,000
    MNIST pairs keep 36 + 29 and 26 + 20 epochs (792 + 620 steps); 60,000 pairs run stage 1 for
    its 5-epoch minimum and stage 2 for one epoch."""
    import common
    import shared_exclusive
    data = lambda n: common.Data("n", torch.zeros(n, 1, 1, 1), torch.zeros(n),
                                 torch.zeros(1, 1, 1, 1), torch.zeros(1), 10)
    lengths = [tuple(shared_exclusive.stage_epochs(stage, data(n), 64) for stage in (1, 2))
               for n in (1437, 2000, 60000)]
    assert lengths == [(36, 29), (26, 20), (5, 1)]
    assert shared_exclusive.parse_args(["--epochs", "5"]).exclusive_epochs == 5  # --epochs sets both


def test_merge_reads_older_files_whose_shared_exclusive_keys_said_digit(tmp_path):
    """Files written before pairs of garments named the class "digit": merged, they print as
    the new ones do, with every number where it was."""
    old = {"s_x_digit": 0.91, "s_y_digit": 0.92, "s_x_background": 0.11, "s_y_foreground": 0.12,
           "z_x_background": 1.0, "z_y_foreground": 0.99, "z_x_digit": 0.13, "z_y_digit": 0.14}
    old.update({k + "_whitened": round(v + 0.001, 3) for k, v in list(old.items())})
    a, out = tmp_path / "a.json", tmp_path / "all.json"
    a.write_text(json.dumps({"environment": {"threads": 1, "torch": "2.x", "device": "cpu"},
                             "dataset": "mnist", "baselines": {},
                             "shared_exclusive": {"0": {**old, "minutes": 25.0}}}))
    proc = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--merge", str(a), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["shared_exclusive"]["0"]["z_y_class_whitened"] == 0.141
    (row,) = [l for l in proc.stdout.splitlines() if l.startswith("| shared_exclusive |")]
    assert ("S class 0.910 / 0.920, S colour 0.110 / 0.120, Z colour 1.000 / 0.990, Z class 0.130 / 0.140; "
            "whitened-sk-mlp S class 0.911 / 0.921") in row


def test_grey_baselines_read_the_class_from_pixels_and_principal_components():
    """shared_exclusive's yardstick: the MLP probe on the bundled digits' grey pixels and on
    their first 16 / 32 principal components predicts the digit far above chance (0.10), and
    the table shows the three levels."""
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "benchmarks", "reproduce.py"))
    reproduce = importlib.util.module_from_spec(spec)  # as the user runs it (not a package)
    spec.loader.exec_module(reproduce)
    levels = reproduce.grey_baselines("digits", None)
    assert set(levels) == {"grey_pixels_mlp", "grey_pca16_mlp", "grey_pca32_mlp"}
    assert levels["grey_pixels_mlp"] > 0.95 and levels["grey_pca16_mlp"] > 0.9 and levels["grey_pca32_mlp"] > 0.9
    assert levels["grey_pca16_mlp"] != levels["grey_pca32_mlp"]  # two projections, not one
    table = reproduce.markdown({"dataset": "digits", "baselines": {"pixels_linear": 0.9, "pixels_kmeans": 0.8,
                                                                     **levels}})
    assert (f"| grey images, MLP probe on the class | | | pixels {levels['grey_pixels_mlp']:.3f}, "
            f"PCA-16 {levels['grey_pca16_mlp']:.3f}, PCA-32 {levels['grey_pca32_mlp']:.3f} | |") in table
