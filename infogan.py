"""InfoGAN: a GAN whose generator inputs include codes that a network Q must recover.

Chen, Duan, Houthooft, Schulman, Sutskever, Abbeel. "InfoGAN: Interpretable Representation
Learning by Information Maximizing Generative Adversarial Nets", NeurIPS 2016,
arXiv:1606.03657.

    min_{G,Q} max_D  V_GAN(D, G) - lambda * L_I(G, Q),   L_I = E_{c, x=G(z,c)}[log Q(c|x)] + H(c)

L_I is the paper's variational lower bound on I(c; G(z, c)). Categorical codes use Q's
softmax (their term is minus a cross-entropy), continuous codes a factored Gaussian Q(c|x).
This script minimises the *information loss* lambda_cat * CE + lambda_cont * Gaussian NLL =
-(L_I - H(c)) summed over codes. D and Q share a trunk (InfoGANEncoder, saved as the
run's encoder: `python eval_probe.py CKPT` probes its conv, fc and y = Q's hidden layer). At
the end the test images are clustered by argmax Q(c_cat | x), matched one-to-one to the
labels (paper: about 95% on MNIST), and a pixel classifier fitted to real images labels G's
samples of each category (generated_category_purity: did G split or merge the classes?).

    python infogan.py --dataset fashion-mnist     # the recipe: 7,440 steps or more (whole epochs)
    python infogan.py --dataset fashion-mnist --paper   # the paper's configuration, 50 epochs

Defaults: the recipe (RECIPE; why, measured: docs/infogan.md); `--paper`: the paper's (PAPER);
a flag given wins over both.

Where this script fills gaps in or departs from the paper (the measurements behind each
choice, and the variants tried and not kept, are in docs/infogan.md):
- Images are 32x32 (MNIST is padded from 28), so G's first map is 8x8 (the paper's 7x7), and
  G ends in tanh, since the data live in [-1, 1]. Leaky ReLU slope 0.1.
- D's loss is binary cross-entropy, G's the non-saturating loss. D (trunk and head) and Q are
  updated together on a detached fake batch with V_D + lambda * info loss (lr 2e-4 for D,
  1e-3 for Q); then G with its GAN loss + lambda * info loss (1e-3).
- The trunk reads each real and fake batch concatenated into one, in D's step and in G's, so
  BatchNorm normalises both with the same statistics; with separate batches the BatchNorm
  before D's head removes most of what tells a real batch from a fake one.
- `--instance-noise` (off in the recipe and the paper): noise (Sonderby et al. 2016,
  arXiv:1610.04490) on every image the trunk reads, annealed to 0 over the run.
- Recipe: narrower networks, --width 32 --fc-dim 256 (the paper's 64 and 1024), so that more
  steps fit in CPU minutes.
- Clustering accuracy is measured after resetting the trunk's BatchNorm running statistics to
  those of the real training images (training leaves averages of real and fake batches);
  cluster_acc_mixed_bn logs it with the training statistics.
- `--warp` (off by default) passes every image D and Q read, real and generated, through its
  own random affine warp, as in differentiable augmentation for GANs (Zhao et al. 2020,
  arXiv:2006.10738): a category G could carry in pose alone (two slants of 1) no longer
  survives to Q, and D cannot learn the small training set by heart.
- Recipe: `--cluster-mi 4` adds IIC's clustering objective (Ji et al. 2019, arXiv:1807.06653)
  to D and Q's step: Q's categories of a real image and of its warped copy must agree and use
  every category. Q otherwise learns c_cat from G's drawings alone, whose categories merge and
  split real MNIST's digits. The copy's contrast changes too (`--cluster-jitter 0.5`), or the
  categories follow how light or dark a garment is.
- `--cluster-neighbours K` (0 in the recipe): that copy is a warp of the image itself or of
  one of its K nearest training images by pixels, as SCAN (arXiv:2005.12320) pairs neighbours.
- Recipe: `--ema 0.999`: Q and its trunk are evaluated and saved as a moving average of the
  trained weights (arXiv:1806.04498 averages G); the trained Q's categories swing by epoch.
- Q's Gaussian learns its log-variance in [-8, 4] (`--learn-cont-var 0`: unit, as the authors').
- Weights are initialised as in DCGAN, N(0, 0.02); PyTorch's default saturates G's tanh.
  Recipe: Q's categorical logits at 0.05 (`--cat-init-std`): at 0.02 Q starts uniform, the
  clustering term's saddle, and takes its categories of real images from G's early drawings.
- Traversal grid (Fig. 2), every 10 epochs: one z, a row per c_cat, each c_cont from -2 to 2.
- Not given by the paper: batch 32; the length: 50 epochs under --paper, the recipe's the
  fewest whole epochs that make 7,440 steps (120 of 2,000 images, 4 of 60,000).
- Under torchrun --batch-size is the global batch; each process draws its own noise and
  codes and normalises its own real + fake batch (no BatchNorm synchronisation).
"""
import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError


NAN_HINT = "lower --lr (D) or --lr-g (G and Q), or run without --amp"
# The defaults are the recipe measured on real images (docs/infogan.md); `--paper` restores
# the paper's configuration (arXiv:1606.03657, Sec. 6 and App. C) instead. A flag given on
# the command line wins over both. Lengths: the fewest whole epochs that make RECIPE_STEPS
# steps (120 of 2,000 images, 4 of 60,000); the paper gives none, --paper runs PAPER_EPOCHS.
PAPER = {"width": 64, "fc_dim": 1024, "lambda_cat": 1.0, "instance_noise": 0.0,
         "cluster_mi": 0.0, "cluster_jitter": 0.0, "cluster_neighbours": 0,
         "ema": 0.0, "cat_init_std": 0.02}
RECIPE = {"width": 32, "fc_dim": 256, "lambda_cat": 1.0, "instance_noise": 0.0,
          "cluster_mi": 4.0, "cluster_jitter": 0.5, "cluster_neighbours": 0,
          "ema": 0.999, "cat_init_std": 0.05}
RECIPE_STEPS, PAPER_EPOCHS = 7440, 50
DCGAN_STD = 0.02  # every weight's init (dcgan_init); Q's logits' under --paper


def parse_args(argv=None):
    p = common.ArgumentParser(description="InfoGAN with categorical and continuous codes")
    common.add_common_args(p, epochs=None, batch_size=32, lr=2e-4)
    p.add_argument("--paper", action="store_true",
                   help=f"the paper's configuration instead of the recipe (see PAPER, RECIPE; "
                        f"{PAPER_EPOCHS} epochs where the recipe runs {RECIPE_STEPS} steps)")
    p.add_argument("--lr-g", type=common.positive_float, default=1e-3, help="Adam learning rate of G and Q "
                   "(--lr is D's)")
    p.add_argument("--adam-beta1", type=common.decay_rate, default=0.5, help="Adam beta1 for every network")
    p.add_argument("--noise-dim", type=common.nonneg_int, default=62, help="size of the incompressible noise z")
    p.add_argument("--n-cat", type=common.nonneg_int, default=1, help="number of categorical codes c_cat")
    p.add_argument("--cat-dim", type=common.positive_int, default=10, help="categories per categorical code (K)")
    p.add_argument("--n-cont", type=common.nonneg_int, default=2,
                   help="number of continuous codes c_cont ~ Uniform(-1, 1)")
    p.add_argument("--lambda-cat", type=common.nonneg_float, default=None,
                   help=f"weight of the categorical codes' information term (lambda; paper "
                        f"{PAPER['lambda_cat']}, recipe {RECIPE['lambda_cat']})")
    p.add_argument("--lambda-cont", type=common.nonneg_float, default=0.1,
                   help="weight of the continuous codes' information term (lambda)")
    p.add_argument("--instance-noise", type=common.nonneg_float, default=None,
                   help="std of Gaussian noise added to the images D and Q read (real and fake), "
                        f"annealed linearly to 0 over the run (not in the paper: "
                        f"{PAPER['instance_noise']}; recipe {RECIPE['instance_noise']})")
    p.add_argument("--warp", action="store_true",
                   help="D and Q read every image, real and generated, through its own random "
                        "affine warp (rotated up to 25 degrees, scaled by up to 20%%, shifted "
                        "1.6 px; not in the paper), so c_cat must survive a change of pose")
    p.add_argument("--cluster-mi", type=common.nonneg_float, default=None,
                   help=f"weight of a clustering term on real images in D and Q's step (not in "
                        f"the paper; IIC, Ji et al. 2019): Q(c_cat | x) and Q(c_cat | t(x)), t a "
                        f"random affine warp, must agree and use every category (paper "
                        f"{PAPER['cluster_mi']}: no term; recipe {RECIPE['cluster_mi']})")
    p.add_argument("--cluster-balance", type=common.nonneg_float, default=2.0,
                   help="IIC's lambda in that term: weight of the categories' marginal entropies "
                        "against their joint entropy over the two views (1: the mutual information)")
    p.add_argument("--cluster-neighbours", type=common.nonneg_int, default=None,
                   help=f"that term's t(x) warps x or one of its K nearest training images by "
                        f"pixels (cosine; one of the K + 1 drawn anew each step), as SCAN "
                        f"(arXiv:2005.12320) pairs neighbours; 0: warps x itself, as IIC (recipe "
                        f"{RECIPE['cluster_neighbours']}, --paper {PAPER['cluster_neighbours']})")
    p.add_argument("--cluster-jitter", type=common.nonneg_float, default=None,
                   help=f"that term's warp also scales each copy's contrast by 1 +- this (the "
                        f"background stays black), so that the categories cannot follow how "
                        f"light or dark an image is (not in the paper; recipe "
                        f"{RECIPE['cluster_jitter']})")
    p.add_argument("--cat-init-std", type=common.positive_float, default=None,
                   help=f"std of the normal init of Q's categorical logits layer (DCGAN's {DCGAN_STD} "
                        f"elsewhere). At {DCGAN_STD} Q starts uniform, where the clustering term has a "
                        f"saddle, so Q's first categories of real images come from G's early "
                        f"drawings; larger starts the term on real images at step 0 (paper "
                        f"{PAPER['cat_init_std']}, recipe {RECIPE['cat_init_std']})")
    p.add_argument("--ema", type=common.decay_rate, default=None,
                   help=f"the encoder and Q that are evaluated and saved for eval_probe.py are "
                        f"an exponential moving average of the trained weights with this decay "
                        f"per step; training is unchanged (not in the paper: "
                        f"{PAPER['ema']}, the trained weights; recipe {RECIPE['ema']})")
    p.add_argument("--learn-cont-var", type=int, default=1, choices=[0, 1],
                   help="1: Q's Gaussian for the continuous codes learns its variance; "
                        "0: unit variance")
    p.add_argument("--width", type=common.positive_int, default=None,
                   help=f"channels of D's first conv and G's last upconv (w; 2w between; paper "
                        f"{PAPER['width']}, recipe {RECIPE['width']}: faster on a CPU)")
    p.add_argument("--fc-dim", type=common.positive_int, default=None,
                   help=f"width of D's and G's fc layer (paper {PAPER['fc_dim']}, recipe "
                        f"{RECIPE['fc_dim']})")
    p.add_argument("--q-dim", type=common.positive_int, default=128,
                   help="width of Q's hidden layer (the encoder's y)")
    p.add_argument("--traversal-steps", type=common.positive_int, default=9,
                   help="columns per continuous code in the traversal grid (-2 .. 2)")
    p.add_argument("--image-every", type=common.positive_int, default=10,
                   help="write the PNG grids every this many epochs (and after the last)")
    args = common.merge_resume_args(p, argv, p.parse_args(argv), renamed={"beta1": "adam_beta1"})
    for name, value in (PAPER if args.paper else RECIPE).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.epochs is None and args.paper:
        args.epochs = PAPER_EPOCHS
    if args.n_cat and args.cat_dim < 2:
        p.error("--cat-dim must be at least 2")
    if args.n_cat + args.n_cont == 0:
        p.error("--n-cat and --n-cont are both 0: there is no code for Q to recover")
    if args.n_cat == 0 and args.cluster_mi:
        p.error(f"--cluster-mi {args.cluster_mi} clusters the categorical code: with --n-cat 0 "
                "pass --cluster-mi 0")
    return args


# ----------------------------------------------------------------------------------------
# The method: codes, G, D and Q heads, information loss
# ----------------------------------------------------------------------------------------
class Codes:
    """Layout of G's input [z, one-hot c_cat_1 .. c_cat_n, c_cont_1 .. c_cont_m]."""

    def __init__(self, noise_dim, n_cat, cat_dim, n_cont):
        self.noise_dim, self.n_cat, self.cat_dim, self.n_cont = noise_dim, n_cat, cat_dim, n_cont
        self.input_dim = noise_dim + n_cat * cat_dim + n_cont

    def sample(self, n, device, rng=None):
        """z ~ N(0, I), c_cat ~ Uniform{0..K-1} (N, n_cat) int, c_cont ~ U(-1, 1) (N, n_cont)."""
        z = torch.randn(n, self.noise_dim, generator=rng).to(device)
        cat = torch.randint(0, self.cat_dim, (n, self.n_cat), generator=rng).to(device)
        cont = (torch.rand(n, self.n_cont, generator=rng) * 2 - 1).to(device)
        return z, cat, cont

    def gen_input(self, z, cat, cont):
        onehot = F.one_hot(cat, self.cat_dim).float().flatten(1)  # (N, n_cat * K)
        return torch.cat([z, onehot, cont], 1)


class InfoGANEncoder(nn.Module):
    """InfoGAN's shared D/Q trunk plus Q's hidden layer (arXiv:1606.03657, App. C, MNIST architecture
    scaled to `in_channels` and `image_size`): conv 4x4/2 w (leaky ReLU) -> conv 4x4/2 2w
    (BN, leaky ReLU) -> fc fc_dim (BN, leaky ReLU); Q's hidden layer fc y_dim (BN, leaky ReLU).
    The paper's sizes are w = 64, fc_dim = 1024, y_dim = 128.

    Taps: c1 (H/2), conv (H/4, last conv), fc (the trunk's vector, which D's head reads),
    y (Q's hidden layer, from which Q predicts the codes; the representation probed by
    eval_probe.py). D's logit and Q's code outputs are the heads below.
    """
    maps = ("c1", "conv")
    default_local = "c1"

    def __init__(self, in_channels=1, image_size=32, y_dim=128, width=64, fc_dim=1024, slope=0.1):
        super().__init__()
        w = width
        self.c1 = nn.Sequential(nn.Conv2d(in_channels, w, 4, 2, 1), nn.LeakyReLU(slope, inplace=True))
        self.c2 = nn.Sequential(nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w),
                                nn.LeakyReLU(slope, inplace=True))
        s = image_size // 4
        self.fc = nn.Sequential(nn.Linear(2 * w * s * s, fc_dim, bias=False), nn.BatchNorm1d(fc_dim),
                                nn.LeakyReLU(slope, inplace=True))
        self.q_hidden = nn.Sequential(nn.Linear(fc_dim, y_dim, bias=False), nn.BatchNorm1d(y_dim),
                                      nn.LeakyReLU(slope, inplace=True))

    def forward(self, x):
        c1 = self.c1(x)
        conv = self.c2(c1)
        fc = self.fc(conv.flatten(1))
        return {"c1": c1, "conv": conv, "fc": fc, "y": self.q_hidden(fc)}


ENCODERS = {"infogan": InfoGANEncoder}  # for eval_probe.py


class Generator(nn.Module):
    """fc fc_dim (BN, ReLU) -> fc 2w*(H/4)^2 (BN, ReLU) -> upconv 4x4/2 w (BN, ReLU) ->
    upconv 4x4/2 C, tanh. The paper's MNIST G (w = 64, fc_dim = 1024) with 7x7 -> 8x8 for
    32x32 images."""

    def __init__(self, input_dim, out_channels=1, image_size=32, width=64, fc_dim=1024):
        super().__init__()
        self.s, self.c = image_size // 4, 2 * width
        n = self.c * self.s * self.s
        self.fc = nn.Sequential(
            nn.Linear(input_dim, fc_dim, bias=False), nn.BatchNorm1d(fc_dim), nn.ReLU(inplace=True),
            nn.Linear(fc_dim, n, bias=False), nn.BatchNorm1d(n), nn.ReLU(inplace=True))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(self.c, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.ConvTranspose2d(width, out_channels, 4, 2, 1), nn.Tanh())

    def forward(self, g_in):
        return self.up(self.fc(g_in).view(-1, self.c, self.s, self.s))


class DHead(nn.Module):
    """D's real/fake logit from the trunk's fc tap."""

    def __init__(self, fc_dim=1024):
        super().__init__()
        self.out = nn.Linear(fc_dim, 1)

    def forward(self, fc):
        return self.out(fc).squeeze(-1)


class QHead(nn.Module):
    """Q's code outputs from its hidden layer (the encoder's y): logits for every
    categorical code, and a mean for every continuous code with a learned log-variance
    (`learn_var`) or a fixed one of 0 (unit variance)."""

    def __init__(self, codes, y_dim=128, learn_var=True):
        super().__init__()
        self.codes, self.learn_var = codes, learn_var
        self.out = nn.Linear(y_dim, codes.n_cat * codes.cat_dim + (1 + learn_var) * codes.n_cont)

    def forward(self, y):
        c = self.codes
        h = self.out(y).float()
        logits = h[:, :c.n_cat * c.cat_dim].view(len(h), c.n_cat, c.cat_dim)  # (N, n_cat, K)
        if not self.learn_var:
            mu = h[:, c.n_cat * c.cat_dim:]  # (N, n_cont)
            return logits, mu, torch.zeros_like(mu)
        mu, logvar = h[:, c.n_cat * c.cat_dim:].chunk(2, dim=1)  # (N, n_cont) each
        return logits, mu, logvar.clamp(-8, 4)

    @torch.no_grad()
    def rescale_logits_init_(self, std):
        """--cat-init-std: the categorical logits' weights, drawn by dcgan_init, rescaled to std
        (no new draw, so every other random number of the run stays as it was)."""
        self.out.weight[:self.codes.n_cat * self.codes.cat_dim] *= std / DCGAN_STD


def info_loss(q_out, cat, cont, lambda_cat, lambda_cont):
    """lambda_cat * CE(c_cat) + lambda_cont * Gaussian NLL(c_cont), summed over codes and
    averaged over the batch: minus the information lower bound L_I up to the constant H(c).
    Returns (weighted loss, categorical CE, continuous NLL) with the parts unweighted."""
    logits, mu, logvar = q_out
    zero = logits.new_zeros(())
    ce = (F.cross_entropy(logits.flatten(0, 1), cat.flatten(), reduction="sum") / len(cat)
          if cat.shape[1] else zero)
    nll = ((0.5 * (logvar + np.log(2 * np.pi) + (cont - mu) ** 2 / logvar.exp())).sum(1).mean()
           if cont.shape[1] else zero)
    return lambda_cat * ce + lambda_cont * nll, ce, nll


def clustering_loss(logits, logits_warped, balance):
    """--cluster-mi's term: minus IIC's objective (common.cluster_information) between Q's
    categories of real images and of their warped copies, summed over the categorical codes;
    logits are (N, n_cat, K). Not in the paper."""
    return -sum(common.cluster_information(logits[:, i], logits_warped[:, i], balance)
                for i in range(logits.shape[1]))


def traversal_inputs(codes, z, steps, lo=-2.0, hi=2.0):
    """G inputs for the traversal grid, row-major: (rows * cols, input_dim) and (rows, cols).

    Row r sets the first categorical code to r (the others to 0); the columns sweep
    continuous code j over `steps` values in [lo, hi] for j = 0 .. n_cont-1 in turn (the
    other continuous codes 0). `z` is (1, noise_dim), shared by the whole grid; without
    continuous codes, `z` is (steps, noise_dim) and the columns show those noise vectors.
    """
    rows = codes.cat_dim if codes.n_cat else 1
    cols = codes.n_cont * steps if codes.n_cont else steps
    cat = torch.zeros(rows, cols, codes.n_cat, dtype=torch.long, device=z.device)
    if codes.n_cat:
        cat[:, :, 0] = torch.arange(rows, device=z.device)[:, None]
    cont = torch.zeros(rows, cols, codes.n_cont, device=z.device)
    sweep = torch.linspace(lo, hi, steps, device=z.device)
    for j in range(codes.n_cont):
        cont[:, j * steps:(j + 1) * steps, j] = sweep
    zz = z.expand(rows, cols, -1) if codes.n_cont else z[None].expand(rows, -1, -1)
    g_in = codes.gen_input(zz.reshape(rows * cols, -1), cat.view(rows * cols, -1),
                           cont.view(rows * cols, -1))
    return g_in, (rows, cols)


@torch.no_grad()
def write_grids(G, codes, fixed, run, epoch, steps):
    """The traversal grid and a 10x10 grid of random samples, both with fixed inputs."""
    was_training = G.training
    G.eval()
    g_in, (rows, cols) = traversal_inputs(codes, fixed["traversal_z"], steps)
    common.save_image_grid(G(g_in), run.path(f"traversal_epoch{epoch:03d}.png"), nrow=cols)
    common.save_image_grid(G(codes.gen_input(*fixed["samples"])),
                           run.path(f"samples_epoch{epoch:03d}.png"), nrow=10)
    G.train(was_training)


@torch.no_grad()
def cluster_accuracies(encoder, q_head, data, device, split="test"):
    """Clustering accuracy of argmax Q(c_cat | x) for every categorical code: each code's
    categories matched one-to-one to the labels (Hungarian), unmatched ones counted wrong."""
    was_training = encoder.training
    encoder.eval()
    preds, labels = [], []
    for x, y in data.batches(split, 256):
        logits, _, _ = q_head(encoder(x.to(device))["y"])
        preds.append(logits.argmax(-1).cpu())  # (B, n_cat)
        labels.append(y.cpu())
    encoder.train(was_training)
    preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    return [float(common.cluster_accuracy(preds[:, i], labels)) for i in range(preds.shape[1])]


@torch.no_grad()
def generated_category_purity(G, codes, data, device, n=2000, max_train=10000, seed=0):
    """How far G's categories (the first categorical code) are digits: a logistic regression
    on raw pixels, fitted to (at most max_train) labelled real training images, labels n of G's
    samples, and the categories are matched one-to-one to those labels (Hungarian). A low
    value with Q recovering c from G's images means G split or merged the classes, which Q
    then inherits on real images; a value well above cluster_acc points at how Q reads real
    images instead. Diagnostic only: nothing in training sees a label."""
    from sklearn.linear_model import LogisticRegression
    pixels = lambda x: ((x.float() + 1) / 2 if x.is_floating_point() else x.float() / 255).flatten(1).cpu().numpy()
    keep = (data.train_y >= 0).nonzero().squeeze(1)[:max_train]  # STL-10's unlabelled are -1
    if len(keep) == 0:
        return None
    clf = LogisticRegression(max_iter=300).fit(pixels(data.train_x[keep]), data.train_y[keep].cpu().numpy())
    was_training = G.training
    G.eval()
    z, cat, cont = codes.sample(n, device, rng=torch.Generator().manual_seed(seed))
    labelled = clf.predict(pixels(torch.cat([G(g) for g in codes.gen_input(z, cat, cont).split(500)])))
    G.train(was_training)
    return float(common.cluster_accuracy(cat[:, 0].cpu().numpy(), labelled))


def dcgan_init(module):
    """Weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases 0 (DCGAN's recipe, which
    InfoGAN's networks follow); PyTorch's default init saturates G's tanh at the start."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, DCGAN_STD)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, DCGAN_STD)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def seen(images, sigma, warp, rng):
    """What D and Q read: each image warped (--warp), then noised (--instance-noise)."""
    images = common.random_affine(images, rng=rng) if warp else images
    return common.instance_noise(images, sigma, rng)


def train(args):
    device, rank, world = common.start(args)  # world > 1 under torchrun
    main_process = rank == 0  # the one that evaluates, logs and writes
    data = common.load_data(args.dataset, args.data_root, device, args.image_size)
    common.check_batch(args.batch_size, world, len(data.train_x))
    # the clustering term's partners (checked and found before the long work)
    neighbours = common.neighbour_table(data, args.cluster_neighbours if args.cluster_mi else 0)
    c, h, w = data.image_shape
    if h != w or h % 4:
        raise UserError(f"InfoGAN expects square images with a side divisible by 4, got {h}x{w}")
    codes = Codes(args.noise_dim, args.n_cat, args.cat_dim, args.n_cont)
    enc_cfg = {**common.encoder_config("infogan", data.image_shape, args.q_dim, ENCODERS),
               "width": args.width, "fc_dim": args.fc_dim}
    encoder = common.build_encoder(enc_cfg, ENCODERS).to(device)  # D/Q trunk + Q's hidden layer
    G = Generator(codes.input_dim, c, h, args.width, args.fc_dim).to(device)
    d_head = DHead(args.fc_dim).to(device)
    q_head = QHead(codes, args.q_dim, args.learn_cont_var).to(device)
    for m in (encoder, G, d_head, q_head):
        dcgan_init(m)
    q_head.rescale_logits_init_(args.cat_init_std)
    q_params = list(encoder.q_hidden.parameters()) + list(q_head.parameters())
    d_params = [p for n, p in encoder.named_parameters() if not n.startswith("q_hidden.")]
    betas = (args.adam_beta1, 0.999)
    optimizers = {
        "opt_dq": common.adam([{"params": d_params + list(d_head.parameters()), "lr": args.lr},
                               {"params": q_params, "lr": args.lr_g}], lr=args.lr, betas=betas),
        "opt_g": common.adam(G.parameters(), lr=args.lr_g, betas=betas),
    }
    # what is evaluated and saved as the run's encoder and Q: with --ema a moving average of
    # the trained weights (the trained ones are kept too, for --resume), else the trained ones
    avg_encoder, avg_q_head = ((copy.deepcopy(encoder), copy.deepcopy(q_head)) if args.ema
                               else (encoder, q_head))
    nets = {"generator": G, "d_head": d_head, "q_head": avg_q_head}  # checkpoint keys
    if args.ema:
        nets.update(trained_encoder=encoder, trained_q_head=q_head)
    acc_random_init = None  # the monitor's baseline: the untrained networks
    if args.n_cat and args.eval_every and main_process:
        with torch.random.fork_rng(devices=[]):  # recalibrating draws STL-10's crops
            untrained = copy.deepcopy(encoder)
            common.recalibrate_batchnorm(untrained, data, device)
            acc_random_init = cluster_accuracies(untrained, q_head, data, device)[0]
    noise_rng = torch.Generator().manual_seed(args.seed * 1000 + rank)  # other noise per process
    if args.epochs is None:  # the recipe's: a number of steps, whatever the data's size
        args.epochs = common.epochs_for_steps(RECIPE_STEPS, data, args.batch_size, world)
    run_dir, start_epoch, step, elapsed = common.resume_state(
        args, "infogan", {"encoder": avg_encoder, **nets}, optimizers, {"noise": noise_rng})
    run = common.Run("infogan", args, run_dir, elapsed)
    common.convert_sync_bn([encoder, G, d_head, q_head], args.sync_bn, world, device)
    # the networks as the steps call them (DDP-wrapped, compiled); the plain ones are saved.
    # G's step reads D and Q through the plain modules: it does not update them, and DDP
    # would wait for their gradients.
    encoder_step, d_head_step, q_head_step, G_step = (
        common.maybe_compile(common.wrap_ddp(m, device), args.compile)
        for m in (encoder, d_head, q_head, G))
    encoder_g_step = encoder_step if world == 1 else common.maybe_compile(encoder, args.compile)
    # fixed inputs for the pictures, the same after --resume
    fixed_rng = torch.Generator().manual_seed(args.seed + 12345)
    fixed = {"traversal_z": torch.randn(1 if args.n_cont else args.traversal_steps,
                                        args.noise_dim, generator=fixed_rng).to(device),
             "samples": codes.sample(100, device, rng=fixed_rng)}
    if main_process:
        print(f"run folder: {run.dir}  device: {device}  data: {data.name} {len(data.train_x)} "
              f"train / {len(data.test_x)} test  codes: {args.n_cat} x Cat({args.cat_dim}) + "
              f"{args.n_cont} x U(-1,1) + z {args.noise_dim}  processes: {world}")

    lam = dict(lambda_cat=args.lambda_cat, lambda_cont=args.lambda_cont)
    per_epoch = data.n_batches("train", args.batch_size // world, drop_last=True, world_size=world)
    total_steps = min(args.epochs * per_epoch, args.max_steps or 10**12)
    out_of_steps = lambda: bool(args.max_steps and step >= args.max_steps)
    stats, shown = {}, {}  # shown: the latest monitor, in the progress bar
    for epoch in range(start_epoch, args.epochs):
        if out_of_steps():
            break
        _, bar = common.epoch_batches(data, args, epoch, f"epoch {epoch + 1}/{args.epochs}",
                                      rank, world, with_index=True)
        sums = {}
        for x, _, idx in bar:
            n = len(x)
            z, cat, cont = codes.sample(n, device, rng=noise_rng)
            sigma = args.instance_noise * max(0.0, 1 - step / total_steps)  # annealed to 0

            # D and Q: real vs detached fake in one batch (shared BatchNorm statistics), and
            # recover the fake's codes
            with common.autocast(device, args.amp):
                fake = G_step(codes.gen_input(z, cat, cont))  # reused by G's step below
                partner = x if neighbours is None else data.images(
                    "train", common.random_neighbours(neighbours, idx, rng=noise_rng))
                warped = [common.random_jitter(common.random_affine(partner, rng=noise_rng),
                                               args.cluster_jitter, noise_rng,
                                               brightness=False)] if args.cluster_mi else []
                out = encoder_step(seen(torch.cat([x, fake.detach(), *warped]), sigma, args.warp,
                                        noise_rng))
                d_real, d_fake = d_head_step(out["fc"][:2 * n]).float().split(n)
                d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
                # Q reads the real images and their warps only for the clustering term
                q_out = q_head_step(out["y"] if args.cluster_mi else out["y"][n:])
                q_fake = tuple(t[n:2 * n] for t in q_out) if args.cluster_mi else q_out
                i_loss, ce, nll = info_loss(q_fake, cat, cont, **lam)
                dq_loss = d_loss + i_loss
                if args.cluster_mi:
                    clu_mi = clustering_loss(q_out[0][:n], q_out[0][2 * n:], args.cluster_balance)
                    dq_loss = dq_loss + args.cluster_mi * clu_mi
            common.check_finite(dq_loss, step, "D and Q's loss", NAN_HINT)
            optimizers["opt_dq"].zero_grad(set_to_none=True)
            dq_loss.backward()
            optimizers["opt_dq"].step()

            # G: fool D (non-saturating) and make the codes recoverable by Q
            with common.frozen(encoder, d_head, q_head), common.autocast(device, args.amp):
                # the batch as D saw it, with new draws
                out = encoder_g_step(seen(torch.cat([x, fake]), sigma, args.warp, noise_rng))
                g_gan = F.softplus(-d_head(out["fc"][n:]).float()).mean()
                g_info, _, _ = info_loss(q_head(out["y"][n:]), cat, cont, **lam)
                g_loss = g_gan + g_info
            common.check_finite(g_loss, step, "G's loss", NAN_HINT)
            optimizers["opt_g"].zero_grad(set_to_none=True)
            g_loss.backward()
            optimizers["opt_g"].step()
            if args.ema:
                common.average_weights_(avg_encoder, encoder, args.ema, step)
                common.average_weights_(avg_q_head, q_head, args.ema, step)
            step += 1

            logs = {"d_loss": d_loss, "g_gan": g_gan, "info_loss": i_loss, "cat_ce": ce,
                    "cont_nll": nll, "d_real": torch.sigmoid(d_real).mean(),
                    "d_fake": torch.sigmoid(d_fake).mean()}
            if args.cluster_mi:
                logs["clu_mi"] = clu_mi
            common.add_step(sums, logs)
            bar.set_postfix(d=f"{d_loss.item():.3f}", g=f"{g_gan.item():.3f}", ce=f"{ce.item():.3f}", **shown)
            if out_of_steps():
                break
        stats = common.means(sums)  # this process's batches
        last = epoch + 1 == args.epochs or out_of_steps()
        due = common.eval_due(args.eval_every, epoch, last)  # the monitor: cluster accuracy
        if args.n_cat and main_process:  # I(c_cat; x) >= H(c_cat) - CE, in nats
            stats["mi_cat_lower_bound"] = args.n_cat * np.log(args.cat_dim) - stats["cat_ce"]
            if due:
                stats["cluster_acc_mixed_bn"] = cluster_accuracies(encoder, q_head, data, device)[0]
            common.recalibrate_batchnorm(encoder, data, device)  # watched or not
            if due and args.ema:
                stats["cluster_acc_trained"] = cluster_accuracies(encoder, q_head, data, device)[0]
            if args.ema:
                common.recalibrate_batchnorm(avg_encoder, data, device)
            if due:
                stats["cluster_acc"] = cluster_accuracies(avg_encoder, avg_q_head, data, device)[0]
                shown["acc"] = f"{stats['cluster_acc']:.3f}"
        if main_process and ((epoch + 1) % args.image_every == 0 or last):
            write_grids(G, codes, fixed, run, epoch + 1, args.traversal_steps)
        run.log(epoch=epoch + 1, step=step, time=run.elapsed(), **stats)
        if due or last:
            run.plot(["cluster_acc", "cluster_acc_mixed_bn"] + ["cluster_acc_trained"] * bool(args.ema),
                     {"cluster_acc": acc_random_init})
        run.checkpoint(encoder=avg_encoder, encoder_cfg=enc_cfg, args=args, data=data, epoch=epoch + 1,
                       step=step, modules=nets, optimizers=optimizers, rngs={"noise": noise_rng})

    common.finish_distributed()  # the rest is the main process's alone
    if not main_process:
        return run
    summary = {"epochs": args.epochs, "steps": step, "minutes": run.elapsed() / 60,
               **{k: stats[k] for k in ("d_loss", "g_gan", "cat_ce", "cont_nll") if k in stats}}
    if args.n_cat:
        accs = cluster_accuracies(avg_encoder, avg_q_head, data, device)
        purity = generated_category_purity(G, codes, data, device)
        run.log(step=step, cluster_acc=accs[0], cluster_acc_per_code=accs,
                cluster_acc_random_init=acc_random_init, generated_category_purity=purity)
        if purity is not None:
            summary["G's categories as classes"] = purity
        summary["cluster acc (argmax Q)"] = accs[0]
        if acc_random_init is not None:
            summary["untrained"] = acc_random_init
    common.print_table([summary], title=f"\nInfoGAN ({args.n_cat} x Cat({args.cat_dim}) + "
                                        f"{args.n_cont} continuous) on {data.name}")
    print(f"checkpoint: {run.path('checkpoint.pt')}  (python eval_probe.py {run.path('checkpoint.pt')})")
    return run


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    common.run_cli(main)
