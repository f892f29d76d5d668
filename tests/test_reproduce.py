"""benchmarks/reproduce.py end to end at a few steps: every recipe's keys reach the JSON."""
import json
import os
import subprocess
import sys

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
