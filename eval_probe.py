"""Evaluate any saved encoder: linear and MLP probes, k-NN and k-means clustering.

    python eval_probe.py runs/dim_local-digits-<time>/checkpoint.pt
    python eval_probe.py runs/<run>/checkpoint.pt --random-init      # the untrained baseline
    python eval_probe.py runs/<run>/checkpoint.pt --dataset mnist    # transfer

The encoder is rebuilt from the checkpoint alone (its architecture arguments are stored in
it), frozen and kept in eval() so BatchNorm statistics never move; its weights are checked to
be unchanged afterwards. For every tap (`conv`, `fc`, `y` by default) it reports:
- linear: multinomial logistic regression on standardised features (scikit-learn);
- mlp: one 200-unit hidden layer with dropout, the classifier of DIM's Table 1;
- knn: k-nearest-neighbour accuracy (cosine distance);
- kmeans: k-means on the test features with k = number of classes, accuracy under the best
  one-to-one matching of clusters to labels (Hungarian).
Results are printed as a table and written to eval.json beside the checkpoint
(eval-random-init.json for --random-init, eval-<dataset>.json for transfer).
"""
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

PROBES = ("linear", "mlp", "knn", "kmeans")


def parse_args(argv=None):
    p = common.ArgumentParser(description="Evaluate a saved encoder with frozen-feature probes")
    p.add_argument("checkpoint", help="checkpoint.pt written by any script of this repo")
    p.add_argument("--dataset", default=None, choices=common.DATASETS,
                   help="evaluate on another dataset (transfer); default: the run's dataset")
    p.add_argument("--data-root", default=None, help="default: the run's --data-root")
    p.add_argument("--taps", default="conv,fc,y", help="comma-separated encoder taps to probe")
    p.add_argument("--probes", default=",".join(PROBES), help="comma-separated subset of " + ",".join(PROBES))
    p.add_argument("--random-init", action="store_true",
                   help="evaluate an untrained encoder of the same architecture (baseline)")
    p.add_argument("--knn-k", type=common.positive_int, default=20, help="neighbours for k-NN")
    p.add_argument("--mlp-epochs", type=common.positive_int, default=50, help="MLP probe epochs")
    p.add_argument("--mlp-hidden", type=common.positive_int, default=200, help="MLP hidden units")
    p.add_argument("--dropout", type=float, default=0.5, help="MLP probe dropout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--out", default=None, help="where to write the JSON (default beside the checkpoint)")
    args = p.parse_args(argv)
    args.taps = [t for t in args.taps.split(",") if t]
    args.probes = [t for t in args.probes.split(",") if t]
    bad = [t for t in args.probes if t not in PROBES]
    if bad:
        p.error(f"unknown probe(s) {', '.join(bad)}; choose from {', '.join(PROBES)}")
    return args


def mlp_probe(train_x, train_y, test_x, test_y, n_classes, hidden, dropout, epochs, device, seed):
    """Test accuracy of a one-hidden-layer classifier on frozen, standardised features."""
    torch.manual_seed(seed)
    keep = train_y >= 0
    mean, std = train_x[keep].mean(0), train_x[keep].std(0) + 1e-6
    tx = torch.tensor((train_x[keep] - mean) / std, device=device)
    ty = torch.tensor(train_y[keep], device=device)
    vx = torch.tensor((test_x - mean) / std, device=device)
    net = nn.Sequential(nn.Linear(tx.shape[1], hidden), nn.ReLU(), nn.Dropout(dropout),
                        nn.Linear(hidden, n_classes)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    for _ in range(epochs):
        for idx in torch.randperm(len(tx), device=device).split(128):
            loss = F.cross_entropy(net(tx[idx]), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(b).argmax(1) for b in vx.split(1024)]).cpu().numpy()
    return float((pred == test_y).mean())


def knn_accuracy(train_x, train_y, test_x, test_y, k):
    from sklearn.neighbors import KNeighborsClassifier
    keep = train_y >= 0
    clf = KNeighborsClassifier(n_neighbors=min(k, int(keep.sum())), metric="cosine", algorithm="brute")
    return float(clf.fit(train_x[keep], train_y[keep]).score(test_x, test_y))


def load_encoder(args, device):
    ckpt = common.load_checkpoint(args.checkpoint)
    if args.random_init:
        torch.manual_seed(args.seed)
        encoder = common.build_encoder(ckpt["encoder_cfg"])
    else:
        encoder = common.encoder_from_checkpoint(ckpt)
    encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return ckpt, encoder


def evaluate(args):
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    ckpt, encoder = load_encoder(args, device)
    run_args = ckpt["args"]
    dataset = args.dataset or ckpt["dataset"]
    data_root = args.data_root or run_args.get("data_root", "./data")
    data = common.load_data(dataset, data_root, device, image_size=ckpt["image_shape"][-1])
    if list(data.image_shape) != list(ckpt["image_shape"]):
        raise UserError(f"the encoder takes images of shape {tuple(ckpt['image_shape'])} but "
                        f"{dataset} has {tuple(data.image_shape)}; pick a dataset with that shape")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    available = common.tap_shapes(encoder, data.image_shape, device)
    taps = [t for t in args.taps if t in available]
    if not taps:
        raise UserError(f"none of the taps {args.taps} exist; this encoder has {', '.join(available)}")
    train_f, train_y = common.extract_features(encoder, data, "train", taps, device=device)
    test_f, test_y = common.extract_features(encoder, data, "test", taps, device=device)
    for k, v in encoder.state_dict().items():  # frozen means frozen, BatchNorm buffers included
        assert torch.equal(v, before[k]), f"encoder weight {k} changed during evaluation"

    rows = []
    for tap in taps:
        row = {"tap": tap, "dim": train_f[tap].shape[1]}
        tx, vx = train_f[tap], test_f[tap]
        if "linear" in args.probes:
            row["linear"] = common.linear_probe(tx, train_y, vx, test_y)
        if "mlp" in args.probes:
            row["mlp"] = mlp_probe(tx, train_y, vx, test_y, data.n_classes, args.mlp_hidden,
                                   args.dropout, args.mlp_epochs, device, args.seed)
        if "knn" in args.probes:
            row["knn"] = knn_accuracy(tx, train_y, vx, test_y, args.knn_k)
        if "kmeans" in args.probes:
            row["kmeans"] = common.kmeans_accuracy(vx, test_y, data.n_classes, args.seed)
        rows.append(row)
    return ckpt, dataset, rows


def main(argv=None):
    args = parse_args(argv)
    ckpt, dataset, rows = evaluate(args)
    kind = "random-init encoder" if args.random_init else f"{ckpt['script']} encoder"
    common.print_table(rows, title=f"{kind} ({ckpt['encoder_cfg']['arch']}) on {dataset}, test accuracy")
    if args.out:
        out = args.out
    else:
        suffix = "-random-init" if args.random_init else ""
        suffix += f"-{dataset}" if dataset != ckpt["dataset"] else ""
        out = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval{suffix}.json")
    result = {"checkpoint": os.path.abspath(args.checkpoint), "script": ckpt["script"],
              "dataset": dataset, "random_init": args.random_init, "epoch": ckpt["epoch"],
              "step": ckpt["step"], "results": rows}
    common.atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    common.run_cli(main)
