"""The ceiling a self-supervised encoder is compared with: the same encoder trained with labels.

    python benchmarks/supervised.py --dataset fashion-mnist --data-root DIR --minutes 10

Trains the DIM encoder (common.build_encoder, the same architecture and y size as
dim_local.py) end to end with a linear classifier on y and cross-entropy, with the DIM
recipe's 2-px shifts, Adam and a cosine learning rate over the run, for --minutes of wall
clock or --steps steps, whichever ends first. Then it freezes the encoder and reports what
the DIM runs report: a linear probe (standardised logistic regression) and the cosine 20-NN
on y of the test split, and the classifier's own test accuracy. "Same minutes" means the
same wall clock on the same machine, so run it beside nothing else, or say what shared it.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts
import common  # noqa: E402


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=common.DATASETS)
    p.add_argument("--data-root", default="./data")
    p.add_argument("--minutes", type=common.positive_float, default=10.0,
                   help="wall-clock budget of the training loop")
    p.add_argument("--steps", type=common.positive_int, default=100000, help="step cap")
    p.add_argument("--batch-size", type=common.batch_size_int, default=64)
    p.add_argument("--lr", type=common.positive_float, default=1e-3)
    p.add_argument("--shift", type=common.nonneg_int, default=2)
    p.add_argument("--y-dim", type=common.positive_int, default=64)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--seed", type=common.nonneg_int, default=0)
    p.add_argument("--out", default=None, help="also write the result here as JSON")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = common.get_device("auto")
    common.seed_everything(args.seed)
    data = common.load_data(args.dataset, args.data_root, device)
    common.check_batch(args.batch_size, 1, len(data.train_x))
    encoder = common.build_encoder(common.encoder_config("auto", data.image_shape, args.y_dim)).to(device)
    head = torch.nn.Linear(args.y_dim, data.n_classes).to(device)
    opt = common.adam(list(encoder.parameters()) + list(head.parameters()), lr=args.lr)
    # the schedule needs a length: the steps that fit the budget, estimated from the first 20
    step, t0, planned = 0, time.time(), args.steps
    rng = torch.Generator().manual_seed(args.seed)
    while step < planned and time.time() - t0 < 60 * args.minutes:
        for x, y in data.batches("train", args.batch_size, shuffle=True, rng=rng, drop_last=True):
            if step == 20:
                planned = min(args.steps, int(20 * 60 * args.minutes / (time.time() - t0)))
            for group in opt.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(step / planned, 1)))
            with common.autocast(device, args.amp):
                loss = F.cross_entropy(head(encoder(common.random_shift(x, args.shift, gen))["y"]), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= planned or time.time() - t0 >= 60 * args.minutes:
                break
    minutes = (time.time() - t0) / 60
    encoder.eval()
    tr, ytr = common.extract_features(encoder, data, "train", ("y",), device=device)
    te, yte = common.extract_features(encoder, data, "test", ("y",), device=device)
    with torch.no_grad():
        pred = torch.cat([head(encoder(x)["y"]).argmax(1).cpu() for x, _ in data.batches("test", 500)])
    result = {"dataset": args.dataset, "steps": step, "minutes": round(minutes, 2),
              "classifier": float((pred == data.test_y.cpu()).float().mean()),
              "y_linear": common.linear_probe(tr["y"], ytr, te["y"], yte),
              "y_knn": common.knn_accuracy(tr["y"], ytr, te["y"], yte, k=20),
              "threads": torch.get_num_threads()}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    common.run_cli(main)
