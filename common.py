"""What the scripts share, by topic: command line and device, data, encoders,
MI bounds and critics, multi-GPU, runs and checkpoints, metrics.

Only infrastructure and pieces used by two or more scripts live here; each paper's own
objective stays in its script. Nothing here imports a script.

Conventions
- Images are stored as uint8 tensors (N, C, H, W) and turned into floats in [-1, 1] per batch.
- Score tensors hold positives on a known diagonal: `scores[n, m, k]` scores global feature
  `n` against local feature `k` of image `m`; `n == m` are the positive pairs.
- Every MI bound is returned as a value to *maximise*; a loss is its negative.
"""
import argparse
import atexit
import contextlib
import datetime
import errno
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# Command line, device, seeding, optimiser
# ----------------------------------------------------------------------------------------
class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2, no traceback."""


def disk_full(e):
    """The full-disk (or quota) OSError that `e` is, or was raised from or during; else None."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _terminated(signum, frame):
    # SIGTERM (Slurm, `timeout`) unwinds like Ctrl-C: temporary files are removed and the exit
    # handlers run, so a run stopped before its first checkpoint leaves no folder
    raise KeyboardInterrupt


def run_cli(main):
    """Run `main()`, turning a UserError into one clear line on stderr and exit status 2; a
    full disk or an allocation no machine holds is such an error too."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # under torchrun, with the process group left and every file closed, skip the C++
            # teardown: gloo's threads have aborted a finished rank there (SIGABRT) on a loaded
            # CI machine, turning a complete run into a failed one
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        full = disk_full(e)
        if full:
            print(f"error: no space left on the disk ({full.strerror}"
                  f"{f', writing {full.filename}' if full.filename else ''}); free some and run "
                  "again (--resume continues from the last checkpoint.pt)", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e):
            print(f"error: out of memory ({str(e).splitlines()[0][:200]}); lower the network "
                  "widths or --batch-size", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, torch.linalg.LinAlgError):  # whitening's Cholesky on overflowed codes
            print(f"error: {str(e).splitlines()[0][:200]} The codes hold nan or inf or have "
                  "collapsed: lower --lr", file=sys.stderr)
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def nonneg_float(s):
    v = float(s)
    if not 0 <= v < math.inf:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {s}")
    return v


def positive_float(s):
    v = float(s)
    if not 0 < v < math.inf:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def probability(s):
    v = float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {s}")
    return v


def decay_rate(s):
    """An exponential moving average's decay: Adam's betas, --ema."""
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1), got {s}")
    return v


def nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s}")
    return v


def seed_int(s):
    v = int(s)
    if not 0 <= v < 2**32:  # NumPy's limit; epoch seeds are derived from it by multiplication
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), got {s}")
    return v


def int_range(lo, hi):
    """An argparse type: an integer in [lo, hi]. `hi` bounds what cannot be meaningful (an
    epoch count no machine finishes, a width no memory holds), so such a value is one line
    instead of a machine filling its memory."""
    def parse(s):
        v = int(s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {s}")
        return v
    parse.__name__ = f"integer in [{lo}, {hi}]"  # argparse's word for an unparsable value
    return parse


MAX_EPOCHS = 100_000  # a plan list of 1e12 epochs alone fills the memory
MAX_WIDTH = 65_536  # 32 times the paper's widest layer (2048)
epochs_int = int_range(1, MAX_EPOCHS)
width_int = int_range(1, MAX_WIDTH)


def batch_size_int(s):
    v = int(s)
    if v < 2:  # BatchNorm needs two samples to normalise by
        raise argparse.ArgumentTypeError(f"expected a batch of at least 2 images, got {s}")
    return v


def check_batch(batch_size, world, n_train):
    """The per-process share of --batch-size must be a BatchNorm batch, and fit the data."""
    if batch_size % world or batch_size // world < 2:
        raise UserError(f"--batch-size {batch_size} must split into equal parts of at least 2 "
                        f"over the {world} processes")
    if batch_size // world > n_train // world:
        raise UserError(f"--batch-size {batch_size} is larger than the {n_train} training images; "
                        "lower it")


def add_common_args(parser, epochs, batch_size, lr, eval_every=1, eval_unit="epochs", amp=False):
    """Flags every training script has, spelled the same everywhere."""
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="dataset; 'digits' is scikit-learn's bundled 8x8 digits at 32x32 (offline)")
    g.add_argument("--data-root", default="./data", help="where torchvision datasets live")
    g.add_argument("--epochs", type=epochs_int, default=epochs, help="training epochs")
    g.add_argument("--batch-size", type=batch_size_int, default=batch_size,
                   help="batch size (N)")
    g.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimisation steps in total (smoke tests)")
    g.add_argument("--seed", type=seed_int, default=0, help="seeds Python, NumPy and torch")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=amp,
                   help="bf16 autocast (CUDA or CPU)" + (" (default: where the device has "
                        "native bf16, see native_bf16)" if amp is None else ""))
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    g.add_argument("--out-dir", default="runs", help="run folders are created under this")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue the run whose checkpoint.pt is at PATH")
    g.add_argument("--no-progress", action="store_true", help="disable tqdm progress bars")
    g.add_argument("--eval-every", type=nonneg_int, default=eval_every, metavar="K",
                   help=f"run the test-split monitor every K {eval_unit} and after the last "
                        "(0: never; default %(default)s, about 5%% of a run or less)")
    g.add_argument("--image-size", type=positive_int, default=None, metavar="S",
                   help="resize images to S x S (default: the dataset's own, 32; STL-10's crops "
                        "64); with --encoder auto, 64 and up get DIM's AlexNet-style encoder")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write metrics.jsonl's numbers and the run's pictures for TensorBoard "
                        "(needs `pip install tensorboard`)")
    g.add_argument("--deterministic", action="store_true",
                   help="repeatable GPU runs: torch.use_deterministic_algorithms and no TF32 "
                        "(fp32 matmuls on CUDA use TF32 otherwise)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA, BatchNorm statistics over the global batch "
                        "(SyncBatchNorm) instead of each process's own")
    return parser


def get_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


def set_precision(device, deterministic=False):
    """TF32 for fp32 matmuls and convolutions on CUDA (about 7x an H100's fp32 rate, 10-bit
    mantissa; CPU runs are untouched), unless `deterministic`, which asks torch for
    repeatable kernels instead. Ops without a deterministic kernel (grid_sample's backward on
    CUDA, used by the warps) only warn: a run should not die for a warp."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def native_bf16(device):
    """Whether bf16 autocast runs in hardware here: a CUDA device that supports it, or a CPU
    with AVX-512 BF16 or AMX (elsewhere bf16 is emulated, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device, enabled):
    """bf16 autocast on CUDA and CPU when `enabled`; a no-op context otherwise."""
    if not enabled or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def adam(params, lr, betas=(0.9, 0.999), **kw):
    """torch.optim.Adam with its fused kernel (one pass over each parameter instead of about a
    dozen elementwise kernels) where torch has one for the parameters' device: from torch 2.4
    on CPU, CUDA and MPS; older torch falls back to the default implementation. The update is
    the same up to float rounding (a test checks it)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True, **kw)
    except RuntimeError:  # torch < 2.4 on CPU: fused=True is refused when it is built
        return torch.optim.Adam(params, lr=lr, betas=betas, **kw)


@contextlib.contextmanager
def frozen(*modules):
    """Turn off requires_grad of the modules' parameters, so a loss built inside cannot even
    reach them; restored on exit."""
    saved = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, flags in zip(modules, saved):
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)


def maybe_compile(module, enabled):
    """torch.compile when asked; callers keep the plain module to save its state dict."""
    return torch.compile(module) if enabled else module


def progress(iterable, disable=False, **kw):
    from tqdm import tqdm
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kw)


# ----------------------------------------------------------------------------------------
# Data: uint8 tensors on the device, batched without a DataLoader
# ----------------------------------------------------------------------------------------
DATASETS = ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "stl10", "svhn",
            "imagefolder"]


@dataclass
class Data:
    """A labelled train/test pair held as uint8 tensors (on the device when it fits).

    Labels of -1 mark unlabelled images (STL-10's unlabelled split): used for training,
    skipped by probes. `crop` enables STL-10's random-crop + flip (train) / centre crop (test).
    `device` is where batches() delivers (the training device; None: where the data are), so a
    dataset too large for the GPU stays on the CPU and moves one uint8 batch at a time.
    """
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    crop: int = 0
    device: torch.device = None

    @property
    def image_shape(self):
        c, h, w = self.train_x.shape[1:]
        return (c, self.crop, self.crop) if self.crop else (c, h, w)

    def to(self, device):
        for k in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, k, getattr(self, k).to(device))
        self.device = device
        return self

    def split(self, split):
        return (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)

    def preprocess(self, x, train, rng=None):
        """uint8 batch -> float in [-1, 1], with augmentation done on the batch's device."""
        x = x.float().div_(127.5).sub_(1.0)
        if not self.crop:
            return x
        n, _, h, w = x.shape
        c = self.crop
        if not train:
            top, left = (h - c) // 2, (w - c) // 2
            return x[:, :, top:top + c, left:left + c]
        # random crop per image via unfold-free gather: build index grids on the device
        tops = torch.randint(0, h - c + 1, (n,), generator=rng).to(x.device)
        lefts = torch.randint(0, w - c + 1, (n,), generator=rng).to(x.device)
        ar = torch.arange(c, device=x.device)
        rows = (tops[:, None] + ar)[:, None, :, None].expand(n, x.shape[1], c, w)
        x = x.gather(2, rows)
        cols = (lefts[:, None] + ar)[:, None, None, :].expand(n, x.shape[1], c, c)
        x = x.gather(3, cols)
        flip = torch.rand(n, generator=rng).to(x.device) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def batches(self, split, batch_size, shuffle=False, rng=None, drop_last=False,
                rank=0, world_size=1, with_index=False):
        """Yield (float images, labels) on `self.device` (augmented there); no DataLoader.
        with_index: (images, labels, their indices into the split) instead."""
        x, y = self.split(split)
        device = self.device or x.device
        for idx in batch_indices(len(x), batch_size, shuffle, rng, drop_last, rank,
                                 world_size, x.device):
            xb, yb = self.images(split, idx, rng), y[idx].to(device, non_blocking=True)
            yield (xb, yb, idx) if with_index else (xb, yb)

    def images(self, split, idx, rng=None):
        """The images of a split at the indices idx, preprocessed as batches() does."""
        x = self.split(split)[0]
        xb = x[idx.to(x.device)].to(self.device or x.device, non_blocking=True)
        return self.preprocess(xb, train=(split == "train"), rng=rng)

    def n_batches(self, split, batch_size, drop_last=False, world_size=1):
        return count_batches(len(self.split(split)[0]), batch_size, drop_last, world_size)


def nearest_neighbours(images, k, chunk=1024):
    """(N, k) indices of each image's k nearest other images by the cosine of their centred
    pixels (every image minus the mean image), nearest first. Images larger than 32 x 32 are
    average-pooled to at most that first; the work is N^2 dot products on the images' device
    (60,000 Fashion-MNIST images: about 35 s on 2 CPU cores)."""
    if not 0 < k < len(images):
        raise ValueError(f"k must be in [1, {len(images) - 1}], got {k}")
    x = images.float()
    side = max(x.shape[-2:])
    if side > 32:
        x = F.adaptive_avg_pool2d(x, (x.shape[-2] * 32 // side, x.shape[-1] * 32 // side))
    x = x.flatten(1)
    x = F.normalize(x - x.mean(0), dim=1)
    out = []
    for i in range(0, len(x), chunk):
        sim = x[i:i + chunk] @ x.t()
        rows = torch.arange(len(sim), device=x.device)
        sim[rows, rows + i] = -3.0  # never an image's own neighbour
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def neighbour_table(data, k):
    """--cluster-neighbours' table: None at k = 0 (each image is its own partner), else, for
    every training image, its own index followed by its k nearest_neighbours (so a partner
    drawn from a row is the image itself 1 time in k + 1), once k is checked against their
    number."""
    if not k:
        return None
    if k >= len(data.train_x):
        raise UserError(f"--cluster-neighbours {k} must be less than the {len(data.train_x)} "
                        "training images")
    nearest = nearest_neighbours(data.train_x, k)
    return torch.cat([torch.arange(len(nearest))[:, None].to(nearest), nearest], 1)


def random_neighbours(neighbours, idx, repeats=1, rng=None):
    """For each index of idx, repeated `repeats` times (as x.repeat(repeats) orders them), the
    index of one of its neighbours (rows of `nearest_neighbours`) drawn uniformly."""
    idx = idx.repeat(repeats).to(neighbours.device)
    pick = torch.randint(neighbours.shape[1], (len(idx),), generator=rng)
    return neighbours[idx, pick.to(neighbours.device)]


def random_shift(x, max_shift, rng=None):
    """Each image of a [-1, 1] batch translated by its own (dy, dx) in [-max_shift, max_shift],
    the uncovered border filled with -1 (black); x itself when max_shift is 0."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    tops, lefts = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=rng).to(x.device)
    rows = (tops + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * max_shift)
    cols = (lefts + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_affine(x, max_rotate=25.0, max_scale=0.2, max_shift=0.1, max_shear=0.0,
                  flip=0.0, rng=None):
    """Each image warped by its own random rotation (up to max_rotate degrees either way),
    scaling of its width and of its height (each by 1 +- max_scale), shift (up to max_shift
    of the half-width, 1.6 pixels of 32) and, where max_shear > 0, horizontal shear (x moved
    by up to max_shear times y, a change of slant); what enters the frame is background, -1
    (images in [-1, 1]). A digit keeps its class under such a warp, not its pose or its
    proportions: a 1 that leans or is wide stays a 1. With probability `flip` an image is
    also mirrored left to right. Draws from `rng` (a CPU torch.Generator) where given, else from
    the global generator on x's device."""
    n = len(x)

    def uniform(*shape):  # in [-1, 1)
        if rng is None:
            return torch.rand(*shape, device=x.device) * 2 - 1
        return (torch.rand(*shape, generator=rng) * 2 - 1).to(x.device)

    angle = uniform(n) * max_rotate * torch.pi / 180
    scale = 1 + uniform(n, 2) * max_scale  # width, height apart
    shift = uniform(n, 2) * max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = scale[:, 0], scale[:, 1]
    theta = torch.stack([torch.stack([cos / sx, -sin / sy, shift[:, 0]], 1),
                         torch.stack([sin / sx, cos / sy, shift[:, 1]], 1)], 1)  # (N, 2, 3)
    if max_shear > 0:  # output (u, v) reads the input at theta (u + k v, v, 1)
        shear = torch.eye(3, device=x.device).repeat(n, 1, 1)
        shear[:, 0, 1] = uniform(n) * max_shear
        theta = theta @ shear
    if flip > 0:  # output column u reads the input at -u
        mirror = torch.where((uniform(n) + 1) / 2 < flip, -1.0, 1.0)
        theta = theta * torch.stack([mirror, torch.ones_like(mirror), torch.ones_like(mirror)], 1)[:, None, :]
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding = background


def random_jitter(x, strength, rng=None, brightness=True):
    """Each image of a [-1, 1] batch with its own contrast (times 1 +- strength) and
    brightness (+- strength/2 of the range) change, clipped to the range; x itself when
    strength is 0. brightness=False changes the contrast alone, so a black background (-1)
    stays black and only what lies on it gets lighter or darker. Draws from `rng` (a CPU
    torch.Generator) where given, the same draws either way."""
    if strength == 0:
        return x
    n = len(x)
    contrast, shift = ((torch.rand(2, n, 1, 1, 1, generator=rng) * 2 - 1) * strength).to(x.device)
    if not brightness:
        shift = torch.zeros_like(shift)
    return ((x + 1) / 2 * (1 + contrast) + shift / 2).clamp(0, 1) * 2 - 1


def batch_indices(n, batch_size, shuffle, rng, drop_last, rank, world_size, device):
    """Index tensors of one pass over n examples. Under torchrun every rank draws the same
    order (same seed of `rng`) and takes its own slice, so all see the same number of batches."""
    order = torch.randperm(n, generator=rng) if shuffle else torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size
        order = order[rank * per_rank:(rank + 1) * per_rank]
    order = order.to(device)
    stop = len(order) - batch_size + 1 if drop_last else len(order)
    for i in range(0, max(stop, 0), batch_size):
        yield order[i:i + batch_size]


def count_batches(n, batch_size, drop_last=False, world_size=1):
    """How many batches batch_indices yields for each rank."""
    n //= world_size
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def epochs_for_steps(steps, data, batch_size, world_size=1):
    """The fewest epochs of whole batches (batch_size global, drop_last) that make `steps`
    steps: a recipe stated in steps holds whatever the dataset's size."""
    return math.ceil(steps / data.n_batches("train", batch_size // world_size, drop_last=True,
                                            world_size=world_size))


def load_digits_data(test_fraction=0.2, size=32):
    """scikit-learn's bundled 8x8 digits, upsampled to `size`, fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0,1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction,
                              stratify=d.target, random_state=0)
    tr, te = torch.tensor(tr), torch.tensor(te)
    return x[tr], y[tr], x[te], y[te]


# Which files to place where when torchvision cannot download (offline machines).
_OFFLINE_HINT = {
    "mnist": "MNIST/raw/ (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
             "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)",
    "fashion-mnist": "FashionMNIST/raw/ (the four *-ubyte.gz files of Fashion-MNIST)",
    "cifar10": "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)",
    "cifar100": "cifar-100-python.tar.gz (or its extracted cifar-100-python/)",
    "stl10": "stl10_binary.tar.gz (or its extracted stl10_binary/)",
    "svhn": "train_32x32.mat and test_32x32.mat",
}


def _tv_arrays(ds):
    """A torchvision dataset -> (uint8 NCHW tensor, int64 labels)."""
    x = ds.data if hasattr(ds, "data") else None
    x = torch.as_tensor(np.asarray(x))
    if x.ndim == 3:  # MNIST-like (N, H, W)
        x = x[:, None]
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # CIFAR (N, H, W, C)
        x = x.permute(0, 3, 1, 2)
    y = getattr(ds, "targets", None)
    if y is None:
        y = ds.labels
    return x.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(y), dtype=torch.long)


def _imagefolder(root, image_size, workers=None):
    """root/{train,test}/<class>/<image>: each image resized (shorter side) and centre-cropped
    to image_size, decoded by a pool of threads (PIL releases the GIL while it decodes and
    resizes) straight into one preallocated uint8 tensor per split. Both splits are labelled
    by train/'s class list (test/ may lack a class, not add one)."""
    from concurrent.futures import ThreadPoolExecutor
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    workers = workers or min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count() or 1)
    out, classes = [], None
    for split in ("train", "test"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f"imagefolder expects {path}/<class>/<images>; that folder is missing")
        try:
            ds = ImageFolder(path)
        except FileNotFoundError as e:  # no class folder, or no image in any
            raise UserError(f"imagefolder {path}: {e}") from None
        if classes is None:
            classes = ds.classes
            if len(classes) < 2:
                raise UserError(f"imagefolder {path} has {len(classes)} class folder; the probes "
                                "need at least two classes")
        unknown = sorted(set(ds.classes) - set(classes))
        if unknown:
            raise UserError(f"imagefolder {path} has class folders that train/ lacks "
                            f"({', '.join(unknown)}); name test/'s classes as train/'s")
        x = torch.empty(len(ds), 3, image_size, image_size, dtype=torch.uint8)

        def decode(i):
            file = ds.samples[i][0]
            try:
                t = tf(ds.loader(file))
            except Exception as e:  # PIL: unidentified, truncated or unreadable image
                raise UserError(f"cannot read image {file} ({type(e).__name__}); remove or "
                                "replace it") from None
            x[i] = t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3]

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(decode, range(len(ds))))  # list(): re-raises a worker's error here
        # the class *names* carry the label: test/'s own numbering would shift if it lacked one
        out += [x, torch.tensor([classes.index(ds.classes[t]) for t in ds.targets], dtype=torch.long)]
    return out + [len(classes)]


def resize_images(x, size, chunk=2048):
    """uint8 (N, C, H, W) -> (N, C, size, size): bilinear, antialiased when shrinking; x
    itself when it already has that size."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.empty(*x.shape[:2], size, size, dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                                         antialias=True, align_corners=False).round().clamp(0, 255)
    return out


def load_data(name, root="./data", device=torch.device("cpu"), image_size=None,
              max_device_bytes=4 << 30):
    """Train and test sets of `name` as a `Data` whose batches come on `device`; the images
    move there as a whole if under `max_device_bytes`, else stay on the CPU. `image_size`:
    the side images are resized to (None: the dataset's own, 32 px; STL-10's crops, 64)."""
    crop = 0
    if name == "digits":
        tx, ty, vx, vy = load_digits_data(size=image_size or 32)
        n_classes = 10
    elif name == "imagefolder":
        tx, ty, vx, vy, n_classes = _imagefolder(root, image_size or 32)
    elif name in _OFFLINE_HINT:
        import torchvision.datasets as tvd
        # what a failed download would leave behind (empty folders): removed again below
        made = [d for d in (root, *(os.path.join(root, c, *r) for c in ("MNIST", "FashionMNIST")
                                    for r in ((), ("raw",))))
                if not os.path.exists(d)]
        try:
            if name in ("mnist", "fashion-mnist"):
                cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
                tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
            elif name in ("cifar10", "cifar100"):
                cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
                tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
            elif name == "svhn":
                tr = tvd.SVHN(root, split="train", download=True)
                te = tvd.SVHN(root, split="test", download=True)
            else:  # stl10: unsupervised training on train+unlabeled (labels -1), paper's crops
                tr = tvd.STL10(root, split="train+unlabeled", download=True)
                te = tvd.STL10(root, split="test", download=True)
                crop = image_size or 64
        except Exception as e:  # torchvision raises URLError, RuntimeError, OSError ...
            for d in sorted(made, key=len, reverse=True):
                with contextlib.suppress(OSError):  # only empty folders go
                    os.rmdir(d)
            raise UserError(f"could not load {name} from {root} ({type(e).__name__}); offline, put "
                            f"{_OFFLINE_HINT[name]} under {root}/ and run again") from None
        (tx, ty), (vx, vy) = _tv_arrays(tr), _tv_arrays(te)
        for split, x, y in (("train", tx, ty), ("test", vx, vy)):
            if len(x) != len(y):
                raise UserError(f"{name} under {root}: the {split} split has {len(x)} images but "
                                f"{len(y)} labels; a file is truncated or from another set, "
                                "replace it")
        if name in ("mnist", "fashion-mnist"):  # 28x28 -> 32x32 so every encoder sees 32x32
            tx, vx = F.pad(tx, (2, 2, 2, 2)), F.pad(vx, (2, 2, 2, 2))
        # STL-10 keeps the paper's crop of 64 from 96 at any crop size
        size = crop * 3 // 2 if crop else image_size
        if size:
            tx, vx = resize_images(tx, size), resize_images(vx, size)
        n_classes = 100 if name == "cifar100" else 10
    else:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    data = Data(name, tx, ty, vx, vy, n_classes, crop, device)
    nbytes = sum(t.numel() * t.element_size() for t in (tx, ty, vx, vy))
    if device.type != "cpu" and nbytes <= max_device_bytes:
        data.to(device)
    return data


def instance_noise(images, sigma, rng=None):
    """images + N(0, sigma^2) instance noise (Sonderby et al. 2016), the images themselves when
    sigma is 0. With an `rng` the noise is drawn on the CPU from it (reproducible per
    rank), else from the images' device's default generator."""
    if sigma == 0:
        return images
    if rng is None:
        return images + sigma * torch.randn_like(images)
    return images + sigma * torch.randn(images.shape, generator=rng).to(images.device)


# ----------------------------------------------------------------------------------------
# Encoders: each returns a dict of named taps
# ----------------------------------------------------------------------------------------
def _conv_bn_relu(cin, cout, k, s, p):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _fc_bn_relu(din, dout):
    return nn.Sequential(nn.Linear(din, dout, bias=False), nn.BatchNorm1d(dout),
                         nn.ReLU(inplace=True))


class DCGANEncoder(nn.Module):
    """DIM's 32x32 encoder (arXiv:1808.06670, App. A.2): conv 64-128-256 (4x4/2) -> fc 1024 -> y 64.

    Taps: c1 (H/2), c2 (H/4, the local map for 32x32), conv (H/8, last conv), fc, y.
    Every map tap includes its BatchNorm and ReLU, as in the paper.
    """
    maps = ("c1", "c2", "conv")
    default_local = "c2"

    def __init__(self, in_channels=3, image_size=32, y_dim=64, fc_dim=1024):
        super().__init__()
        self.c1 = _conv_bn_relu(in_channels, 64, 4, 2, 1)
        self.c2 = _conv_bn_relu(64, 128, 4, 2, 1)
        self.c3 = _conv_bn_relu(128, 256, 4, 2, 1)
        s = image_size // 8
        self.fc = _fc_bn_relu(256 * s * s, fc_dim)
        self.out = nn.Linear(fc_dim, y_dim)

    def forward(self, x):
        c1 = self.c1(x)
        c2 = self.c2(c1)
        conv = self.c3(c2)
        fc = self.fc(conv.flatten(1))
        return {"c1": c1, "c2": c2, "conv": conv, "fc": fc, "y": self.out(fc)}


class AlexNetEncoder(nn.Module):
    """AlexNet-style encoder for 64x64 inputs (STL-10 crops), after Donahue et al. (2016).

    conv 96 -> pool -> 192 -> pool -> 384 -> 384 -> 192 -> pool, fc 4096 -> 4096 -> y.
    Taps: c1 (H/2), c2 (H/4), c3 (H/4, 384 ch; local map), conv (H/8), fc, y.
    """
    maps = ("c1", "c2", "c3", "conv")
    default_local = "c3"

    def __init__(self, in_channels=3, image_size=64, y_dim=64, fc_dim=4096):
        super().__init__()
        self.c1 = nn.Sequential(_conv_bn_relu(in_channels, 96, 3, 1, 1), nn.MaxPool2d(2))
        self.c2 = nn.Sequential(_conv_bn_relu(96, 192, 3, 1, 1), nn.MaxPool2d(2))
        self.c3 = _conv_bn_relu(192, 384, 3, 1, 1)
        self.c4 = nn.Sequential(_conv_bn_relu(384, 384, 3, 1, 1), _conv_bn_relu(384, 192, 3, 1, 1),
                                nn.MaxPool2d(2))
        s = image_size // 8
        self.fc = nn.Sequential(_fc_bn_relu(192 * s * s, fc_dim), _fc_bn_relu(fc_dim, fc_dim))
        self.out = nn.Linear(fc_dim, y_dim)

    def forward(self, x):
        c1 = self.c1(x)
        c2 = self.c2(c1)
        c3 = self.c3(c2)
        conv = self.c4(c3)
        fc = self.fc(conv.flatten(1))
        return {"c1": c1, "c2": c2, "c3": c3, "conv": conv, "fc": fc, "y": self.out(fc)}


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class ResNetEncoder(nn.Module):
    """A small ResNet (one basic block per stage) with the same taps as DCGANEncoder."""
    maps = ("c1", "c2", "conv")
    default_local = "c2"

    def __init__(self, in_channels=3, image_size=32, y_dim=64, fc_dim=1024):
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, 64, 3, 1, 1)
        self.c1 = _BasicBlock(64, 64, 2)
        self.c2 = _BasicBlock(64, 128, 2)
        self.c3 = _BasicBlock(128, 256, 2)
        s = image_size // 8
        self.fc = _fc_bn_relu(256 * s * s, fc_dim)
        self.out = nn.Linear(fc_dim, y_dim)

    def forward(self, x):
        c1 = self.c1(self.stem(x))
        c2 = self.c2(c1)
        conv = self.c3(c2)
        fc = self.fc(conv.flatten(1))
        return {"c1": c1, "c2": c2, "conv": conv, "fc": fc, "y": self.out(fc)}


# The generic encoders; a script that owns other networks has its own ENCODERS (its
# checkpoints' encoder_cfg names one of them, and eval_probe.py looks there first).
ENCODERS = {"dcgan": DCGANEncoder, "alexnet": AlexNetEncoder, "resnet": ResNetEncoder}


def encoder_config(arch, image_shape, y_dim=64, encoders=ENCODERS):
    """The plain-typed constructor arguments saved in checkpoints ('auto' resolved here)."""
    c, h, w = image_shape
    if h != w or h % 8:
        raise UserError(f"encoders expect square images with a side divisible by 8, got {h}x{w}")
    if arch == "auto":
        arch = "alexnet" if h >= 64 else "dcgan"
    if arch not in encoders:
        raise UserError(f"unknown encoder {arch!r}; choose one of {', '.join(encoders)}")
    return {"arch": arch, "in_channels": int(c), "image_size": int(h), "y_dim": int(y_dim)}


def build_encoder(cfg, encoders=ENCODERS):
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    if arch not in encoders:
        raise UserError(f"encoder_cfg names no known architecture ({arch!r}, not one of "
                        f"{', '.join(encoders)}): was the checkpoint edited, or written by another "
                        "version of the code? Evaluate it with the code that wrote it")
    try:
        return encoders[arch](**cfg)
    except (TypeError, ValueError) as e:  # arguments the architecture does not take
        raise UserError(f"encoder_cfg {dict(cfg, arch=arch)} builds no encoder ({e})") from None


def tap_shapes(encoder, image_shape, device="cpu"):
    """Output shape (without batch) of every tap, found by one forward pass of two images."""
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        out = encoder(torch.zeros(2, *image_shape, device=device))
    encoder.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


def encoder_stages(encoder):
    """The conv trunk of a built-in encoder as ordered (tap, module) pairs; the head that
    follows the last one is flatten -> encoder.fc -> encoder.out (= y)."""
    if isinstance(encoder, DCGANEncoder):
        return [("c1", encoder.c1), ("c2", encoder.c2), ("conv", encoder.c3)]
    if isinstance(encoder, ResNetEncoder):
        return [("c1", nn.Sequential(encoder.stem, encoder.c1)), ("c2", encoder.c2),
                ("conv", encoder.c3)]
    if isinstance(encoder, AlexNetEncoder):
        return [("c1", encoder.c1), ("c2", encoder.c2), ("c3", encoder.c3), ("conv", encoder.c4)]
    raise UserError(f"{type(encoder).__name__} cannot be run from an intermediate map; "
                    f"use --encoder dcgan, resnet or alexnet")


def forward_from(encoder, tap, feature_map):
    """y computed from `feature_map` standing in for the map at `tap` (the rest of the encoder)."""
    stages = encoder_stages(encoder)
    names = [name for name, _ in stages]
    h = feature_map
    for _, module in stages[names.index(tap) + 1:]:
        h = module(h)
    return encoder.out(encoder.fc(h.flatten(1)))


def receptive_fields(encoder, tap, image_shape, chunk=64):
    """(M*M, H, W) bool: which input pixels each location of the map at `tap` can see.

    Exact for conv/pool/BN/ReLU/residual nets: in a copy with every weight 1, every bias 0,
    identity BatchNorm and max-pooling swapped for average pooling (same window), an all-ones
    input gives positive activations everywhere, so the gradient of location k is positive
    exactly on k's receptive field."""
    import copy
    probe = copy.deepcopy(encoder).cpu().eval()
    for parent in list(probe.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
            elif isinstance(child, (nn.Conv2d, nn.Linear)):
                nn.init.ones_(child.weight)
                if child.bias is not None:
                    nn.init.zeros_(child.bias)
            elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                child.reset_parameters()  # weight 1, bias 0, running mean 0, var 1
    n_loc = math.prod(tap_shapes(probe, image_shape)[tap][1:])
    fields = []
    for locs in torch.arange(n_loc).split(chunk):
        x = torch.ones(len(locs), *image_shape, requires_grad=True)
        local_map = probe(x)[tap].flatten(2)  # (B, C, M*M)
        local_map[torch.arange(len(locs)), :, locs].sum().backward()
        fields.append(x.grad.sum(1) > 0)
    return torch.cat(fields)  # (M*M, H, W)


@contextlib.contextmanager
def keep_bn_stats(module):
    """Forward passes inside use batch statistics but leave BatchNorm running statistics as
    they were (momentum 0), for extra passes on inputs unlike the test data (occluded, masked)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, count) in zip(bns, saved):
            m.momentum = mom
            m.num_batches_tracked.copy_(count)


@torch.no_grad()
def recalibrate_batchnorm(encoder, data, device, batch_size=500):
    """Reset the encoder's running BatchNorm statistics to those of the real training images.
    GAN-style training normalises real and generated batches alike, so the running averages
    it leaves mix both, while the encoder is evaluated (and probed by eval_probe.py) on real
    images. Training is unaffected: it normalises with each batch's own statistics."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
        m.train()
        if isinstance(m, nn.SyncBatchNorm):  # rank 0 alone runs this: no waiting for the others
            m.forward = nn.modules.batchnorm._BatchNorm.forward.__get__(m)
    for x, _ in data.batches("train", batch_size):
        encoder(x.to(device))
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
        m.__dict__.pop("forward", None)


@torch.no_grad()
def average_weights_(averaged, trained, decay, step):
    """One step of an exponential moving average of `trained`'s weights into `averaged` (a
    copy of it): w_avg <- d w_avg + (1 - d) w, d = min(decay, (1 + step) / (10 + step)), so
    that early in a run the average follows the weights instead of their initialisation
    (TensorFlow's ExponentialMovingAverage with num_updates). Buffers (BatchNorm's running
    statistics) are copied. Polyak averaging; for GANs, Yazici et al. 2019, arXiv:1806.04498."""
    d = min(decay, (1 + step) / (10 + step))
    for p_avg, p in zip(averaged.parameters(), trained.parameters()):
        p_avg.lerp_(p.detach(), 1 - d)
    for b_avg, b in zip(averaged.buffers(), trained.buffers()):
        b_avg.copy_(b)


# ----------------------------------------------------------------------------------------
# MI bounds. `scores` is (N, N) or (N, N, K): scores[n, m, k] = T(global n, local k of m).
# Positives are n == m. Each returns the bound (a scalar) to maximise.
# ----------------------------------------------------------------------------------------
def _as_3d(scores):
    if scores.dim() == 2:
        scores = scores[:, :, None]
    if scores.dim() != 3 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be (N, N) or (N, N, K), got {tuple(scores.shape)}")
    return scores.float()  # bounds in fp32 even under autocast


def jsd_bound(scores):
    """Jensen-Shannon MI estimate: E_pos[-sp(-T)] - E_neg[sp(T)], positives excluded from
    the negatives. Insensitive to the number of negatives."""
    s = _as_3d(scores)
    n, _, k = s.shape
    pos = s.diagonal(dim1=0, dim2=1).transpose(0, 1)  # (N, K): T of the positive pairs
    e_pos = -F.softplus(-pos).mean()
    # sum of sp(T) over everything minus over the diagonal = sum over negatives only
    e_neg = (F.softplus(s).sum() - F.softplus(pos).sum()) / (n * (n - 1) * k)
    return e_pos - e_neg


def infonce_bound(scores):
    """infoNCE: log(#candidates) + E_pos[T - log sum exp T over the candidates], i.e. the log
    of the softmax of the positive, shifted so that independent samples give 0. For global
    feature n and its positive local feature (n, k), the candidates are that positive plus
    every local feature of every other image: (N-1)*K + 1 of them, so the bound never exceeds
    log((N-1)*K + 1) (log N for global scores)."""
    s = _as_3d(scores)
    n, _, k = s.shape
    pos = s.diagonal(dim1=0, dim2=1).transpose(0, 1)  # (N, K): T of the positive pairs
    positive = torch.eye(n, dtype=torch.bool, device=s.device)[:, :, None]  # (N, N, 1)
    neg = s.masked_fill(positive, float("-inf"))
    lse_neg = torch.logsumexp(neg.flatten(1), dim=1)  # (N,) over all negatives of n
    return (pos - torch.logaddexp(pos, lse_neg[:, None])).mean() + math.log((n - 1) * k + 1)


def dv_bound(scores):
    """Donsker-Varadhan (MINE): E_pos[T] - log E_neg[exp T], the log-mean-exp computed
    stably as logsumexp minus log(count)."""
    s = _as_3d(scores)
    n, _, k = s.shape
    pos = s.diagonal(dim1=0, dim2=1).transpose(0, 1)  # (N, K): T of the positive pairs
    positive = torch.eye(n, dtype=torch.bool, device=s.device)[:, :, None]  # (N, N, 1)
    neg = s.masked_fill(positive, float("-inf"))
    return pos.mean() - (torch.logsumexp(neg.flatten(), 0) - math.log(n * (n - 1) * k))


BOUNDS = {"jsd": jsd_bound, "infonce": infonce_bound, "dv": dv_bound}


def cluster_information(logits, logits_warped, balance=1.0, eps=1e-8):
    """IIC's objective (Ji et al. 2019, arXiv:1807.06653) between the clusters y of an image
    and y' of its warped copy: balance * (H(y) + H(y')) - H(y, y'), from the batch's joint
    P(y, y') = mean of softmax(logits)^T softmax(logits_warped), symmetrised; at balance 1 it
    is the mutual information I(y; y'). It is high when each image gets one confident cluster,
    the same for both views, and the batch uses every cluster equally; a balance above 1
    (IIC's lambda) weighs that last part more."""
    p, q = logits.softmax(1), logits_warped.softmax(1)
    joint = (p.t() @ q).float() / len(p)  # (K, K); in float32 under --amp, for the logs
    joint = ((joint + joint.t()) / 2).clamp_min(eps)
    marg = joint.sum(1)  # P(y) = P(y'), the joint being symmetric
    return (joint * (joint.log() - balance * marg[:, None].log()
                     - balance * marg[None, :].log())).sum()


# ----------------------------------------------------------------------------------------
# Critics: score global features against local (or conv) maps
# ----------------------------------------------------------------------------------------
class DotCritic(nn.Module):
    """Encode-and-dot-product critic (DIM's main tables).

    Global: y -> MLP (Linear E, ReLU, Linear E) + Linear E shortcut.
    Local: the same shape from 1x1 convs, then LayerNorm over the embedding.
    All N x N x M^2 scores come from one einsum.
    """

    def __init__(self, global_dim, local_channels, embed_dim=2048, scale=1.0):
        super().__init__()
        e = embed_dim
        self.scale = scale  # scores are scale * <g, l>
        self.g_mlp = nn.Sequential(nn.Linear(global_dim, e), nn.ReLU(inplace=True), nn.Linear(e, e))
        self.g_skip = nn.Linear(global_dim, e)
        self.l_mlp = nn.Sequential(nn.Conv2d(local_channels, e, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(e, e, 1))
        self.l_skip = nn.Conv2d(local_channels, e, 1)
        self.l_norm = nn.LayerNorm(e)

    def embed_global(self, global_feat):  # (N, D) -> (N, E)
        return self.g_mlp(global_feat) + self.g_skip(global_feat)

    def embed_local(self, local_map):  # (N, C, H, W) -> (N, H*W, E)
        emb = self.l_mlp(local_map) + self.l_skip(local_map)
        return self.l_norm(emb.flatten(2).transpose(1, 2))

    def forward(self, global_feat, local_map, gather=None):
        g = self.embed_global(global_feat)
        l = self.embed_local(local_map)
        if gather is not None:  # multi-GPU: negatives from every rank's batch
            g, l = gather(g), gather(l)
        return self.scale * torch.einsum("nd,mkd->nmk", g, l)  # (N, N, M*M): positives on n == m


class ConcatCritic(nn.Module):
    """Concat-and-convolve critic: y broadcast to every location, concatenated with C(x),
    then 1x1 convs hidden -> hidden -> 1 with ReLU between.

    Scored for all N x N pairs. The first 1x1 conv is linear in the concatenation, so it is
    split into a part for y and a part for C(x) and summed per pair: exact, and it avoids
    materialising N*N copies of the input.
    """

    def __init__(self, global_dim, local_channels, hidden=512):
        super().__init__()
        self.w_global = nn.Linear(global_dim, hidden)
        self.w_local = nn.Linear(local_channels, hidden, bias=False)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, global_feat, local_map, gather=None):
        if gather is not None:
            global_feat, local_map = gather(global_feat), gather(local_map)
        a = self.w_global(global_feat)  # (N, H)
        b = self.w_local(local_map.flatten(2).transpose(1, 2))  # (N, K, H)
        h = a[:, None, None, :] + b[None, :, :, :]  # (N, N, K, H)
        return self.rest(h).squeeze(-1)  # (N, N, K)


class GlobalCritic(nn.Module):
    """DIM(G) critic: flatten the last conv map, concatenate with y, MLP 512-512-1.
    Scores all N x N (y_n, C(x_m)) pairs; the first layer is split as in ConcatCritic."""

    def __init__(self, conv_dim, global_dim, hidden=512):
        super().__init__()
        self.w_conv = nn.Linear(conv_dim, hidden)
        self.w_global = nn.Linear(global_dim, hidden, bias=False)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, global_feat, conv_map, gather=None):
        if gather is not None:
            global_feat, conv_map = gather(global_feat), gather(conv_map)
        h = self.w_global(global_feat)[:, None, :] + self.w_conv(conv_map.flatten(1))[None, :, :]
        return self.rest(h).squeeze(-1)  # (N, N): positives on the diagonal


class GlobalDotCritic(DotCritic):
    """DIM(G) with the encode-and-dot-product critic: the flattened last conv map is the
    local side of a DotCritic with a single 1x1 location. Scores all N x N (y_n, C(x_m))."""

    def __init__(self, conv_dim, global_dim, embed_dim=2048, scale=1.0):
        super().__init__(global_dim, conv_dim, embed_dim, scale)

    def forward(self, global_feat, conv_map, gather=None):
        flat = conv_map.flatten(1)[:, :, None, None]
        return super().forward(global_feat, flat, gather=gather).squeeze(-1)  # (N, N)


# ----------------------------------------------------------------------------------------
# Multi-GPU (torchrun): DDP, sharded data, negatives gathered across ranks, rank 0 writes
# ----------------------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def init_distributed(device_name="auto"):
    """(device, rank, world_size). Under `torchrun --nproc_per_node=K` this joins the process
    group (NCCL on CUDA, gloo on CPU); a plain `python script.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return get_device(device_name), 0, 1
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device, dist.get_rank(), dist.get_world_size()


def is_main_process():
    d = _dist()
    return d is None or d.get_rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and keeps this rank's slice
    (an all_reduce, which every backend supports, on contiguous tensors)."""

    @staticmethod
    def forward(ctx, t):
        dist = _dist()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _dist().all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_batch(t):
    """`t` from every rank concatenated along dim 0 in rank order, with the gradient flowing
    back to each rank's own part; the identity in a single process. Every rank must pass the
    same batch size."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return t
    return _GatherWithGrad.apply(t.contiguous())


def finish_distributed():
    """Every rank, after its last collective: wait for the others, then leave the process
    group (left to interpreter exit, gloo's threads have aborted a rank at teardown)."""
    d = _dist()
    if d is not None:
        d.barrier()
        d.destroy_process_group()


def convert_sync_bn(modules, enabled, world, device):
    """--sync-bn under torchrun: every BatchNorm of `modules` becomes a SyncBatchNorm in place
    (statistics of the global batch), holding the same parameters and buffers, so optimisers
    built before keep working and checkpoints keep their keys. A no-op in one process."""
    if not enabled or world == 1:
        return
    if device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (SyncBatchNorm synchronises over NCCL); "
                        "drop it or run with --device cuda")
    for m in modules:
        if m is not None:
            nn.SyncBatchNorm.convert_sync_batchnorm(m)


class _Function(nn.Module):
    def __init__(self, fn, modules, others):
        super().__init__()
        self.fn, self.nets, self.others = fn, nn.ModuleDict(modules), others

    def forward(self, *args, **kwargs):
        return self.fn({**self.nets, **self.others}, *args, **kwargs)


def ddp_function(fn, modules, device, others=None):
    """`fn(nets, *args)` with nets = `modules` and `others` (dicts of networks): fn itself in
    one process; under torchrun the forward of one DistributedDataParallel module holding
    `modules` (`others` are passed, not held: another module's, or frozen), so DDP sees one
    forward and one backward per step however often fn uses each network."""
    others = dict(others or {})
    if _dist() is None:
        return functools.partial(fn, {**modules, **others})
    return wrap_ddp(_Function(fn, modules, others), device)


def wrap_ddp(module, device):
    """DistributedDataParallel when running under torchrun, the module itself otherwise."""
    if _dist() is None or module is None:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------
# Runs: folders, metrics, checkpoints
# ----------------------------------------------------------------------------------------
CHECKPOINT_VERSION = 1


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def plain_args(args):
    return {k: _plain(v) for k, v in vars(args).items()}


class Run:
    """One run folder: args.json, metrics.jsonl, checkpoint.pt and pictures.

    Created only once the data and networks exist, so a bad flag or missing dataset leaves
    nothing behind; resuming reuses the checkpoint's folder.
    """

    def __init__(self, script, args, resume_dir=None, elapsed=0.0):
        self.script, self.main = script, is_main_process()
        self.t0 = time.time() - elapsed  # a resumed run's clock goes on from its checkpoint's
        self.tensorboard = None
        if not self.main:  # other ranks write nothing; their path() is never used for writing
            self.dir, self.metrics_path = resume_dir or args.out_dir, None
            return
        writer = tensorboard_writer() if getattr(args, "tensorboard", False) else None
        if resume_dir:
            self.dir = resume_dir
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            base = os.path.join(args.out_dir, f"{script}-{args.dataset}-{stamp}")
            check_out_dir(args.out_dir)
            os.makedirs(args.out_dir, exist_ok=True)
            self.dir, i = base, 1
            while True:  # claim the name by creating it: two runs started in one second race
                try:
                    os.mkdir(self.dir)
                    break
                except FileExistsError:
                    i += 1
                    self.dir = f"{base}-{i}"
            atexit.register(self.remove_if_unfinished)
        atomic_write_text(os.path.join(self.dir, "args.json"), json.dumps(plain_args(args), indent=2))
        print("values in force: " + "  ".join(f"--{k.replace('_', '-')} {v}"
                                              for k, v in sorted(plain_args(args).items())))
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        if writer is not None:  # TensorBoard's files beside metrics.jsonl, which stays the record
            self.tensorboard, self.pictures, self.step = writer(self.dir), {}, 0
            atexit.register(self.close_tensorboard)

    def path(self, name):
        return os.path.join(self.dir, name)

    def elapsed(self):
        """Seconds trained, a resumed run's included."""
        return time.time() - self.t0

    def plot(self, monitor_keys, baselines=None):
        """curves.png from metrics.jsonl (plot_curves); the main process only."""
        if self.main:
            plot_curves(self.metrics_path, self.path("curves.png"), monitor_keys, baselines)

    def checkpoint(self, **state):
        """checkpoint.pt of the run (save_checkpoint's arguments but path, script, elapsed)."""
        save_checkpoint(self.path("checkpoint.pt"), script=self.script, elapsed=self.elapsed(),
                        **state)

    def remove_if_unfinished(self):
        """At exit: a new run that failed before its first checkpoint leaves no folder."""
        if not os.path.exists(self.path("checkpoint.pt")):
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self, **metrics):
        if not self.main:
            return
        line = (json.dumps(_plain(metrics)) + "\n").encode()
        with open(self.metrics_path, "ab", buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            try:
                while line:
                    line = line[f.write(line):]
            except OSError:
                f.truncate(end)  # never half a line, a full disk's included
                raise
        if self.tensorboard is not None:
            self.step = metrics.get("step", self.step)
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tensorboard.add_scalar(k, v, self.step)
            self.add_new_pictures()

    def add_new_pictures(self):
        """Every PNG of the run folder written since the last look, as a TensorBoard image at
        the latest step: the scripts' grids reach TensorBoard without knowing about it."""
        from PIL import Image
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".png"):
                continue
            stat = os.stat(self.path(name))
            if self.pictures.get(name) != (stat.st_mtime_ns, stat.st_size):
                self.pictures[name] = (stat.st_mtime_ns, stat.st_size)
                with Image.open(self.path(name)) as im:
                    self.tensorboard.add_image(name[:-4], np.asarray(im.convert("RGB")), self.step,
                                               dataformats="HWC")
        self.tensorboard.flush()

    def close_tensorboard(self):
        """At exit: the pictures written after the last log line, then close the files."""
        if os.path.isdir(self.dir):
            self.add_new_pictures()
        self.tensorboard.close()


def tensorboard_writer():
    """torch's SummaryWriter class, or a UserError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard, "
                        "or run without --tensorboard") from None
    return SummaryWriter


def check_out_dir(path, flag="--out-dir"):
    """`path` must be, or be creatable in, a writable folder: checked before the data loads,
    so a typo costs no loading time and leaves no traceback."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; pass a folder you can write to")


def _temp_beside(path):
    """A new temporary file beside `path`, `.<name>.<random>.tmp` (resuming removes those a
    killed writer left), with the mode open() would give it: mkstemp's 0600 ignores the umask."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def atomic_write_text(path, text):
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, *, script, encoder, encoder_cfg, args, data, epoch, step,
                    modules=None, optimizers=None, extra=None, rngs=None, elapsed=0.0):
    """Write a checkpoint that loads with weights_only=True (plain types only), atomically.

    `encoder` must be the plain module (not the torch.compile or DDP wrapper), so keys carry
    no `_orig_mod.`/`module.` prefixes. Under torchrun only rank 0 writes.
    """
    if not is_main_process():
        return
    state = {
        "version": CHECKPOINT_VERSION,
        "script": script,
        "encoder": encoder.state_dict(),
        "encoder_cfg": dict(encoder_cfg),
        "dataset": data.name,
        "image_shape": list(data.image_shape),
        "n_classes": int(data.n_classes),
        "args": plain_args(args),
        "epoch": int(epoch),
        "step": int(step),
        "modules": {k: m.state_dict() for k, m in (modules or {}).items()},
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "extra": _plain(extra or {}),
        "rng": rng_state(rngs),  # so that --resume continues the same random draws
        "time": float(elapsed),
    }
    nonfinite = [f"{part}.{k}" for part, sd in [("encoder", state["encoder"]), *state["modules"].items()]
                 for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:  # the folder keeps the last finite checkpoint, if any
        raise UserError(f"{len(nonfinite)} weight tensors ({nonfinite[0]}, ...) hold nan or inf "
                        f"after step {step}; nothing was saved: lower --lr")
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)  # to a file object: a full disk is an OSError (ENOSPC)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint; any problem is a one-line UserError."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass the checkpoint.pt inside it")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass the checkpoint.pt of a run folder")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                        "it may be truncated or from another program") from None
    missing = [k for k in ("encoder", "encoder_cfg", "script", "args", "epoch", "step")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of these scripts (missing {', '.join(missing)})")
    return ckpt


def encoder_from_checkpoint(ckpt, encoders=ENCODERS):
    """Rebuild the encoder from the checkpoint alone (its architecture one of `encoders`);
    every key must match exactly, and every weight be finite."""
    encoder = build_encoder(ckpt["encoder_cfg"], encoders)
    try:
        result = encoder.load_state_dict(ckpt["encoder"], strict=False)
    except RuntimeError as e:  # a size mismatch
        raise UserError(f"checkpoint encoder does not match its config {ckpt['encoder_cfg']} "
                        f"({str(e).splitlines()[-1].strip()[:160]})") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"checkpoint encoder does not match its config: missing "
                        f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    nonfinite = [k for k, v in encoder.state_dict().items()
                 if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise UserError(f"the checkpoint's encoder holds nan or inf ({nonfinite[0]}, ...); "
                        "there is nothing to evaluate")
    return encoder


def resume_state(args, script, modules, optimizers, rngs=None):
    """If --resume is set: load every module and optimizer and the random streams, return
    (run_dir, epoch, step, seconds trained so far)."""
    if not args.resume:
        return None, 0, 0, 0.0
    ckpt = load_checkpoint(args.resume)
    if ckpt["script"] != script:
        raise UserError(f"{args.resume} was written by {ckpt['script']}, not {script}")
    try:
        for name, module in modules.items():
            module.load_state_dict(ckpt["encoder"] if name == "encoder" else ckpt["modules"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{args.resume} does not match these flags ({str(e).splitlines()[0][:120]}); "
                        "resume with the flags of the original run") from None
    run_dir = os.path.dirname(os.path.abspath(args.resume))
    newest = os.path.join(run_dir, "checkpoint.pt")
    if os.path.isfile(newest) and not os.path.samefile(newest, args.resume):
        newest_step = load_checkpoint(newest)["step"]
        if newest_step > ckpt["step"]:  # its run went on: continuing it here would overwrite that
            raise UserError(f"{args.resume} is at step {ckpt['step']} but {newest} beside it is at "
                            f"step {newest_step}; resume that one, or move {args.resume} into a "
                            "folder of its own to branch off from it")
    if "rng" in ckpt and _dist() is None:  # under torchrun each rank keeps its own streams
        set_rng_state(ckpt["rng"], rngs)
    if is_main_process():
        for name in os.listdir(run_dir):  # what a killed writer left (older versions: tmp*.tmp)
            if name.endswith(".tmp") and name.startswith((".", "tmp")):
                os.remove(os.path.join(run_dir, name))
        cut_metrics(os.path.join(run_dir, "metrics.jsonl"), ckpt["step"])
    return run_dir, ckpt["epoch"], ckpt["step"], ckpt.get("time", 0.0)


def cut_metrics(path, step):
    """metrics.jsonl back to a checkpoint at `step`: the lines logged after it (a run stopped
    between its log line and its checkpoint), a half-written line, and the end-of-run line at
    `step` (a resumed run that finishes writes it again) go, so a resumed run repeats none."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            m = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            m = None
        if isinstance(m, dict) and (m.get("step", -1) < step or m.get("step") == step and "epoch" in m):
            keep.append(line)
    if keep != lines:
        atomic_write_text(path, "".join(keep))


# Flags a resumed run may change: how long, where and how loudly it runs, how often it is
# watched. Everything else would make the continuation another run.
RESUME_SAFE = ("epochs", "max_steps", "no_progress", "device", "eval_every", "data_root", "resume",
               "tensorboard", "knn_rule")


def merge_resume_args(parser, argv, args, safe=RESUME_SAFE, renamed=None):
    """With --resume: the checkpoint's args, with the `safe` flags given on the command line
    on top; any other flag given with another value is a UserError naming it. `renamed`
    maps a dest an older checkpoint saved to the dest that holds it now."""
    check_out_dir(os.path.dirname(os.path.abspath(args.resume)) if args.resume else args.out_dir,
                  "--resume" if args.resume else "--out-dir")
    if not args.resume:
        return args
    saved = {(renamed or {}).get(k, k): v for k, v in load_checkpoint(args.resume)["args"].items()}
    # argparse fills in a default only where the namespace lacks the dest, so parsed onto the
    # saved args, a dest differs from its saved value exactly where a flag gave another one
    merged = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
    for key, value in saved.items():
        given = getattr(merged, key)
        if key not in safe and _plain(given) != value:
            raise UserError(f"--{key.replace('_', '-')} {given} differs from the resumed run's "
                            f"{value}; a resumed run may change only "
                            f"{', '.join('--' + k.replace('_', '-') for k in safe if k != 'resume')}")
    return merged


def rng_state(rngs=None):
    """Every random stream a run draws from, as tensors and lists (weights_only loads them)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "generators": {k: g.get_state() for k, g in (rngs or {}).items()}}


def set_rng_state(state, rngs=None):
    """Put back what rng_state saved, so a resumed run draws what the uninterrupted one would."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for k, g in (rngs or {}).items():
        g.set_state(state["generators"][k])


def check_finite(loss, step, what, hint):
    """A UserError naming the step when `loss` is not finite. `hint`: what blew up and what to
    try, in the script's own flags."""
    if not torch.isfinite(loss).all():
        raise UserError(f"{what} became {loss.item()} at step {step}; {hint}")


# ----------------------------------------------------------------------------------------
# Features, metrics, pictures
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder, data, split, taps=("y",), batch_size=256, device="cpu", amp=False):
    """Frozen features of a split: {tap: float32 numpy (N, D)} and labels (numpy)."""
    was_training = encoder.training
    encoder.eval()
    feats = {t: [] for t in taps}
    labels = []
    for x, y in data.batches(split, batch_size):
        with autocast(torch.device(device), amp):
            out = encoder(x.to(device))
        for t in taps:
            feats[t].append(out[t].flatten(1).float().cpu())
        labels.append(y.cpu())
    encoder.train(was_training)
    feats = {t: torch.cat(v).numpy() for t, v in feats.items()}
    for t, f in feats.items():
        check_finite_features(f, t)
    return feats, torch.cat(labels).numpy()


def check_finite_features(features, tap):
    """A UserError before a probe meets nan or inf (scikit-learn's own error is a traceback)."""
    finite = torch.isfinite(features).all().item() if torch.is_tensor(features) else np.isfinite(features).all()
    if not finite:
        raise UserError(f"the encoder's {tap} features hold nan or inf (its weights overflow); "
                        "a run that gives them needs a lower --lr")


def cluster_accuracy(pred, labels):
    """Accuracy of cluster ids `pred` under the best one-to-one matching to `labels`
    (Hungarian algorithm). Clusters left unmatched count as errors."""
    from scipy.optimize import linear_sum_assignment
    pred, labels = np.asarray(pred), np.asarray(labels)
    kp, kl = pred.max() + 1, labels.max() + 1
    counts = np.zeros((kp, kl), dtype=np.int64)
    np.add.at(counts, (pred, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return counts[rows, cols].sum() / len(labels)


def linear_probe(train_x, train_y, test_x, test_y, max_iter=1000):
    """Test accuracy of a standardised multinomial logistic regression (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    keep = train_y >= 0
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    clf.fit(train_x[keep], train_y[keep])
    return float(clf.score(test_x, test_y))


def kmeans_accuracy(features, labels, n_classes, seed=0):
    """k-means (k = number of classes) on standardised features, Hungarian-matched accuracy."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler
    pred = KMeans(n_clusters=n_classes, n_init=10, random_state=seed).fit_predict(
        StandardScaler().fit_transform(features))
    return float(cluster_accuracy(pred, labels))


def probe_against_random_init(encoder, encoder_cfg, data, device, seed=0, tap="y"):
    """Linear-probe and k-means accuracy on `tap` for the trained encoder and for an untrained
    one of the same architecture (the baseline every paper compares against)."""
    torch.manual_seed(seed)
    random_encoder = build_encoder(encoder_cfg).to(device)
    result = {}
    for name, enc in (("", encoder), ("_random_init", random_encoder)):
        tr, ytr = extract_features(enc, data, "train", (tap,), device=device)
        te, yte = extract_features(enc, data, "test", (tap,), device=device)
        result[f"linear_{tap}{name}"] = linear_probe(tr[tap], ytr, te[tap], yte)
        result[f"kmeans_{tap}{name}"] = kmeans_accuracy(te[tap], yte, data.n_classes, seed)
    return result


def print_table(rows, title=None):
    """rows: list of dicts with the same keys; printed as an aligned text table."""
    if title:
        print(title)
    if not rows:
        return
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    widths = [max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(fmt(r[k]).ljust(w) for k, w in zip(keys, widths)))


def save_image_grid(images, path, nrow):
    """Save a (B, C, H, W) batch in [-1, 1] as one PNG grid."""
    from torchvision.utils import save_image
    save_image(images.detach().float().cpu(), path, nrow=nrow, normalize=True, value_range=(-1, 1),
               pad_value=1.0)


def knn_accuracy(train_x, train_y, test_x, test_y, k):
    """k-NN test accuracy by scikit-learn's uniform vote of the k nearest (cosine distance,
    brute force): the rule of eval_probe's and the monitor's numbers before weighted_knn."""
    from sklearn.neighbors import KNeighborsClassifier
    keep = train_y >= 0
    clf = KNeighborsClassifier(n_neighbors=min(k, int(keep.sum())), metric="cosine", algorithm="brute")
    return float(clf.fit(train_x[keep], train_y[keep]).score(test_x, test_y))


def spread_subset(n, cap):
    """At most `cap` of range(n), evenly spaced: a fixed subset that draws nothing random."""
    return torch.arange(n) if n <= cap else torch.linspace(0, n - 1, cap).round().long()


KNN_RULES = ("weighted", "uniform")


@torch.no_grad()
def weighted_knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07,
                          device="cpu", batch_size=1024):
    """k-NN test accuracy by InstDisc's weighted vote (Wu et al., CVPR 2018, arXiv:1805.01978),
    the k-NN that solo-learn (k=20, T=0.07) and lightly (k=200, T=0.1) report: each of the k
    training features most cosine-similar to a test feature votes for its label with weight
    exp(similarity / T); the label with the largest sum wins (ties: the smaller label).
    Batched matmuls on `device`: 60,000 x 10,000 takes seconds on a GPU. Features (N, D) and
    labels as numpy arrays or tensors; training labels -1 (unlabelled) are skipped."""
    train_y, test_y = torch.as_tensor(train_y).to(device), torch.as_tensor(test_y).to(device)
    keep = train_y >= 0
    bank = F.normalize(torch.as_tensor(train_x).to(device, torch.float32)[keep], dim=1)
    bank_y = train_y[keep]
    test_x = F.normalize(torch.as_tensor(test_x).to(device, torch.float32), dim=1)
    n_classes = int(max(bank_y.max(), test_y.max())) + 1
    correct = torch.zeros((), dtype=torch.long, device=device)
    for q, y in zip(test_x.split(batch_size), test_y.split(batch_size)):
        sim, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)  # (B, k) nearest first
        votes = torch.zeros(len(q), n_classes, device=device)
        votes.scatter_add_(1, bank_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == y).sum()
    return correct.item() / len(test_y)


@torch.no_grad()
def knn_monitor(encoder, data, device, tap="y", k=20, batch_size=500, rule="weighted",
                temperature=0.07, max_train=5000, max_test=1000, amp=False):
    """k-NN accuracy of the test split on `tap`, neighbours from the train split: the
    monitor, by `rule`: "weighted" (weighted_knn_accuracy, k=20, T=0.07 as in solo-learn) or
    "uniform" (knn_accuracy, scikit-learn's vote). Large splits are read through fixed, evenly
    spaced subsets (max_train neighbours, max_test queries), so that on 60,000 images it
    costs seconds, not minutes: with fewer neighbours it reads a few points under the final
    k-NN probe, which reads every image. The encoder runs in eval() (BatchNorm statistics
    stay put) and both splits are read without augmentation, so nothing random is drawn and
    training continues exactly as it would have without it."""
    was_training = encoder.training
    encoder.eval()
    feats = {}
    for split, cap in (("train", max_train), ("test", max_test)):
        x, y = data.split(split)
        keep = spread_subset(len(x), cap).to(x.device)
        x, y = x[keep], y[keep]
        with autocast(device, amp):
            out = [encoder(data.preprocess(x[i:i + batch_size].to(device), train=False))[tap]
                   .flatten(1).float() for i in range(0, len(x), batch_size)]
        feats[split] = (torch.cat(out), y.to(device))
        check_finite_features(feats[split][0], tap)
    encoder.train(was_training)
    if rule == "uniform":
        return knn_accuracy(*(t.cpu().numpy() for t in (*feats["train"], *feats["test"])), k)
    return weighted_knn_accuracy(*feats["train"], *feats["test"], k, temperature, device)


# ----------------------------------------------------------------------------------------
# The training loop's bookkeeping, the same in every script
# ----------------------------------------------------------------------------------------
def start(args):
    """Join torchrun's processes (if any), set the matmul precision, resolve a recipe's --amp
    default (None: bf16 where the device computes it natively) and seed everything:
    (device, rank, world size)."""
    device, rank, world = init_distributed(args.device)
    set_precision(device, args.deterministic)
    if getattr(args, "amp", False) is None:
        args.amp = native_bf16(device)
    seed_everything(args.seed)
    return device, rank, world


def epoch_batches(data, args, index, desc, rank=0, world=1, with_index=False):
    """The RNG of epoch `index` (seeded by it: the same order after --resume) and a progress
    bar over the epoch's shuffled batches of this process (--batch-size is the global batch);
    the RNG also draws the step's augmentations. with_index: batches carry their indices."""
    rng = torch.Generator().manual_seed(args.seed * 100003 + index)
    per_rank = args.batch_size // world
    batches = data.batches("train", per_rank, shuffle=True, rng=rng, drop_last=True, rank=rank,
                           world_size=world, **({"with_index": True} if with_index else {}))
    return rng, progress(batches, total=data.n_batches("train", per_rank, drop_last=True,
                                                      world_size=world),
                         desc=desc, disable=args.no_progress or rank > 0)


def add_step(sums, logs):
    """Add one step's logged scalars (tensors) to running sums; sums["n"] counts the steps."""
    sums["n"] = sums.get("n", 0) + 1
    for k, v in logs.items():
        sums[k] = sums.get(k, 0.0) + v.item()


def means(sums):
    """Each logged scalar's mean over the steps add_step has counted."""
    return {k: v / sums["n"] for k, v in sums.items() if k != "n"}


def set_lr(optimizers, lr):
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = lr


def eval_due(every, epoch, last):
    """Whether the monitor runs after (0-based) `epoch`: every `every` epochs and after the
    last; never with every = 0."""
    return bool(every) and ((epoch + 1) % every == 0 or last)


def plot_curves(metrics_path, png_path, monitor_keys, baselines=None):
    """curves.png: the logged loss terms, MI estimates and monitor against steps, and the
    monitor against minutes of training (time to accuracy); the untrained encoder's monitor
    dashed. Written atomically (a viewer never sees half a file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        rows = [r for r in map(json.loads, f) if "epoch" in r]
    skip = {"epoch", "step", "time", "stage"}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k not in skip and all(isinstance(r.get(k, 0.0), (int, float)) for r in rows)]
    panels = {"monitor (test split)": [k for k in keys if k in monitor_keys],
              "MI estimates": [k for k in keys if k not in monitor_keys and "mi" in k.split("_")],
              "loss terms": [k for k in keys if k not in monitor_keys and "mi" not in k.split("_")]}
    if panels["monitor (test split)"] and all("time" in r for r in rows):
        panels["monitor against time"] = panels["monitor (test split)"]
    panels = {t: ks for t, ks in panels.items() if ks}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, ks) in zip(axes[0], panels.items()):
        x_key, x_scale = ("time", 1 / 60) if title == "monitor against time" else ("step", 1)
        for k in ks:
            pts = [(r[x_key] * x_scale, r[k]) for r in rows if k in r]
            line, = ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k)
            if (baselines or {}).get(k) is not None:
                ax.axhline(baselines[k], ls="--", color=line.get_color(), label=f"{k}, untrained")
        ax.set(title=title, xlabel="minutes" if x_key == "time" else "step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = _temp_beside(png_path)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80, format="png")
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
