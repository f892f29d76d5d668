"""Evaluate any saved encoder: linear and MLP probes, k-NN and k-means clustering.

    python eval_probe.py runs/dim_local-digits-<time>/checkpoint.pt
    python eval_probe.py runs/<run>/checkpoint.pt --random-init      # the untrained baseline
    python eval_probe.py runs/<run>/checkpoint.pt --dataset mnist    # transfer

The encoder is rebuilt from the checkpoint alone (its architecture arguments are stored in
it), frozen and kept in eval() so BatchNorm statistics never move; its weights are checked to
be unchanged afterwards. For every tap (`conv`, `fc`, `y` by default) it reports:
- linear: multinomial logistic regression on standardised features (scikit-learn);
- mlp: one 200-unit hidden layer with dropout, the classifier of DIM's Table 1;
- knn: k-nearest-neighbour accuracy, by default InstDisc's temperature-weighted vote over
  cosine similarities (k=20, T=0.07: solo-learn's k-NN; lightly's is --knn-k 200
  --knn-temperature 0.1); `--knn-rule uniform` is scikit-learn's uniform vote of the k
  nearest by cosine distance, the rule of this repo's k-NN numbers before 2026-12-06;
- kmeans: k-means on the test features with k = number of classes, accuracy under the best
  one-to-one matching of clusters to labels (Hungarian).
Results are printed as a table and written to eval.json beside the checkpoint
(eval-random-init.json for --random-init, eval-<dataset>.json for transfer).

Deep InfoMax's other measures of a representation (Hjelm et al., ICLR 2019, arXiv:1808.06670,
Table 4), each a flag, all on `--measure-tap` (default y) and stored under "measures":
- --mine: MINE (Belghazi et al., ICML 2018, arXiv:1801.04062) estimate of I(X; y). A
  statistics network T(x, y) (MLP on the flattened image concatenated with y, two 512-unit
  ReLU layers) is trained on the training split to maximise the Donsker-Varadhan bound
  E_joint[T] - log E_marginal[e^T], with MINE's moving average of E_marginal[e^T] in the
  gradient's denominator and a cosine-decaying learning rate (the paper used a decaying
  schedule). Marginal pairs are (x_n, y_m), m != n.
  Reported: the bound on the test split (and the training split), with the number of steps.
- --ndm: neural dependency measure. A discriminator learns to tell y from y with every
  dimension shuffled independently across the batch (the product of its marginals), with the
  logistic loss; its logit is then used as T in the DV bound on the test split, estimating
  KL(joint || product of marginals), the total correlation. About 0 for independent factors.
  The discriminator's state is chosen by early stopping on a held-out fifth of the training
  split (otherwise it memorises small training sets and the test bound goes negative).
- --msssim: a decoder (DCGAN generator shape) trained with mean squared error to reconstruct
  x from the frozen y on the training split; reported: mean MS-SSIM on the test split
  (ms_ssim: 3 scales and a 7x7 window for 32x32 images, see its docstring).
- --tsne: t-SNE of the test features (at most 5000) drawn as a PNG beside the checkpoint,
  one colour per label.
Departures: the paper does not give the statistics networks' sizes, the step counts or the
NDM discriminator's loss; the values here are flags.

    python eval_probe.py runs/<run>/checkpoint.pt --probes linear --mine --ndm --msssim --tsne
"""
import argparse
import importlib
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

PROBES = ("linear", "mlp", "knn", "kmeans")


def pair_label(text):
    """--pair-label: "digit" was the class's name before pairs of garments."""
    if text == "digit":
        raise argparse.ArgumentTypeError("digit is now class (the grey item's class: a digit, a garment)")
    return text


def parse_args(argv=None):
    p = common.ArgumentParser(description="Evaluate a saved encoder with frozen-feature probes")
    p.add_argument("checkpoint", help="checkpoint.pt written by any script of this repo")
    p.add_argument("--dataset", default=None, choices=common.DATASETS,
                   help="evaluate on another dataset (transfer; resized to the encoder's image "
                        "size); default: the run's dataset")
    p.add_argument("--data-root", default=None, help="default: the run's --data-root")
    p.add_argument("--taps", default="conv,fc,y", help="comma-separated encoder taps to probe")
    p.add_argument("--probes", default=",".join(PROBES), help="comma-separated subset of " + ",".join(PROBES))
    p.add_argument("--pair-label", default="class", type=pair_label,
                   choices=["class", "background", "foreground"],
                   help="for shared_exclusive encoders: which label of the image pairs to probe "
                        "(class: the grey item's, a digit or a garment)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate an untrained encoder of the same architecture (baseline)")
    p.add_argument("--knn-k", type=common.positive_int, default=20, help="neighbours for k-NN")
    p.add_argument("--knn-rule", default="weighted", choices=common.KNN_RULES,
                   help="weighted: each neighbour votes exp(cosine / T) (InstDisc, solo-learn); "
                        "uniform: one vote each (scikit-learn)")
    p.add_argument("--knn-temperature", type=common.positive_float, default=0.07,
                   help="T of the weighted vote")
    p.add_argument("--mlp-epochs", type=common.positive_int, default=50, help="MLP probe epochs")
    p.add_argument("--mlp-hidden", type=common.positive_int, default=200, help="MLP hidden units")
    p.add_argument("--dropout", type=common.probability, default=0.5, help="MLP probe dropout")
    p.add_argument("--seed", type=common.seed_int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--out", default=None, help="where to write the JSON (default beside the checkpoint)")
    p.add_argument("--measure-tap", default="y", help="tap measured by --mine/--ndm/--msssim/--tsne")
    p.add_argument("--mine", action="store_true", help="MINE estimate of I(X; y) (slow)")
    p.add_argument("--mine-steps", type=common.positive_int, default=3000, help="MINE training steps")
    p.add_argument("--ndm", action="store_true", help="neural dependency measure of y's factors")
    p.add_argument("--ndm-steps", type=common.positive_int, default=3000, help="NDM training steps")
    p.add_argument("--msssim", action="store_true",
                   help="MS-SSIM of a decoder trained to reconstruct x from y (slow)")
    p.add_argument("--msssim-epochs", type=common.positive_int, default=20, help="decoder epochs")
    p.add_argument("--tsne", action="store_true", help="t-SNE PNG of the test features")
    args = p.parse_args(argv)
    args.taps = [t for t in args.taps.split(",") if t]
    args.probes = [t for t in args.probes.split(",") if t]
    bad = [t for t in args.probes if t not in PROBES]
    if bad:
        p.error(f"unknown probe(s) {', '.join(bad)}; choose from {', '.join(PROBES)}")
    if args.out:  # checked now, not after the probes have run
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--out {args.out}: {folder} is not a writable folder")
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
    opt = common.adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
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


def shuffled_pairs(n, rng=None, device="cpu"):
    """Indices (i, j), i != j everywhere: x_i paired with y_j is a draw from the product of
    the marginals (a random permutation against itself shifted by one)."""
    perm = torch.randperm(n, generator=rng).to(device)
    return perm, perm.roll(1)


def shuffle_columns(f, rng=None):
    """Every column of f permuted independently across the rows: same marginals, no dependence."""
    order = torch.rand(f.shape, generator=rng).to(f.device).argsort(0)
    return f.gather(0, order)


def dv_estimate(t_joint, t_marginal):
    """Donsker-Varadhan: mean T on joint samples minus log-mean-exp of T on marginal ones."""
    return float(t_joint.mean() - (t_marginal.logsumexp(0) - math.log(len(t_marginal))))


def mlp(din, hidden):
    return nn.Sequential(nn.Linear(din, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


def mine_estimate(x_train, y_train, x_test, y_test, steps, prepare=lambda b: b, batch_size=256,
                  lr=1e-4, hidden=512, ma_rate=0.01, seed=0, repeats=10):
    """MINE estimate of I(X; Y) in nats from paired rows; `prepare` maps a batch of x rows to
    floats (images are kept as uint8). Returns {"test", "train", "steps"}."""
    torch.manual_seed(seed)
    device = y_train.device
    mean, std = y_train.mean(0), y_train.std(0) + 1e-6  # an invertible map leaves I(X; Y) as is
    y_train, y_test = (y_train - mean) / std, (y_test - mean) / std
    stat_net = mlp(prepare(x_train[:1]).flatten(1).shape[1] + y_train.shape[1], hidden).to(device)
    opt = common.adam(stat_net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    T = lambda x, y: stat_net(torch.cat([prepare(x).flatten(1).float(), y], 1)).squeeze(1)
    moving_avg = None
    for _ in range(steps):
        idx = torch.randint(len(x_train), (min(batch_size, len(x_train)),), device=device)
        i, j = shuffled_pairs(len(idx), device=device)
        t_joint = T(x_train[idx], y_train[idx]).mean()
        t_marginal = T(x_train[idx[i]], y_train[idx[j]])
        mean_exp = t_marginal.logsumexp(0).sub(math.log(len(idx))).exp()
        moving_avg = mean_exp.detach() if moving_avg is None else (
            (1 - ma_rate) * moving_avg + ma_rate * mean_exp.detach())
        # gradient of the DV bound with the biased 1/E[e^T] replaced by its moving average
        loss = -(t_joint - mean_exp / moving_avg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    @torch.no_grad()
    def bound(x, y):
        joint = torch.cat([T(xb, yb) for xb, yb in zip(x.split(1024), y.split(1024))])
        marginal = []
        for _ in range(repeats):
            i, j = shuffled_pairs(len(x), device=device)
            marginal += [T(x[a], y[b]) for a, b in zip(i.split(1024), j.split(1024))]
        return dv_estimate(joint, torch.cat(marginal))

    stat_net.eval()
    return {"test": bound(x_test, y_test), "train": bound(x_train, y_train), "steps": steps}


def ndm_estimate(f_train, f_test, steps, batch_size=256, lr=1e-4, hidden=512, seed=0, repeats=10,
                 eval_every=100):
    """Neural dependency measure: KL(joint || product of marginals) of the columns of f, by a
    discriminator trained with the logistic loss and evaluated with the DV bound on f_test.
    A fifth of f_train is held out to pick the best state (early stopping): on small datasets
    the discriminator memorises the joint samples and its bound on new data turns negative."""
    torch.manual_seed(seed)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6  # per-factor scaling leaves the KL as is
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    f_train = f_train[torch.randperm(len(f_train)).to(f_train.device)]
    f_val, f_train = f_train[:len(f_train) // 5], f_train[len(f_train) // 5:]
    disc = mlp(f_train.shape[1], hidden).to(f_train.device)
    opt = common.adam(disc.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    @torch.no_grad()
    def bound(f):
        marginal = torch.cat([disc(shuffle_columns(f)) for _ in range(repeats)])
        return dv_estimate(disc(f), marginal)

    best = (-math.inf, 0, None)  # (held-out bound, step, state)
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            disc.eval()
            held_out = bound(f_val)
            if held_out > best[0]:
                best = (held_out, step, {k: v.clone() for k, v in disc.state_dict().items()})
            disc.train()
        if step == steps:
            break
        batch = f_train[torch.randint(len(f_train), (min(batch_size, len(f_train)),),
                                      device=f_train.device)]
        loss = (F.softplus(-disc(batch)).mean() +  # joint: label 1
                F.softplus(disc(shuffle_columns(batch))).mean())  # shuffled: label 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    disc.load_state_dict(best[2])
    disc.eval()
    return {"test": bound(f_test), "held_out": best[0], "best_step": best[1], "steps": steps}


class Decoder(nn.Module):
    """y -> image, the DCGAN generator's shape: Linear to 256 x s/8 x s/8, three 4x4/2
    transposed convs 128 -> 64 -> C with BatchNorm and ReLU between, tanh output."""

    def __init__(self, y_dim, image_shape):
        super().__init__()
        c, s, _ = image_shape
        self.s = s // 8
        width = 256 * self.s ** 2
        self.fc = nn.Sequential(nn.Linear(y_dim, width), nn.BatchNorm1d(width), nn.ReLU())
        up = lambda cin, cout: [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
                                nn.BatchNorm2d(cout), nn.ReLU()]
        self.net = nn.Sequential(*up(256, 128), *up(128, 64), nn.ConvTranspose2d(64, c, 4, 2, 1),
                                 nn.Tanh())

    def forward(self, y):
        return self.net(self.fc(y).view(len(y), 256, self.s, self.s))


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. (2003), 5 scales


def _gaussian_window(size, sigma, channels, device):
    g = torch.exp(-((torch.arange(size, device=device) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_terms(x, y, window, data_range):
    """Per-image mean luminance*contrast*structure (SSIM) and contrast*structure (cs)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda t: F.conv2d(t, window, groups=t.shape[1])  # valid: no padding artefacts
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x, y, data_range=2.0, window=7, sigma=1.5, max_scales=5):
    """Multi-scale SSIM (Wang, Simoncelli, Bovik 2003) per image, (N,), 1 for identical images.

    Images (N, C, H, W), in a range of width `data_range` (2 for [-1, 1]). Scales halve the
    image by 2x2 average pooling; we use as many of the paper's 5 scales as keep the smallest
    side >= the window (3 for 32x32 with the 7x7 window: 32, 16, 8) and renormalise the first
    ones of the paper's weights to sum to 1. A 7x7 Gaussian window (sigma 1.5) replaces the
    paper's 11x11, which would leave only 2 scales at 32x32. Negative cs/SSIM values are
    clamped to 0 before the fractional powers."""
    x, y = x.float(), y.float()
    scales = 1
    while scales < max_scales and min(x.shape[-2:]) // 2 ** scales >= window:
        scales += 1
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of side {min(x.shape[-2:])} are smaller than the {window}x{window} window")
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    weights = weights / weights.sum()
    win = _gaussian_window(window, sigma, x.shape[1], x.device)
    result = torch.ones(x.shape[0], device=x.device)
    for s in range(scales):
        ssim, cs = _ssim_terms(x, y, win, data_range)
        term = ssim if s == scales - 1 else cs
        result = result * term.clamp(min=0) ** weights[s]
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result


def msssim_of_decoder(x_train, y_train, x_test, y_test, image_shape, epochs, prepare,
                      batch_size=64, lr=1e-3, seed=0):
    """Train a Decoder from y to x (MSE) on the training pairs; mean MS-SSIM on the test pairs."""
    torch.manual_seed(seed)
    mean, std = y_train.mean(0), y_train.std(0) + 1e-6
    decoder = Decoder(y_train.shape[1], image_shape).to(y_train.device)
    opt = common.adam(decoder.parameters(), lr=lr, betas=(0.5, 0.999))
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), device=y_train.device).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.mse_loss(decoder((y_train[idx] - mean) / std), prepare(x_train[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    decoder.eval()
    with torch.no_grad():
        scores = [ms_ssim(decoder((yb - mean) / std), prepare(xb))
                  for xb, yb in zip(x_test.split(256), y_test.split(256))]
    return {"test": float(torch.cat(scores).mean()), "epochs": epochs}


def save_tsne(features, labels, path, seed=0, max_points=5000, size=640):
    """2-D t-SNE of `features` drawn with PIL: one colour per label, a legend in the corner."""
    from PIL import Image, ImageDraw
    from sklearn.manifold import TSNE
    keep = np.random.default_rng(seed).permutation(len(features))[:max_points]
    features, labels = features[keep], labels[keep]
    xy = TSNE(2, init="pca", perplexity=min(30.0, (len(features) - 1) / 3),
              random_state=seed).fit_transform(features)
    xy = (xy - xy.min(0)) / (xy.max(0) - xy.min(0) + 1e-12) * (size - 40) + 20
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for (px, py), label in zip(xy, labels):
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=palette[int(label) % len(palette)])
    for i, label in enumerate(sorted(set(int(v) for v in labels))[:20]):
        draw.rectangle([4, 4 + 12 * i, 12, 12 + 12 * i], fill=palette[label % len(palette)])
        draw.text((16, 2 + 12 * i), str(label), fill="black")
    image.save(path)


@torch.no_grad()
def paired_split(encoder, data, split, tap, device):
    """uint8 images and their features (float, on the device), without augmentation."""
    x, _ = data.split(split)
    feats = [encoder(data.preprocess(b.to(device), train=False))[tap].flatten(1).float()
             for b in x.split(256)]
    return x.to(device), torch.cat(feats)


def measures(args, encoder, data, device, suffix):
    """The flags --mine, --ndm, --msssim, --tsne; each returns a dict stored in eval.json."""
    out = {}
    if not (args.mine or args.ndm or args.msssim or args.tsne):
        return out
    available = common.tap_shapes(encoder, data.image_shape, device)
    if args.measure_tap not in available:
        raise UserError(f"--measure-tap {args.measure_tap} is not a tap of this encoder; "
                        f"choose one of {', '.join(available)}")
    x_train, f_train = paired_split(encoder, data, "train", args.measure_tap, device)
    x_test, f_test = paired_split(encoder, data, "test", args.measure_tap, device)
    prepare = lambda b: data.preprocess(b, train=False)
    if args.mine:
        out["mine"] = mine_estimate(x_train, f_train, x_test, f_test, args.mine_steps,
                                    prepare=prepare, seed=args.seed)
    if args.ndm:
        out["ndm"] = ndm_estimate(f_train, f_test, args.ndm_steps, seed=args.seed)
    if args.msssim:
        out["msssim"] = msssim_of_decoder(x_train, f_train, x_test, f_test, data.image_shape,
                                          args.msssim_epochs, prepare, seed=args.seed)
    if args.tsne:
        path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                            f"tsne-{args.measure_tap}{suffix}.png")
        save_tsne(f_test.cpu().numpy(), data.test_y.cpu().numpy(), path, seed=args.seed)
        out["tsne"] = {"png": path}
    for v in out.values():
        v["tap"] = args.measure_tap
    return out


def script_module(ckpt):
    """The module of the script that wrote `ckpt` (a .py file beside this one), or None. A
    script that owns networks lists them in its ENCODERS; one whose data are its own (image
    pairs) has probe_data(ckpt, root, device, label)."""
    name = ckpt["script"]
    here = os.path.dirname(os.path.abspath(__file__))
    if not (isinstance(name, str) and name.isidentifier()
            and os.path.isfile(os.path.join(here, name + ".py"))):
        return None
    return importlib.import_module(name)


def load_encoder(args, device):
    ckpt = common.load_checkpoint(args.checkpoint)
    module = script_module(ckpt)
    encoders = {**common.ENCODERS, **getattr(module, "ENCODERS", {})}
    if args.random_init:
        torch.manual_seed(args.seed)
        encoder = common.build_encoder(ckpt["encoder_cfg"], encoders)
    else:
        encoder = common.encoder_from_checkpoint(ckpt, encoders)
    encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return ckpt, module, encoder


def evaluate(args):
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    ckpt, module, encoder = load_encoder(args, device)
    run_args = ckpt["args"]
    dataset = args.dataset or ckpt["dataset"]
    data_root = args.data_root or run_args.get("data_root", "./data")
    if hasattr(module, "probe_data") and args.dataset is None:  # the script's own data (pairs)
        data = module.probe_data(ckpt, data_root, device, label=args.pair_label)
    else:
        data = common.load_data(dataset, data_root, device, image_size=ckpt["image_shape"][-1])
    if list(data.image_shape) != list(ckpt["image_shape"]):
        raise UserError(f"the encoder takes images of shape {tuple(ckpt['image_shape'])} but "
                        f"{dataset} has {tuple(data.image_shape)}; pick a dataset with that shape")
    n_labelled = int((data.train_y >= 0).sum())
    if "knn" in args.probes and args.knn_k > n_labelled:
        raise UserError(f"--knn-k {args.knn_k} is more than the {n_labelled} labelled training "
                        "images; lower it")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    available = common.tap_shapes(encoder, data.image_shape, device)
    taps = [t for t in args.taps if t in available]
    if not taps:
        raise UserError(f"none of the taps {args.taps} exist; this encoder has {', '.join(available)}")
    train_f, train_labels = common.extract_features(encoder, data, "train", taps, device=device)
    test_f, test_labels = common.extract_features(encoder, data, "test", taps, device=device)

    rows = []
    for tap in taps:
        row = {"tap": tap, "dim": train_f[tap].shape[1]}
        tx, vx = train_f[tap], test_f[tap]
        if "linear" in args.probes:
            row["linear"] = common.linear_probe(tx, train_labels, vx, test_labels)
        if "mlp" in args.probes:
            row["mlp"] = mlp_probe(tx, train_labels, vx, test_labels, data.n_classes, args.mlp_hidden,
                                   args.dropout, args.mlp_epochs, device, args.seed)
        if "knn" in args.probes and args.knn_rule == "uniform":
            row["knn"] = common.knn_accuracy(tx, train_labels, vx, test_labels, args.knn_k)
        elif "knn" in args.probes:
            row["knn"] = common.weighted_knn_accuracy(tx, train_labels, vx, test_labels, args.knn_k,
                                                      args.knn_temperature, device)
        if "kmeans" in args.probes:
            row["kmeans"] = common.kmeans_accuracy(vx, test_labels, data.n_classes, args.seed)
        rows.append(row)
    extra = measures(args, encoder, data, device, output_suffix(args, dataset, ckpt))
    for k, v in encoder.state_dict().items():  # frozen means frozen, BatchNorm buffers included
        assert torch.equal(v, before[k]), f"encoder weight {k} changed during evaluation"
    return ckpt, dataset, rows, extra


def output_suffix(args, dataset, ckpt):
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    suffix = f"-{stem}" if stem != "checkpoint" else ""  # shared_x.pt, exclusive_y.pt, ...
    suffix += "-random-init" if args.random_init else ""
    suffix += f"-{args.pair_label}" if ckpt.get("extra", {}).get("pair_domain") else ""
    return suffix + (f"-{dataset}" if dataset != ckpt["dataset"] else "")


def main(argv=None):
    args = parse_args(argv)
    ckpt, dataset, rows, extra = evaluate(args)
    kind = "random-init encoder" if args.random_init else f"{ckpt['script']} encoder"
    common.print_table(rows, title=f"{kind} ({ckpt['encoder_cfg']['arch']}) on {dataset}, test accuracy")
    if extra:
        common.print_table(
            [{"measure": k, "test": m["test"], "train": m.get("train", "-"),
              "budget": f"{m['steps']} steps" if "steps" in m else f"{m['epochs']} epochs"}
             for k, m in extra.items() if k != "tsne"], title=f"measures of {args.measure_tap}")
        if "tsne" in extra:
            print(f"t-SNE: {extra['tsne']['png']}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   f"eval{output_suffix(args, dataset, ckpt)}.json")
    result = {"checkpoint": os.path.abspath(args.checkpoint), "script": ckpt["script"],
              "dataset": dataset, "random_init": args.random_init, "epoch": ckpt["epoch"],
              "step": ckpt["step"], "results": rows, "measures": extra,
              "knn": {"rule": args.knn_rule, "k": args.knn_k,
                      "temperature": args.knn_temperature if args.knn_rule == "weighted" else None}}
    common.atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    common.run_cli(main)
