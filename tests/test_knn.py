"""The temperature-weighted k-NN (InstDisc's rule, solo-learn's and lightly's k-NN) against a
naive loop, and scikit-learn's uniform vote still reachable from eval_probe and the monitor."""
import json
import math

import numpy as np
import pytest
import torch

import common
import dim_global
import eval_probe


def naive_weighted_knn(train_x, train_y, test_x, test_y, k, temperature):
    """One test point at a time, in float64: cosine similarity to every labelled training
    point, the k most similar vote exp(similarity / T) for their label, largest sum wins."""
    keep = train_y >= 0
    bank, labels = train_x[keep], train_y[keep]
    correct = 0
    for q, y in zip(test_x, test_y):
        sims = [float(b @ q / (np.linalg.norm(b) * np.linalg.norm(q))) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = {}
        for i in nearest:
            votes[labels[i]] = votes.get(labels[i], 0.0) + math.exp(sims[i] / temperature)
        best = max(votes.values())
        correct += min(c for c, v in votes.items() if v == best) == y
    return correct / len(test_y)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (200, 0.1), (7, 1.0)])
def test_weighted_knn_matches_a_naive_loop(k, temperature):
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(4, 6))
    train_y = rng.integers(0, 4, 150)
    test_y = rng.integers(0, 4, 40)
    train_x = (centres[train_y] + 1.2 * rng.normal(size=(150, 6))).astype(np.float32)
    test_x = (centres[test_y] + 1.2 * rng.normal(size=(40, 6))).astype(np.float32)
    train_y[:10] = -1  # unlabelled images never vote
    expected = naive_weighted_knn(train_x, train_y, test_x, test_y, k, temperature)
    assert 0.3 < expected < 1  # neither trivial nor hopeless, so a wrong rule shows
    got = common.weighted_knn_accuracy(train_x, train_y, test_x, test_y, k, temperature,
                                       batch_size=7)  # several test batches
    assert got == pytest.approx(expected, abs=1e-12)
    as_tensors = common.weighted_knn_accuracy(*map(torch.as_tensor, (train_x, train_y, test_x, test_y)),
                                              k, temperature)
    assert as_tensors == got


def test_weighted_vote_favours_the_closest_where_the_uniform_vote_counts_heads():
    # one training point of class 1 right at the test point, two of class 0 further away:
    # weighted (T small) follows the near one, uniform follows the majority
    train_x = np.array([[1.0, 0.02], [1.0, 0.6], [1.0, -0.6]], dtype=np.float32)
    train_y = np.array([1, 0, 0])
    test_x, test_y = np.array([[1.0, 0.0]], dtype=np.float32), np.array([1])
    assert common.weighted_knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=0.07) == 1.0
    assert common.knn_accuracy(train_x, train_y, test_x, test_y, k=3) == 0.0
    # a large T makes every vote about equal: the majority wins again
    assert common.weighted_knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=100.0) == 0.0


def test_monitor_rules_equal_their_functions_on_the_encoders_features():
    torch.manual_seed(0)
    data = common.load_data("digits")
    encoder = common.build_encoder(common.encoder_config("dcgan", data.image_shape, 16))
    feats = {s: common.extract_features(encoder, data, s) for s in ("train", "test")}
    (tr, ytr), (te, yte) = feats["train"], feats["test"]
    uniform = common.knn_monitor(encoder, data, "cpu", rule="uniform")
    weighted = common.knn_monitor(encoder, data, "cpu")  # the default
    assert uniform == common.knn_accuracy(tr["y"], ytr, te["y"], yte, 20)
    assert weighted == pytest.approx(common.weighted_knn_accuracy(tr["y"], ytr, te["y"], yte), abs=1e-12)


def test_eval_probe_reports_the_rule_and_keeps_the_uniform_vote(tmp_path, monkeypatch):
    tx, ty, vx, vy = common.load_digits_data()  # a small split: the probes are quick
    monkeypatch.setattr(common, "load_digits_data",
                        lambda test_fraction=0.2, size=32: (tx[:256], ty[:256], vx[:128], vy[:128]))
    run = dim_global.train(dim_global.parse_args(
        ["--no-progress", "--max-steps", "2", "--batch-size", "32", "--epochs", "1",
         "--eval-every", "0", "--y-dim", "16", "--out-dir", str(tmp_path)]))
    ckpt = run.path("checkpoint.pt")
    results = {}
    for rule in common.KNN_RULES:
        out = str(tmp_path / f"{rule}.json")
        eval_probe.main([ckpt, "--probes", "knn", "--taps", "y", "--device", "cpu",
                         "--knn-rule", rule, "--out", out])
        with open(out) as f:
            results[rule] = json.load(f)
    assert results["weighted"]["knn"] == {"rule": "weighted", "k": 20, "temperature": 0.07}
    assert results["uniform"]["knn"] == {"rule": "uniform", "k": 20, "temperature": None}
    encoder = common.encoder_from_checkpoint(common.load_checkpoint(ckpt)).eval()
    data = common.load_data("digits")
    (tr, ytr), (te, yte) = (common.extract_features(encoder, data, s) for s in ("train", "test"))
    assert results["uniform"]["results"][0]["knn"] == common.knn_accuracy(tr["y"], ytr, te["y"], yte, 20)
    assert results["weighted"]["results"][0]["knn"] == pytest.approx(
        common.weighted_knn_accuracy(tr["y"], ytr, te["y"], yte, 20, 0.07), abs=1e-12)
