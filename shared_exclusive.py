"""Shared and exclusive representations of image pairs, by mutual information estimation.

Sanchez, Serrurier, Ortner. "Learning Disentangled Representations via Mutual Information
Estimation", ECCV 2020, arXiv:1912.03915.

Pairs (X, Y) from two domains share some factors. Each domain gets a shared encoder (S) and
an exclusive encoder (Z); R = (S, Z). Two stages:

    stage 1  max  b1 [I(C(X); S_Y) + I(C(Y); S_X)] + a1 [I(X; S_Y) + I(Y; S_X)] - l1 |S_X - S_Y|
    stage 2  max  b2 I(C(X); R_X) + a2 I(X; R_X) - h HSIC(S_X, Z_X)   (and the same for Y),
             the shared encoders frozen,

with C(.) the local feature map of the encoder being trained and DIM's estimators (the
paper's JSD; InfoNCE in the recipe) and critics. The paper drives I(S; Z) down with an
adversary, - g D(joint (S_X, Z_X) || shuffled (S_X, Z_X')), D telling (S, Z) from (S, Z
shuffled across the batch) (`--paper`, or `--adversarial 0.1 --hsic 0`). The recipe uses
HSIC (Gretton et al., ALT 2005) instead, a kernel measure of the dependence of S and Z,
computed exactly on every step.

    python shared_exclusive.py                                   # colourful digits, the recipe
    python shared_exclusive.py --dataset colorful-fashion-mnist --data-root DIR   # 60,000 pairs
    python shared_exclusive.py --dataset colorful-mnist --data-root DIR --paper  # the paper's

Defaults: the recipe (RECIPE; why, measured: docs/shared_exclusive.md); `--paper`: the paper's
(PAPER); a flag given wins over both.

Data: the paper's colourful-MNIST and the same construction on the other grey datasets:
scikit-learn's bundled digits (the offline default) and Fashion-MNIST
(`colorful-fashion-mnist`). X is the white item (digit, garment) on a background colour, Y
the item drawn in a colour on white, the two colours drawn once (PAIR_DATA_SEED),
independently, from 12 hues (PALETTE). `--pairing same-image` (the paper's) draws both
images from one grey image, so S holds the item's class and style; `--pairing same-class`
pairs two drawings of one class, so S becomes a class code and the pairing is weak
supervision. The labels: the item's class, X's background, Y's foreground (PAIR_LABELS).

Where this script fills gaps in or departs from the paper (the measurements behind each
choice, and the variants tried and not kept, are in docs/shared_exclusive.md):
- Stage lengths: whole epochs that make 792 + 620 steps, stage 1 at least 5 epochs, --paper too.
- Stage 2's MI weights, not given: stage 1's (local 1, global 0.5).
- C(x), not given: c2's 8x8 map under --paper; the recipe's S the 4x4 conv map (less background).
- Recipe: S whitened (Whitening), 32-d, not unbounded, 64-d: unbounded S pays L1 by shrinking.
- Recipe: the L1 term weighs 3.0, not 0.1, which goes with the paper's unstated scale of S.
- Recipe: Adam at 5e-4, not 1e-4: at 1e-4 the L1 term takes the background's colour out of
  S_X too slowly.
- Recipe: Z whitened and 2-d, not unbounded and 8-d: twelve hues fit on a circle.
- Recipe: InfoNCE, not JSD: under JSD stage 1's L1 term can stall, each S holding its own
  image's colour in one white direction that nothing pulls shared content into.
- Recipe: bf16 autocast where the device computes it natively (`--no-amp`: float32).
- Recipe: normalised HSIC on S and Z (--hsic 10) instead of the paper's adversary, which Z evaded.
- HSIC: Z's kernel averages four bandwidths; each batch is scored with the 7 before it; the
  estimate is the centred kernel alignment (`--hsic-estimator unbiased`: Song et al. 2012's).
- Adversary: Z shuffled along a random cycle, so no sample meets its own Z.
- Adversary: GAN cross-entropy (non-saturating for Z), DIM's 1000-200-1 discriminator, 10 steps.
- The dot critics embed 256 wide, not DIM's 2048 (`--embed-dim`), for CPU time.
- Evaluation: an MLP probe (sk-mlp; or linear, whitened-sk-mlp) on frozen S and Z, per label,
  fitted on at most 10,000 training codes (PROBE_TRAIN).
- Under torchrun: MI negatives from every process; HSIC, shuffle, whitening per process.
"""
import argparse
from dataclasses import dataclass
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

SCRIPT = "shared_exclusive"
NAN_HINT = "lower --lr, or use --loss jsd/infonce (the DV bound is known to blow up)"
CODE = "y"  # the encoders' output tap that holds the code (S or Z), DIM's global feature
REPS = ("SX", "SY", "ZX", "ZY")  # representation names used in metric keys (acc_SX_class ...)
# the encoder behind each --shared-norm / --exclusive-norm
NORM_ARCH = {"batch": "dcgan-std", "whiten": "dcgan-white", "sphere": "dcgan-sphere", "none": "dcgan"}


# sk-mlp is scikit-learn's MLPClassifier (eval_probe.py's mlp is a torch MLP with dropout)
PROBES = ("sk-mlp", "linear", "whitened-sk-mlp")
OLD_PROBES = {"mlp": "sk-mlp", "whitened-mlp": "whitened-sk-mlp"}  # their names in older checkpoints


def probe_list(text):
    """--probes: comma-separated probe names, each one of PROBES, none twice."""
    probes = [t for t in text.split(",") if t]
    bad = [t for t in probes if t not in PROBES]
    renamed = [f"{t} is now {OLD_PROBES[t]}" for t in bad if t in OLD_PROBES]
    if renamed:
        raise argparse.ArgumentTypeError(f"{'; '.join(renamed)} (scikit-learn's MLP; eval_probe.py's "
                                         "mlp is a torch MLP with dropout)")
    if bad or not probes or len(set(probes)) < len(probes):
        raise argparse.ArgumentTypeError(f"expected probes from {', '.join(PROBES)}, comma-separated "
                                         f"and each once, got {text!r}")
    return probes


# The defaults are the recipe measured on colourful digits and colourful-MNIST
# (docs/shared_exclusive.md); `--paper` restores the paper's configuration (arXiv:1912.03915,
# Sec. 4) instead, with the c2 map for both stages' C(x), which the paper does not name. A flag
# given on the command line wins over both. Stage lengths, under --paper too: the fewest whole
# epochs that make RECIPE_STEPS[stage] steps, and stage 1 at least STAGE1_MIN_EPOCHS. At batch
# 64, stage 1 is 36 epochs of 1,437 pairs (22 steps each), 26 of 2,000 (31), 5 of 60,000 (937);
# stage 2's 620 steps are 29, 20 and 1.
PAPER = {"shared_dim": 64, "shared_norm": "none", "exclusive_dim": 8, "exclusive_norm": "none",
         "l1": 0.1, "adversarial": 0.1, "hsic": 0.0, "local_layer": "c2",
         "exclusive_local_layer": "c2", "lr": 1e-4, "amp": False, "sphere_ramp": 0.0, "loss": "jsd"}
RECIPE = {"shared_dim": 32, "shared_norm": "whiten", "exclusive_dim": 2, "exclusive_norm": "whiten",
          "l1": 3.0, "adversarial": 0.0, "hsic": 10.0, "local_layer": "conv",
          "exclusive_local_layer": "c2", "lr": 5e-4, "sphere_ramp": 0.0,
          "loss": "infonce"}  # amp: native_bf16
RECIPE_STEPS, STAGE1_MIN_EPOCHS = {1: 792, 2: 620}, 5


def stage_epochs(stage, data, batch_size, world=1):
    """The recipe's length of a stage: the fewest whole epochs that make RECIPE_STEPS[stage]
    steps, and stage 1 at least STAGE1_MIN_EPOCHS (at 60,000 pairs, 792 steps are one epoch,
    after which S_X still holds X's colour)."""
    epochs = common.epochs_for_steps(RECIPE_STEPS[stage], data, batch_size, world)
    return max(STAGE1_MIN_EPOCHS, epochs) if stage == 1 else epochs


def parse_args(argv=None):
    # conflict_handler="resolve": this script replaces common's --dataset (pair datasets),
    # --epochs and --max-steps (per stage) while keeping their spelling.
    p = common.ArgumentParser(description="Shared and exclusive representations by MI estimation",
                              conflict_handler="resolve")
    common.add_common_args(p, epochs=None, batch_size=64, lr=None, eval_every=3, amp=None)
    p.add_argument("--paper", action="store_true",
                   help="the paper's configuration instead of the recipe (see PAPER, RECIPE; the "
                        "same stage lengths)")
    p.add_argument("--dataset", default="colorful-digits", choices=PAIR_DATASETS,
                   help="pairs built from a grey dataset: the bundled digits (offline), MNIST or "
                        "Fashion-MNIST (read from --data-root)")
    p.add_argument("--epochs", type=common.epochs_int, default=None,
                   help=f"epochs of stage 1, and of stage 2 unless --exclusive-epochs is given "
                        f"(default: the fewest whole epochs that make {RECIPE_STEPS[1]} steps, at least "
                        f"{STAGE1_MIN_EPOCHS})")
    p.add_argument("--max-steps", type=common.positive_int, default=None,
                   help="stop each stage after this many optimisation steps (smoke tests)")
    p.add_argument("--pairing", default="same-image", choices=PAIRINGS,
                   help="X and Y from one image (paper) or from two images of one class")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"],
                   help="1: shared encoders, 2: exclusive encoders (needs --shared-from), both")
    p.add_argument("--exclusive-epochs", type=common.epochs_int, default=None,
                   help=f"epochs of stage 2 (default: --epochs when given, else the fewest whole "
                        f"epochs that make {RECIPE_STEPS[2]} steps)")
    p.add_argument("--shared-from", default=None, metavar="PATH",
                   help="checkpoint.pt of a run whose stage 1 is done (for --stage 2)")
    p.add_argument("--loss", default=None, choices=sorted(common.BOUNDS),
                   help=f"MI estimator for every MI term: jsd, infonce or dv (paper {PAPER['loss']}, "
                        f"recipe {RECIPE['loss']})")
    p.add_argument("--critic", default="dot", choices=["dot", "concat"],
                   help="local critic: encode-and-dot-product or concat-and-convolve")
    p.add_argument("--local-layer", default=None, choices=list(common.DCGANEncoder.maps),
                   help=f"encoder tap giving the local map C(x) of stage 1 (S; not named by the "
                        f"paper: {PAPER['local_layer']} under --paper, recipe {RECIPE['local_layer']})")
    p.add_argument("--exclusive-local-layer", default=None, choices=list(common.DCGANEncoder.maps),
                   help=f"encoder tap giving the local map C(x) of stage 2 (Z; paper "
                        f"{PAPER['exclusive_local_layer']}, recipe {RECIPE['exclusive_local_layer']})")
    p.add_argument("--shared-dim", type=common.positive_int, default=None,
                   help=f"size of S (paper {PAPER['shared_dim']}, recipe {RECIPE['shared_dim']}: "
                        f"whitened, so it needs a batch of more than {RECIPE['shared_dim']} per process)")
    p.add_argument("--exclusive-dim", type=common.positive_int, default=None,
                   help=f"size of Z (paper {PAPER['exclusive_dim']}, not whitened; recipe "
                        f"{RECIPE['exclusive_dim']}: a whitened Z must give every direction unit "
                        f"variance, see the docstring)")
    p.add_argument("--shared-local", type=common.nonneg_float, default=1.0,
                   help="stage 1 weight of the cross local MI I(C(X); S_Y) + I(C(Y); S_X)")
    p.add_argument("--shared-global", type=common.nonneg_float, default=0.5,
                   help="stage 1 weight of the cross global MI I(X; S_Y) + I(Y; S_X)")
    p.add_argument("--l1", type=common.nonneg_float, default=None,
                   help=f"stage 1 weight of the L1 term |S_X - S_Y| (paper {PAPER['l1']}, on an S "
                        f"of unstated scale; recipe {RECIPE['l1']}, on a whitened S)")
    p.add_argument("--exclusive-local", type=common.nonneg_float, default=1.0,
                   help="stage 2 weight of the local MI I(C(X); (S_X, Z_X)) (and for Y)")
    p.add_argument("--exclusive-global", type=common.nonneg_float, default=0.5,
                   help="stage 2 weight of the global MI I(X; (S_X, Z_X)) (and for Y)")
    p.add_argument("--hsic", type=common.nonneg_float, default=None,
                   help=f"stage 2 weight h of the normalised HSIC between S and Z that Z minimises "
                        f"(Gaussian kernels; not in the paper: {PAPER['hsic']}; recipe "
                        f"{RECIPE['hsic']})")
    p.add_argument("--hsic-estimator", default="alignment", choices=["alignment", "unbiased"],
                   help="the HSIC term's estimate: the centred kernel alignment (the recipe's; biased, "
                        "and its gradient merges Z's colours under a heavy term) or the unbiased "
                        "estimator, normalised by a scale held constant in the gradient")
    p.add_argument("--hsic-batches", type=common.positive_int, default=8,
                   help="batches the HSIC term scores together: the current one and the latest "
                        "others, detached")
    p.add_argument("--adversarial", type=common.nonneg_float, default=None,
                   help=f"stage 2 weight g of the paper's GAN loss that drives I(S; Z) down (paper "
                        f"{PAPER['adversarial']}; recipe {RECIPE['adversarial']}: --hsic does it)")
    p.add_argument("--shared-norm", default=None, choices=["batch", "whiten", "none"],
                   help=f"S whitened over the batch (Whitening), standardised per dimension "
                        f"(BatchNorm without affine) or left unbounded (paper "
                        f"{PAPER['shared_norm']}, recipe {RECIPE['shared_norm']})")
    p.add_argument("--exclusive-norm", default=None, choices=["none", "whiten", "sphere"],
                   help=f"Z left as the encoder gives it, whitened over the batch like S, or whitened and "
                        f"put on a sphere, its direction alone (paper "
                        f"{PAPER['exclusive_norm']}, recipe {RECIPE['exclusive_norm']})")
    p.add_argument("--sphere-ramp", type=common.probability, default=None,
                   help=f"with --exclusive-norm sphere: the fraction of stage 2's steps over which Z "
                        f"moves from whitened to the sphere (0: on the sphere from the first step; "
                        f"recipe {RECIPE['sphere_ramp']})")
    p.add_argument("--disc-steps", type=common.positive_int, default=10,
                   help="steps of the S-Z discriminator D (each on a new shuffle of the batch) per "
                        "encoder step (stage 2)")
    p.add_argument("--embed-dim", type=common.width_int, default=256,
                   help="dot critic embedding width (DIM's 2048 is slow on a CPU)")
    p.add_argument("--probes", default="sk-mlp", type=probe_list, metavar="PROBE[,PROBE]",
                   help=f"classifier(s) of the evaluation table, from {', '.join(PROBES)}: the first "
                        "logs acc_<code>_<target>, the others acc_<code>_<target>_<probe> "
                        "(sk-mlp: scikit-learn's MLPClassifier, one 200-unit layer; whitened-sk-mlp: "
                        "the same on PCA-whitened codes, which reads what lies in directions of "
                        "small variance)")
    p.add_argument("--n-queries", type=common.positive_int, default=4,
                   help="query images per domain in the nearest-neighbour PNG")
    p.add_argument("--knn-rule", default="weighted", choices=common.KNN_RULES,
                   help="the monitor's k-NN (k=20): weighted by exp(cosine / 0.07) as in "
                        "solo-learn, or scikit-learn's uniform vote (runs before 2026-12-06)")
    args = common.merge_resume_args(p, argv, p.parse_args(argv),
                                    (*common.RESUME_SAFE, "exclusive_epochs"), {"probe": "probes"})
    args.probes = [OLD_PROBES.get(name, name) for name in args.probes]
    ramp_given = args.sphere_ramp is not None
    for name, value in (PAPER if args.paper else RECIPE).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if ramp_given and args.sphere_ramp > 0 and args.exclusive_norm != "sphere":
        p.error(f"--sphere-ramp moves Z onto the sphere: it needs --exclusive-norm sphere "
                f"(here {args.exclusive_norm})")
    if args.exclusive_epochs is None:  # --epochs, when given, sets both stages; else train()
        args.exclusive_epochs = args.epochs  # sets each from RECIPE_STEPS and the data's size
    if args.stage == "2" and not (args.shared_from or args.resume):
        p.error("--stage 2 trains on frozen shared encoders: pass --shared-from RUN/checkpoint.pt "
                "of a run that did stage 1")
    if args.shared_from and args.stage != "2":
        p.error("--shared-from is only used with --stage 2")
    if args.shared_local == args.shared_global == 0 and args.stage != "2":
        p.error("--shared-local and --shared-global are both 0: stage 1 would maximise nothing")
    return args


# ----------------------------------------------------------------------------------------
# Data: colourful pairs of grey images
# ----------------------------------------------------------------------------------------
# Image pairs for shared/exclusive representations (Sanchez et al., arXiv:1912.03915): the
# paper's colourful-MNIST, and the same construction on any grey dataset common.load_data
# reads. X = the white item (digit, garment) on a coloured background, Y = the item drawn in
# a colour on white; the two colours are drawn independently from PALETTE.
PAIR_SOURCES = {"colorful-digits": "digits", "colorful-mnist": "mnist",
                "colorful-fashion-mnist": "fashion-mnist"}  # pair dataset -> its grey source
PAIR_DATASETS = list(PAIR_SOURCES)
PAIRINGS = ["same-image", "same-class"]
PAIR_LABELS = ("class", "background", "foreground")  # columns of PairData.*_labels
OLD_PAIR_LABELS = {"digit": "class"}  # older names (older runs' keys: acc_SX_digit ...)
PAIR_DATA_SEED = 0  # colours and partners are drawn once, so every run sees the same pairs
# The 12 hues of the colour wheel at 0/128/255 RGB steps (one channel always 0): red,
# orange, yellow, chartreuse, green, spring, cyan, azure, blue, violet, magenta, rose.
PALETTE = torch.tensor([[255, 0, 0], [255, 128, 0], [255, 255, 0], [128, 255, 0], [0, 255, 0],
                        [0, 255, 128], [0, 255, 255], [0, 128, 255], [0, 0, 255], [128, 0, 255],
                        [255, 0, 255], [255, 0, 128]], dtype=torch.uint8)


def same_class_partners(labels, rng):
    """For every image, a different image of the same class (uniformly among them)."""
    partner = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) < 2:
            raise UserError(f"class {int(c)} has a single image; same-class pairing needs two")
        # a random cyclic shift of a random order: every image gets another image of its class
        order = idx[torch.randperm(len(idx), generator=rng)]
        shift = int(torch.randint(1, len(idx), (1,), generator=rng))
        partner[order] = order.roll(shift)
    return partner


def colorize_pairs(gray, labels, pairing="same-image", rng=None):
    """Grey images (N, 1, H, W) uint8 and their classes -> (X, Y, pair labels).

    X: the item kept white on a background of colour bg (X = g*255 + (1-g)*bg, g = gray/255).
    Y: the item (the same image, or another image of its class) drawn in colour fg on white
       (Y = g*fg + (1-g)*255). bg and fg are drawn independently and uniformly from PALETTE.
    Labels (N, 3): class, background colour index, foreground colour index.
    """
    if pairing not in PAIRINGS:
        raise UserError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    n = len(gray)
    bg = torch.randint(0, len(PALETTE), (n,), generator=rng)
    fg = torch.randint(0, len(PALETTE), (n,), generator=rng)
    partner = torch.arange(n) if pairing == "same-image" else same_class_partners(labels, rng)
    g_x = gray.float() / 255.0  # (N, 1, H, W) ink in [0, 1]
    g_y = g_x[partner]
    bg_rgb = PALETTE[bg].float()[:, :, None, None]  # (N, 3, 1, 1)
    fg_rgb = PALETTE[fg].float()[:, :, None, None]
    x = g_x * 255.0 + (1 - g_x) * bg_rgb
    y = g_y * fg_rgb + (1 - g_y) * 255.0
    to_u8 = lambda t: t.round().clamp_(0, 255).to(torch.uint8)
    return to_u8(x), to_u8(y), torch.stack([labels, bg, fg], 1)


@dataclass
class PairData:
    """Train/test image pairs (X, Y) as uint8 tensors with labels (N, 3): PAIR_LABELS."""
    name: str
    pairing: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    train_labels: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_labels: torch.Tensor
    n_classes: int  # of the grey items (PAIR_LABELS' "class"); the colours have len(PALETTE)
    device: torch.device = None  # where batches() delivers, as Data's

    @property
    def image_shape(self):
        return tuple(self.train_x.shape[1:])

    def to(self, device):
        for k in ("train_x", "train_y", "train_labels", "test_x", "test_y", "test_labels"):
            setattr(self, k, getattr(self, k).to(device))
        self.device = device
        return self

    def batches(self, split, batch_size, shuffle=False, rng=None, drop_last=False,
                rank=0, world_size=1):
        """Yield (X, Y) as floats in [-1, 1] and their labels (B, 3), on `self.device`.
        Under torchrun each rank takes its own slice of the (shared) order, as Data.batches."""
        x, y, lab = ((self.train_x, self.train_y, self.train_labels) if split == "train" else
                     (self.test_x, self.test_y, self.test_labels))
        device = self.device or x.device
        for idx in common.batch_indices(len(x), batch_size, shuffle, rng, drop_last, rank,
                                 world_size, x.device):
            xb, yb, lb = (t[idx].to(device, non_blocking=True) for t in (x, y, lab))
            yield xb.float().div_(127.5).sub_(1.0), yb.float().div_(127.5).sub_(1.0), lb

    def n_batches(self, split, batch_size, drop_last=False, world_size=1):
        return common.count_batches(len(self.train_x if split == "train" else self.test_x), batch_size,
                             drop_last, world_size)

    def domain(self, which, label="class"):
        """One domain ('x' or 'y') as a plain `Data` labelled by one of PAIR_LABELS, so the
        generic tools (extract_features, eval_probe) can use it."""
        col = PAIR_LABELS.index(label)
        tx, vx = (self.train_x, self.test_x) if which == "x" else (self.train_y, self.test_y)
        n_classes = self.n_classes if label == "class" else len(PALETTE)
        return common.Data(self.name, tx, self.train_labels[:, col], vx, self.test_labels[:, col], n_classes,
                    device=self.device)


def load_pair_data(name, root="./data", device=torch.device("cpu"), pairing="same-image",
                   seed=PAIR_DATA_SEED, image_size=None, max_device_bytes=4 << 30):
    """Colourful pairs built from a grayscale dataset (`common.load_data` of PAIR_SOURCES[name]);
    the same (name, pairing, seed, image_size) always gives the same pairs."""
    if name not in PAIR_SOURCES:
        raise UserError(f"unknown pair dataset {name!r}; choose one of {', '.join(PAIR_DATASETS)}")
    gray = common.load_data(PAIR_SOURCES[name], root, torch.device("cpu"), image_size)  # offline error comes from here
    rng = torch.Generator().manual_seed(seed)
    tx, ty, tl = colorize_pairs(gray.train_x, gray.train_y, pairing, rng)
    vx, vy, vl = colorize_pairs(gray.test_x, gray.test_y, pairing, rng)
    data = PairData(name, pairing, tx, ty, tl, vx, vy, vl, gray.n_classes, device)
    nbytes = sum(t.numel() * t.element_size() for t in (tx, ty, tl, vx, vy, vl))
    if device.type != "cpu" and nbytes <= max_device_bytes:  # else batches move one at a time
        data.to(device)
    return data


def probe_data(ckpt, root, device, label="class"):
    """The data eval_probe.py probes one of this script's encoders on: the domain its
    checkpoint's `extra` names (pair_domain, pairing, pair_seed), labelled by `label` (one of
    PAIR_LABELS, or its older name)."""
    label = OLD_PAIR_LABELS.get(label, label)
    extra = ckpt["extra"]
    if extra.get("pair_domain") not in ("x", "y"):
        raise UserError(f"the checkpoint names no pair domain ({extra.get('pair_domain')!r}); pass "
                        "--dataset to probe its encoder on another dataset")
    return load_pair_data(ckpt["dataset"], root, device, extra["pairing"], extra["pair_seed"],
                          ckpt["image_shape"][-1]).domain(extra["pair_domain"], label)


# ----------------------------------------------------------------------------------------
# Encoders: DIM's, with the code standardised or whitened over the batch
# ----------------------------------------------------------------------------------------
class StandardizedDCGANEncoder(common.DCGANEncoder):
    """DCGANEncoder whose code y is standardised per dimension (BatchNorm without affine
    parameters: batch statistics in training, running ones in eval), so its scale is fixed.
    The shared code S: an unbounded S lets the critics' first layers undo
    any scale, and a penalty on |S_X - S_Y| is then paid off by shrinking S (or by a large
    constant part) instead of by removing what X and Y do not share."""

    def __init__(self, in_channels=3, image_size=32, y_dim=64, fc_dim=1024):
        super().__init__(in_channels, image_size, y_dim, fc_dim)
        self.y_norm = self.norm(y_dim)

    @staticmethod
    def norm(dim):
        return nn.BatchNorm1d(dim, affine=False)

    def forward(self, x):
        out = super().forward(x)
        out["y"] = self.y_norm(out["y"])
        return out


class Whitening(nn.Module):
    """Batch whitening of a code (W-MSE, Ermolov et al. 2021; Decorrelated BatchNorm, Huang et
    al. 2018): out = L^-1 (y - mean), L the Cholesky factor of the covariance, so *every*
    direction of the output has unit variance, not only every coordinate (per-dimension
    BatchNorm lets a code keep information in directions of tiny variance). Cholesky rather
    than ZCA: the gradient of an eigendecomposition blows up on near-equal eigenvalues, which a
    whitened code has by design (W-MSE's reason too).

    Training: the batch's own mean and covariance, gradients flowing through both, so the
    batch's output is exactly white whatever the code does; the batch must be larger than
    the code (W-MSE: twice). Eval: running mean and covariance, a fixed affine map.
    """

    def __init__(self, dim, momentum=0.1, eps=1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_cov", torch.eye(dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, y):
        # float32 throughout, under --amp too: a bf16 covariance (8 bits of mantissa) would
        # make the running one a different dtype and its Cholesky factor too coarse
        with torch.autocast(y.device.type, enabled=False):
            y = y.float()
            if self.training:
                if len(y) <= y.shape[1]:
                    raise UserError(f"whitening a {y.shape[1]}-d code needs batches of more than "
                                    f"{y.shape[1]} samples, got {len(y)}")
                mean = y.mean(0)
                cov = (y - mean).T @ (y - mean) / (len(y) - 1)
                with torch.no_grad():
                    # a plain average over the first 1/momentum batches, then a moving one: the
                    # identity it starts from would linger as a floor under small directions
                    self.num_batches_tracked += 1
                    m = (1 / self.num_batches_tracked).clamp_min(self.momentum)  # no host sync
                    self.running_mean.lerp_(mean.detach(), m)
                    self.running_cov.lerp_(cov.detach(), m)
            else:
                mean, cov = self.running_mean, self.running_cov
            # a tiny ridge, relative to the mean variance, for numerical safety only
            eye = torch.eye(len(cov), device=cov.device)
            chol = torch.linalg.cholesky(cov + self.eps * cov.diagonal().mean() * eye)
            return torch.linalg.solve_triangular(chol.T, y - mean, upper=True, left=False)  # (y - mean) L^-T


class WhitenedDCGANEncoder(StandardizedDCGANEncoder):
    """The same encoder with its code y whitened (`Whitening`) instead of standardised:
    `--shared-norm whiten`, so that S cannot hide what the L1 pull
    should remove in directions of small variance."""

    norm = Whitening


class UnitSphere(nn.Module):
    """Whitening, then each code scaled to length sqrt(dim) (the mean length of a white code):
    only its direction is left to carry information.

    `power` p in [0, 1] (set by the training loop under --sphere-ramp; 1 otherwise, and in
    every saved encoder) divides a white code w by (|w| / sqrt(dim)) ** p: 0 leaves it white,
    1 puts it on the sphere. Codes that start on a circle cannot pass each other, so hues
    placed in the wrong order stay folded; ramping p from 0 lets them sort out in the plane."""

    def __init__(self, dim):
        super().__init__()
        self.white = Whitening(dim)
        # a buffer, so a compiled forward reads its value; not saved: a loaded encoder is on the sphere
        self.register_buffer("power", torch.ones(()), persistent=False)

    def forward(self, y):
        w = self.white(y)
        length = w.norm(dim=1, keepdim=True).clamp_min(1e-12) / math.sqrt(y.shape[1])
        return w / length ** self.power


class SphericalDCGANEncoder(StandardizedDCGANEncoder):
    """The encoder with its code whitened and put on a sphere (`UnitSphere`): `--exclusive-norm
    sphere`, a 2-d Z that is an angle alone. A whitened Z's length followed how much of the
    image the colour covers, and so the class; on the circle the hues can fold onto each
    other (docs/shared_exclusive.md)."""

    norm = UnitSphere


def set_sphere_power(encoders, step, ramp_steps):
    """--sphere-ramp: Z's UnitSphere power min(1, step / ramp_steps), from white (0) to the
    sphere (1); a no-op for any other --exclusive-norm."""
    for d in "xy":
        norm = getattr(encoders[f"exclusive_{d}"], "y_norm", None)  # none: an unnormalised Z
        if isinstance(norm, UnitSphere):
            norm.power.fill_(min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0)


ENCODERS = {**common.ENCODERS, "dcgan-std": StandardizedDCGANEncoder,
            "dcgan-white": WhitenedDCGANEncoder, "dcgan-sphere": SphericalDCGANEncoder}


# ----------------------------------------------------------------------------------------
# The method: cross MI (stage 1), MI of R = (S, Z) plus the S-Z adversary (stage 2)
# ----------------------------------------------------------------------------------------
class SZDiscriminator(nn.Module):
    """Tells the joint (S, Z) (logit > 0) from (S, Z shuffled across the batch); the same
    1000-200-1 MLP as DIM's prior discriminator, on the concatenation."""

    def __init__(self, dim, hidden=(1000, 200)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden[0]), nn.ReLU(inplace=True),
                                 nn.Linear(hidden[0], hidden[1]), nn.ReLU(inplace=True),
                                 nn.Linear(hidden[1], 1))

    def forward(self, s, z):
        return self.net(torch.cat([s, z], 1).float()).squeeze(-1)


def shuffle_across_batch(z, rng=None):
    """Z rows moved along a random cycle: row i gets the Z of another sample, never its own,
    so (S, shuffled Z) is a draw from the product of marginals with no pair left intact."""
    n = z.shape[0]
    order = torch.randperm(n, generator=rng).to(z.device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(1)
    return z[perm]


def sz_disc_loss(disc, s, z, rng=None):
    """Discriminator side: joint (S, Z) is labelled 1, shuffled 0 (encoders detached)."""
    s, z = s.detach(), z.detach()
    return (F.softplus(-disc(s, z)).mean()
            + F.softplus(disc(s, shuffle_across_batch(z, rng))).mean())


def sz_encoder_loss(disc, s, z):
    """Exclusive encoder side (non-saturating): make the joint be classified as shuffled."""
    return F.softplus(disc(s, z)).mean()


HSIC_QUANTILES = (0.5, 0.1, 0.03, 0.01)


def gaussian_gram(a, quantiles=(0.5,)):
    """Gram matrix (N, N) of a batch of codes: the mean of Gaussian kernels whose bandwidths
    are these quantiles of the squared pairwise distances (detached, so the code cannot lower
    the dependence by rescaling the kernel)."""
    a = a.float()
    sq = a.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * a @ a.T).clamp_min(0)  # cdist's gradient is NaN at 0
    off = d2.detach()[~torch.eye(len(a), dtype=torch.bool, device=a.device)]
    bw = torch.quantile(off, torch.tensor(quantiles, device=a.device)).clamp_min(1e-12)
    return torch.exp(-d2[None] / bw[:, None, None]).mean(0)


def unbiased_hsic(k, l):
    """HSIC from two Gram matrices by the unbiased estimator of Song et al. (JMLR 13, 2012):
    its mean is 0 when the rows of the two are independent, whatever either code's layout."""
    n = len(k)
    off = 1 - torch.eye(n, device=k.device)
    k, l = k * off, l * off
    kl = k @ l
    return (kl.trace() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * kl.sum() / (n - 2)) / (n * (n - 3))


def normalised_hsic(k, l):
    """unbiased_hsic(K, L) / sqrt(unbiased_hsic(K, K) unbiased_hsic(L, L)), the scale held
    constant in the gradient."""
    scale = (unbiased_hsic(k, k) * unbiased_hsic(l, l)).clamp_min(1e-12).sqrt()
    return unbiased_hsic(k, l) / scale.detach()


def hsic_dependence(s, z, estimator):
    """Normalised HSIC of S and Z: about 0 when the rows show no dependence, 1 when the two
    Gram matrices agree. Z's kernel mixes narrow bandwidths too: within one colour Z varies
    little, and that is where the class sits. Computed exactly, so unlike a learned adversary
    it has no lag for the encoder to outrun. `estimator` (--hsic-estimator):
    - "unbiased": Song et al.'s estimator, normalised by a scale held constant in the gradient;
    - "alignment": the centred kernel alignment of the two Grams, a biased estimate (near 0.1
      under independence) whose gradient merges Z's colours: a heavy term took them
      (docs/shared_exclusive.md)."""
    with torch.autocast(z.device.type, enabled=False):  # narrow kernels need fp32 distances
        ks, kz = gaussian_gram(s), gaussian_gram(z, HSIC_QUANTILES)
        if estimator == "alignment":
            return kernel_alignment(centred(ks), centred(kz))
        return normalised_hsic(ks, kz)


def centred(k):
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def kernel_alignment(k1, k2):
    """<K1, K2> / (|K1| |K2|) of two centred Gram matrices: HSIC's biased estimate, normalised."""
    return (k1 * k2).sum() / (k1.norm() * k2.norm()).clamp_min(1e-12)


class HSICWindow(dict):
    """{domain: [(S, Z) of its latest batches, newest first, detached]}: the rows the HSIC term
    scores each batch with besides its own (exclusive_step keeps them). It has a module's
    state_dict / load_state_dict, so checkpoint.pt holds it beside the networks and stage 2
    resumed from it scores the rows the uninterrupted run did."""

    def state_dict(self):  # {"x.s": (K, B, shared_dim), "x.z": (K, B, exclusive_dim), ...}
        return {f"{d}.{part}": torch.stack([sz[i] for sz in past])
                for d, past in self.items() if past for i, part in enumerate("sz")}

    def load_state_dict(self, state, device="cpu"):
        self.clear()
        for d in sorted({k.split(".")[0] for k in state}):
            self[d] = list(zip(state[f"{d}.s"].to(device).unbind(), state[f"{d}.z"].to(device).unbind()))


def build_networks(args, image_shape, device):
    """Encoders and critics of both stages (all built, so every checkpoint has every key).
    Stage 1's are initialised first from the global seed and stage 2's from a stream of their
    own, so a stage-2 flag (--exclusive-dim, say) leaves stage 1 exactly as it was."""
    shared_cfg = common.encoder_config(NORM_ARCH[args.shared_norm], image_shape, args.shared_dim, ENCODERS)
    excl_cfg = common.encoder_config(NORM_ARCH[args.exclusive_norm], image_shape, args.exclusive_dim,
                                     ENCODERS)
    encoders = {f"shared_{d}": common.build_encoder(shared_cfg, ENCODERS) for d in "xy"}
    shapes = common.tap_shapes(encoders["shared_x"], image_shape)
    conv_dim = math.prod(shapes["conv"])

    def local_critic(dim, layer):
        local_ch = shapes[layer][0]
        return (common.DotCritic(dim, local_ch, args.embed_dim) if args.critic == "dot" else
                common.ConcatCritic(dim, local_ch))

    r_dim = args.shared_dim + args.exclusive_dim
    critics = {}
    for d in "xy":  # stage 1: scores the *other* domain's S against this domain's maps
        critics[f"shared_local_critic_{d}"] = local_critic(args.shared_dim, args.local_layer)
        critics[f"shared_global_critic_{d}"] = common.GlobalCritic(conv_dim, args.shared_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1_000_003)
        encoders.update({f"exclusive_{d}": common.build_encoder(excl_cfg, ENCODERS) for d in "xy"})
        for d in "xy":
            critics[f"exclusive_local_critic_{d}"] = local_critic(r_dim, args.exclusive_local_layer)
            critics[f"exclusive_global_critic_{d}"] = common.GlobalCritic(conv_dim, r_dim)
            critics[f"sz_disc_{d}"] = SZDiscriminator(r_dim)
    for m in (*encoders.values(), *critics.values()):
        m.to(device)
    return encoders, critics, {"shared": shared_cfg, "exclusive": excl_cfg}


def shared_step(img_x, img_y, encoders, critics, bound, args, gather=None):
    """Stage 1 loss: cross MI (local and global, both directions) and the L1 term.
    `gather` (common.gather_batch under torchrun) draws the critics' negatives from every
    process's batch."""
    out_x, out_y = encoders["shared_x"](img_x), encoders["shared_y"](img_y)
    s_x, s_y = out_x[CODE], out_y[CODE]  # (N, shared_dim): S_X, S_Y
    logs = {}
    loss = torch.zeros((), device=img_x.device)
    for d, out, s_other in (("x", out_x, s_y), ("y", out_y, s_x)):
        if args.shared_local > 0:  # I(C(X); S_Y): (N, N, M*M) scores, positives on n == m
            critic = critics[f"shared_local_critic_{d}"]
            logs[f"local_mi_{d}"] = bound(critic(s_other, out[args.local_layer], gather=gather))
            loss = loss - args.shared_local * logs[f"local_mi_{d}"]
        if args.shared_global > 0:  # I(X; S_Y): (N, N) scores
            critic = critics[f"shared_global_critic_{d}"]
            logs[f"global_mi_{d}"] = bound(critic(s_other, out["conv"], gather=gather))
            loss = loss - args.shared_global * logs[f"global_mi_{d}"]
    logs["l1"] = (s_x.float() - s_y.float()).abs().sum(1).mean()  # the L1 norm, batch mean
    loss = loss + args.l1 * logs["l1"]
    return loss, logs, {}


def exclusive_step(img_x, img_y, encoders, critics, bound, args, gather=None, memory=None):
    """Stage 2 loss: MI of R = (S, Z) with the image, and the penalties on (S, Z).
    Returns the (S, Z) of each domain for the discriminator's own step. `memory` ({domain:
    [(S, Z) of recent batches]}, a HSICWindow in train, updated here) widens the HSIC term
    beyond one batch."""
    logs, sz = {}, {}
    loss = torch.zeros((), device=img_x.device)
    for d, img in (("x", img_x), ("y", img_y)):
        with torch.no_grad():  # frozen shared encoder (kept in eval mode by the caller)
            s = encoders[f"shared_{d}"](img)[CODE]
        out = encoders[f"exclusive_{d}"](img)
        z = out[CODE]  # (N, exclusive_dim)
        r = torch.cat([s, z], 1)  # R = (S, Z)
        if args.exclusive_local > 0:
            critic = critics[f"exclusive_local_critic_{d}"]
            logs[f"local_mi_{d}"] = bound(critic(r, out[args.exclusive_local_layer], gather=gather))
            loss = loss - args.exclusive_local * logs[f"local_mi_{d}"]
        if args.exclusive_global > 0:
            critic = critics[f"exclusive_global_critic_{d}"]
            logs[f"global_mi_{d}"] = bound(critic(r, out["conv"], gather=gather))
            loss = loss - args.exclusive_global * logs[f"global_mi_{d}"]
        if args.adversarial > 0:
            logs[f"sz_gen_{d}"] = sz_encoder_loss(critics[f"sz_disc_{d}"], s, z)
            loss = loss + args.adversarial * logs[f"sz_gen_{d}"]
        if args.hsic > 0:
            # this batch with the latest --hsic-batches - 1 others (detached): 64 rows
            # are too few to see a dependence that lives within each colour
            past = memory.setdefault(d, []) if memory is not None else []  # None: this batch only
            logs[f"hsic_{d}"] = hsic_dependence(torch.cat([s, *(m[0] for m in past)]),
                                                torch.cat([z, *(m[1] for m in past)]),
                                                args.hsic_estimator)
            past.insert(0, (s.detach(), z.detach()))
            del past[args.hsic_batches - 1:]
            loss = loss + args.hsic * logs[f"hsic_{d}"]
        sz[d] = (s, z)
    return loss, logs, sz


# ----------------------------------------------------------------------------------------
# Evaluation: classifiers on frozen S and Z, nearest neighbours
# ----------------------------------------------------------------------------------------
PROBE_TRAIN = 10_000  # the probes fit on at most this many training codes


def probe_rows(n):
    """The training rows the probes fit on: all n, or PROBE_TRAIN of them, fixed and evenly
    spaced (minutes of fitting, not an hour, at 60,000; only these are encoded)."""
    return np.linspace(0, n - 1, min(n, PROBE_TRAIN)).round().astype(int)


def representations(encoders, pair, device, stages_done):
    """{rep: (train features, test features)} for S_X, S_Y and, after stage 2, Z_X, Z_Y: the
    training features of probe_rows alone."""
    keep = torch.as_tensor(probe_rows(len(pair.train_x)), device=pair.train_x.device)
    reps = {}
    for rep in REPS:
        if rep[0] == "Z" and 2 not in stages_done:
            continue
        d = rep[1].lower()
        encoder = encoders[("shared_" if rep[0] == "S" else "exclusive_") + d]
        full = pair.domain(d)
        data = common.Data(full.name, full.train_x[keep], full.train_y[keep], full.test_x,
                           full.test_y, full.n_classes, device=full.device)
        tr, _ = common.extract_features(encoder, data, "train", ("y",), device=device)
        te, _ = common.extract_features(encoder, data, "test", ("y",), device=device)
        reps[rep] = (tr["y"], te["y"])
    return reps


def probe_accuracy(kind, train_x, train_y, test_x, test_y, seed):
    """One probe's test accuracy, fitted on probe_rows of the training codes."""
    if len(train_x) > PROBE_TRAIN:  # representations() encodes those rows alone
        keep = probe_rows(len(train_x))
        train_x, train_y = train_x[keep], train_y[keep]
    if kind == "linear":
        return common.linear_probe(train_x, train_y, test_x, test_y)
    from sklearn.decomposition import PCA
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    # whitened-sk-mlp rescales every principal direction to unit variance first, so what lies in
    # directions of small variance weighs as much as the rest (where S kept colour: docs/shared_exclusive.md)
    scale = PCA(whiten=True) if kind == "whitened-sk-mlp" else StandardScaler()
    clf = make_pipeline(scale, MLPClassifier((200,), alpha=1e-3, max_iter=500, random_state=seed))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def _probe_job(kind, train_x, train_y, test_x, test_y, seed):
    """One probe fit, on one BLAS thread: these fits are small, and threads spinning on a busy
    CPU made them many times slower; evaluate() runs several at once instead."""
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return probe_accuracy(kind, train_x, train_y, test_x, test_y, seed)


def evaluate(reps, pair, probes, seed, jobs=1):
    """Every probe's accuracy on every representation and label, `jobs` fits at a time:
    the flat metrics (the first probe's keys acc_SX_class and so on, every other probe's with
    _<probe> appended) and [(probe, rows)], a row per representation."""
    from joblib import Parallel, delayed
    tr_lab = pair.train_labels.cpu().numpy()[probe_rows(len(pair.train_labels))]
    te_lab = pair.test_labels.cpu().numpy()
    fits = [(probe, rep, col) for probe in probes for rep in reps for col in range(len(PAIR_LABELS))]
    accs = Parallel(n_jobs=min(jobs, len(fits)))(
        delayed(_probe_job)(probe, reps[rep][0], tr_lab[:, col], reps[rep][1], te_lab[:, col], seed)
        for probe, rep, col in fits)
    metrics, rows = {}, {}
    for (probe, rep, col), acc in zip(fits, accs):
        target = PAIR_LABELS[col]
        metrics[f"acc_{rep}_{target}" + ("" if probe == probes[0] else "_" + probe)] = acc
        rows.setdefault(probe, {}).setdefault(rep, {"representation": rep[0] + "_" + rep[1]})[target] = acc
    return metrics, [(probe, list(rows[probe].values())) for probe in probes]


def knn_monitor(encoders, pair, device, parts, rule="weighted"):
    """The per-epoch monitor: k-NN test accuracy (by `rule`, common.knn_monitor's) of S on the
    class and of Z on its domain's colour (X's background, Y's foreground), for the encoders
    of `parts`."""
    accs = {}
    for part, rep in parts:
        for d, colour in (("x", "background"), ("y", "foreground")):
            label = "class" if part == "shared" else colour
            accs[f"knn_{rep}{d.upper()}_{label}"] = common.knn_monitor(
                encoders[f"{part}_{d}"], pair.domain(d, label), device, rule=rule)
    return accs


MONITORED = {1: [("shared", "S")], 2: [("exclusive", "Z")]}  # by stage


def save_neighbours(reps, pair, path, n_queries, k=8):
    """Rows: a query image, then its k nearest test images (cosine) by S, then by Z."""
    rows = []
    for d in "xy":
        images = (pair.test_x if d == "x" else pair.test_y).cpu().float() / 127.5 - 1
        for q in range(n_queries):
            for part in "SZ":
                if part + d.upper() not in reps:
                    continue
                f = F.normalize(torch.as_tensor(reps[part + d.upper()][1]), dim=1)
                sim = f @ f[q]
                sim[q] = -2  # not itself
                nn_idx = sim.topk(k).indices
                rows.append(torch.cat([images[q:q + 1], images[nn_idx]]))
    common.save_image_grid(torch.cat(rows), path, nrow=k + 1)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def load_shared(path, encoders, args):
    """Stage 2 alone: take both shared encoders from a run that did stage 1."""
    ckpt = common.load_checkpoint(path)
    extra = ckpt.get("extra", {})
    if ckpt["script"] != SCRIPT or not extra.get("shared_epochs_done"):
        raise UserError(f"{path} is not a {SCRIPT} checkpoint with stage 1 done; run --stage 1 first")
    if ckpt["dataset"] != args.dataset or extra.get("pairing") != args.pairing:
        raise UserError(f"{path} was trained on {ckpt['dataset']} ({extra.get('pairing')}); pass "
                        f"the same --dataset and --pairing to stage 2")
    try:
        encoders["shared_x"].load_state_dict(ckpt["encoder"])
        encoders["shared_y"].load_state_dict(ckpt["modules"]["shared_y"])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path} does not match these flags ({str(e).splitlines()[0][:120]}); "
                        "use the --shared-dim and --shared-norm of the stage 1 run") from None
    return int(extra["shared_epochs_done"])


def pair_extra(args, domain, part, shared_done):
    """What eval_probe needs besides the dataset name to rebuild an encoder's data:
    probe_data(ckpt, ...) reads it back."""
    return {"pair_domain": domain, "part": part, "pairing": args.pairing,
            "pair_seed": PAIR_DATA_SEED, "shared_epochs_done": shared_done}


def save_encoders(run, encoders, cfgs, parts, args, pair, epoch, step, shared_done):
    """shared_x.pt, shared_y.pt and/or exclusive_x.pt, exclusive_y.pt in the common format."""
    for part in parts:
        for d in "xy":
            common.save_checkpoint(run.path(f"{part}_{d}.pt"), script=SCRIPT, encoder=encoders[f"{part}_{d}"],
                                   encoder_cfg=cfgs[part], args=args, data=pair.domain(d), epoch=epoch,
                                   step=step, extra=pair_extra(args, d, part, shared_done))


def train(args):
    device, rank, world = common.start(args)  # world > 1 under torchrun
    main_process = rank == 0  # the one that evaluates, logs and writes
    for part, norm, dim in (("shared", args.shared_norm, args.shared_dim),
                            ("exclusive", args.exclusive_norm, args.exclusive_dim)):
        if norm in ("whiten", "sphere") and args.batch_size // world <= dim:
            raise UserError(f"--{part}-norm {norm} needs more than --{part}-dim {dim} samples per "
                            f"process: raise --batch-size (now {args.batch_size} over {world})")
    pair = load_pair_data(args.dataset, args.data_root, device, args.pairing,
                          image_size=args.image_size)
    if args.n_queries > len(pair.test_x) - 8:  # each query shows its 8 nearest other images
        raise UserError(f"--n-queries {args.n_queries}: the test split has {len(pair.test_x)} "
                        f"images, so at most {len(pair.test_x) - 8} queries")
    common.check_batch(args.batch_size, world, len(pair.train_x))
    if args.epochs is None:  # the recipe's: set by the data's size
        args.epochs = stage_epochs(1, pair, args.batch_size, world)
    if args.exclusive_epochs is None:
        args.exclusive_epochs = stage_epochs(2, pair, args.batch_size, world)
    encoders, critics, cfgs = build_networks(args, pair.image_shape, device)
    # the monitor's baseline: the untrained encoders
    knn_random_init = (knn_monitor(encoders, pair, device, MONITORED[1] + MONITORED[2], args.knn_rule)
                       if args.eval_every and main_process else {})
    shared_done = load_shared(args.shared_from, encoders, args) if args.shared_from else 0
    stage1 = [p for k, m in {**encoders, **critics}.items() if k.startswith("shared") for p in m.parameters()]
    stage2 = [p for k, m in {**encoders, **critics}.items() if k.startswith("exclusive") for p in m.parameters()]
    optimizers = {"shared_opt": common.adam(stage1, lr=args.lr),
                  "exclusive_opt": common.adam(stage2, lr=args.lr),
                  "disc_opt": common.adam([p for d in "xy" for p in critics[f"sz_disc_{d}"].parameters()],
                                               lr=args.lr)}
    # the epoch plan: (stage, epoch within the stage); a checkpoint's epoch counts plan entries
    plan = ([(1, e) for e in range(args.epochs)] if args.stage in ("1", "both") else []) + \
           ([(2, e) for e in range(args.exclusive_epochs)] if args.stage in ("2", "both") else [])
    modules = {"encoder": encoders["shared_x"], **{k: m for k, m in encoders.items() if k != "shared_x"}, **critics}
    run_dir, start, step, elapsed = common.resume_state(args, SCRIPT, modules, optimizers)
    stage_steps = {1: 0, 2: 0}  # --max-steps counts each stage's
    hsic_window = HSICWindow()  # this process's latest (S, Z) per domain
    if args.resume:
        resumed = common.load_checkpoint(args.resume)
        shared_done = resumed["extra"].get("shared_epochs_done", 0)
        stage_steps = dict(zip((1, 2), resumed["extra"].get("stage_steps", [0, 0])))
        if world == 1:  # under torchrun each process had its own rows, and only rank 0's were saved
            hsic_window.load_state_dict(resumed["modules"].get("hsic_window", {}), device)
        if args.stage == "both" and start > shared_done != args.epochs:  # plan entries would shift
            raise UserError(f"stage 1 of {args.resume} ended after {shared_done} epochs and stage 2 "
                            f"has begun: resume with --epochs {shared_done} (--exclusive-epochs "
                            "sets stage 2's)")
    run = common.Run(SCRIPT, args, run_dir, elapsed)
    if args.shared_from and not args.resume:  # the run folder holds every encoder it used
        save_encoders(run, encoders, cfgs, ["shared"], args, pair, 0, 0, shared_done)
    bound = common.BOUNDS[args.loss]
    common.convert_sync_bn([*encoders.values(), *critics.values()], args.sync_bn, world, device)
    # the networks as the steps call them (DDP-wrapped, compiled); the plain ones are saved.
    # Stage 2 runs the frozen shared encoders as plain modules (no gradient to synchronise).
    step_nets = {k: common.maybe_compile(common.wrap_ddp(m, device), args.compile)
                 for k, m in {**encoders, **critics}.items()}
    stage2_nets = {**step_nets, "shared_x": encoders["shared_x"], "shared_y": encoders["shared_y"]}
    gather = common.gather_batch  # negatives from every process's batch (identity on one)
    if main_process:
        print(f"run folder: {run.dir}  device: {device}  data: {pair.name} ({pair.pairing}) "
              f"{len(pair.train_x)} train / {len(pair.test_x)} test pairs  processes: {world}")

    stats, watched, shown = {}, {}, {}  # the latest monitor, and in the progress bar
    # over the planned epochs, --max-steps aside, so a run cut short and resumed ramps as one
    ramp_steps = args.sphere_ramp * args.exclusive_epochs * pair.n_batches("train", args.batch_size,
                                                                           True, world)
    for i in range(start, len(plan)):
        stage, epoch = plan[i]
        n_epochs = args.epochs if stage == 1 else args.exclusive_epochs
        if args.max_steps and stage_steps[stage] >= args.max_steps:
            continue
        for d in "xy":  # stage 2 keeps the shared encoders frozen, BatchNorm statistics included
            encoders[f"shared_{d}"].train(stage == 1).requires_grad_(stage == 1)
            encoders[f"exclusive_{d}"].train(stage == 2)
        opt = optimizers["shared_opt" if stage == 1 else "exclusive_opt"]
        rng, bar = common.epoch_batches(pair, args, i, f"stage {stage} epoch {epoch + 1}/{n_epochs}",
                                        rank, world)
        sums = {}
        for img_x, img_y, _ in bar:
            if stage == 2:
                set_sphere_power(encoders, stage_steps[2], ramp_steps)
            with common.autocast(device, args.amp):
                if stage == 1:
                    loss, logs, sz = shared_step(img_x, img_y, step_nets, step_nets, bound, args,
                                                 gather)
                else:
                    loss, logs, sz = exclusive_step(img_x, img_y, stage2_nets, step_nets, bound,
                                                    args, gather, hsic_window)
            common.check_finite(loss, step, "loss", NAN_HINT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # the S-Z discriminator's own steps; Z is shuffled within each process's batch (a
            # product-of-marginals sample needs no other process's rows)
            for _ in range(args.disc_steps if stage == 2 and args.adversarial > 0 else 0):
                d_loss = sum(sz_disc_loss(step_nets[f"sz_disc_{d}"], *sz[d], rng) for d in "xy")
                optimizers["disc_opt"].zero_grad(set_to_none=True)
                d_loss.backward()
                optimizers["disc_opt"].step()
                logs["sz_disc"] = d_loss
            step += 1
            stage_steps[stage] += 1

            logs["loss"] = loss
            common.add_step(sums, logs)
            bar.set_postfix(loss=f"{loss.item():.3f}", mi=f"{logs.get('local_mi_x', loss).item():.3f}",
                            **shown)
            if args.max_steps and stage_steps[stage] >= args.max_steps:
                break
        stats = common.means(sums)
        if stage == 1:
            shared_done = epoch + 1
        last = epoch + 1 == n_epochs or bool(args.max_steps and stage_steps[stage] >= args.max_steps)
        due = common.eval_due(args.eval_every, epoch, last)
        if main_process and due:
            monitor = knn_monitor(encoders, pair, device, MONITORED[stage], args.knn_rule)
            stats.update(monitor)
            watched.update(monitor)
            shown = {k.split("_")[1]: f"{v:.2f}" for k, v in monitor.items()}  # SX=0.95 ...
        run.log(stage=stage, epoch=epoch + 1, step=step, time=run.elapsed(), **stats)
        if due or last:
            run.plot(list(knn_random_init), knn_random_init)
        run.checkpoint(encoder=encoders["shared_x"], encoder_cfg=cfgs["shared"], args=args,
                       data=pair.domain("x"), epoch=i + 1, step=step,
                       modules={**{k: m for k, m in modules.items() if k != "encoder"},
                                "hsic_window": hsic_window},
                       optimizers=optimizers, extra={**pair_extra(args, "x", "shared", shared_done),
                                                     "stage_steps": [stage_steps[1], stage_steps[2]]})
        # this stage's encoders, one checkpoint each: shared_*.pt stop changing after stage 1
        save_encoders(run, encoders, cfgs, ["shared" if stage == 1 else "exclusive"], args, pair,
                      i + 1, step, shared_done)

    set_sphere_power(encoders, 1, 0)  # evaluated (and saved) on the sphere
    common.finish_distributed()  # the rest is the main process's alone
    if not main_process:
        return run, {}
    stages_done = {s for s, _ in plan} | ({1} if shared_done else set())
    reps = representations(encoders, pair, device, stages_done)
    metrics, tables = evaluate(reps, pair, args.probes, args.seed, jobs=torch.get_num_threads())
    run.log(step=step, probe=",".join(args.probes), **metrics,
            **{k + "_random_init": v for k, v in knn_random_init.items()})
    save_neighbours(reps, pair, run.path("neighbours.png"), args.n_queries)
    for probe, rows in tables:
        common.print_table(rows, title=f"\n{probe} probe test accuracy on {pair.name} ({pair.pairing}), "
                                       f"{step} steps, {run.elapsed() / 60:.1f} min "
                                       f"(chance: class {1 / pair.n_classes:.2f}, colours "
                                       f"{1 / len(PALETTE):.3f})")
    if watched:
        common.print_table([{"k-NN monitor (test)": k[4:], "trained": v, "untrained": knn_random_init[k]}
                            for k, v in watched.items()])
    print("goal: S_* high on class, near chance on colours; Z_X high on background, "
          "Z_Y high on foreground, both low on class")
    saved = [f"{part}_{d}.pt" for part in ("shared", "exclusive") for d in "xy" if os.path.exists(run.path(f"{part}_{d}.pt"))]
    print(f"encoders ({', '.join(saved)}) and neighbours.png in {run.dir}")
    return run, metrics


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    common.run_cli(main)
