"""Information Maximizing Autoencoder: InfoAE.

Rana, Latif, Gururajan, Gray, Mackenzie, Humphris, Dunn. "Disentangled Representation
Learning with Information Maximizing Autoencoder", 2019, arXiv:1904.08613.

Six networks (paper §2). A generator G(z, c) turns noise z and a category c into a latent
l_g; the decoder Dec turns latents into images, and Dec(l_g) must fool an image
discriminator Dis; the encoder E maps images back to latents, Dec(E(x)) reconstructing x; a
classifier C recovers c from l_g and from E(Dec(l_g)) (the mutual information between c and
the latents); a latent "self critic" SC tells (G(z,c), c) from (E(Dec(G(z,c))), c), so E
learns to invert Dec. After training, argmax C(E(x)) clusters real images, unsupervised.
As in the paper's Eq. 2 (a min-max), E, Dec, G and C take one step of one Adam on

    rec_weight * rec + alpha * (dec_gen + dec_rec) + beta * (cls_gen + cls_enc) + gamma * enc_sc
      + latent_adv * enc_lat + latent_adv_gen * gen_lat + cluster_mi * clu_mi

(min_player_terms), the critics Dis, SC and LC frozen; then each critic takes one step on
its own loss (critic_terms). The last three weights are 0 in the paper.

    python infoae.py --dataset fashion-mnist     # the recipe: 4,960 steps or more (whole epochs)
    python infoae.py --dataset fashion-mnist --paper   # the paper's configuration, 50 epochs

Defaults: the recipe (RECIPE; why, measured: docs/infoae.md); `--paper`: the paper's (PAPER);
a flag given wins over both.

Where this script fills gaps in or departs from the paper (the measurements behind each
choice, and the variants tried and not kept, are in docs/infoae.md):
- The paper's total-loss equation (Eq. 1) is lost; the weights group the minimising side as
  above (alpha 1, beta 1, gamma 0.4 as in the paper) plus a reconstruction weight, 10, since
  a per-pixel squared error is much smaller than the cross-entropies and GAN losses.
- Architectures (the paper gives only their kind): E and Dis DCGAN-style strided CNNs, Dec
  their transposed mirror, G and C two-layer MLPs, SC a three-layer MLP on (latent, one-hot
  c); BatchNorm everywhere except first and last layers (so none in G, C and SC); widths are
  --width and --hidden (recipe 16 and 256, --paper 64 and 512).
- Dis's last layer also reads the batch's spread (progressive GANs' minibatch statistic), so
  a decoder that ignores z and draws one image per category can be told from real variety.
- Not given by the paper: latent size 16, z ~ Uniform(-0.5, 0.5)^100 (--z-scale), Adam
  beta1 0.5, squared-error reconstruction, batch 32; the length: 50 epochs under --paper,
  the recipe's the fewest whole epochs that make 4,960 steps (80 of 2,000 images, 3 of 60,000).
- E's BatchNorm statistics are recomputed on real training images before every evaluation
  and checkpoint (training mixes real and generated batches into them).
- Recipe (each flag at 0 gives the paper, whose losses alone cluster real MNIST far worse):
  a latent critic LC that tells G(z, c) from E(x) and that E and G both play against
  (--latent-adv 1 --latent-adv-gen 1), so that C, trained on generated latents, can read
  real ones (at weight 0 LC still logs `lat`, how far apart l_e and l_g are).
- Recipe: beta 2 (the paper's 1), and instance noise (Sonderby et al. 2016, arXiv:1610.04490)
  on every image Dis reads and on the generated images E reads, annealed from
  --instance-noise 1 to 0, so that c is carried in coarse shape.
- Recipe: IIC's clustering term (Ji et al. 2019, arXiv:1807.06653) on real images and random
  warps of each (--cluster-mi 16, --cluster-balance 2), into E and C, so that the categories
  follow the real images and not only G's choice; at weight 0 it is not built. Each image
  meets 8 warps (--cluster-views) that rotate, shift, shear (--cluster-shear 0.3), stretch
  (--cluster-scale 0.35) and change contrast (--cluster-jitter 0.5): what
  survives them (slant, width, how light an image is) would otherwise split a class.
- Recipe: each warp is of the image itself or of its nearest training image by pixels, half
  the time each (--cluster-neighbours 1), as SCAN (arXiv:2005.12320) pairs neighbours.
- Under torchrun --batch-size is the global batch and BatchNorm is per process; E, Dec, G and
  C are wrapped as one DDP module, the critics as another.
"""
import contextlib
import copy
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "infoae"


# The defaults are the recipe measured on real images (docs/infoae.md); `--paper` restores
# the paper's configuration (arXiv:1904.08613, Sec. 2-3) instead. A flag given on the
# command line wins over both. Lengths: the fewest whole epochs that make RECIPE_STEPS steps
# (80 of 2,000 images, 3 of 60,000); the paper gives none, --paper runs PAPER_EPOCHS.
PAPER = {"width": 64, "hidden": 512, "beta": 1.0, "latent_adv": 0.0, "latent_adv_gen": 0.0,
         "instance_noise": 0.0, "cluster_mi": 0.0, "cluster_views": 1, "cluster_shear": 0.0,
         "cluster_scale": 0.2, "cluster_jitter": 0.0, "cluster_neighbours": 0}
RECIPE = {"width": 16, "hidden": 256, "beta": 2.0, "latent_adv": 1.0, "latent_adv_gen": 1.0,
          "instance_noise": 1.0, "cluster_mi": 16.0, "cluster_views": 8, "cluster_shear": 0.3,
          "cluster_scale": 0.35, "cluster_jitter": 0.5, "cluster_neighbours": 1}
RECIPE_STEPS, PAPER_EPOCHS = 4960, 50


def parse_args(argv=None):
    p = common.ArgumentParser(description="Information Maximizing Autoencoder (InfoAE)")
    common.add_common_args(p, epochs=None, batch_size=32, lr=2e-4)
    p.add_argument("--paper", action="store_true",
                   help=f"the paper's configuration instead of the recipe (see PAPER, RECIPE; "
                        f"{PAPER_EPOCHS} epochs where the recipe runs {RECIPE_STEPS} steps)")
    p.add_argument("--alpha", type=common.nonneg_float, default=1.0,
                   help="weight of the decoder's image-adversarial losses on generated and "
                        "reconstructed images (alpha, Eq. 1)")
    p.add_argument("--beta", type=common.nonneg_float, default=None,
                   help=f"weight of the two classification (MI) losses, C on G(z,c) and on "
                        f"E(Dec(G(z,c))) (beta, Eq. 1; paper {PAPER['beta']}, recipe {RECIPE['beta']})")
    p.add_argument("--gamma", type=common.nonneg_float, default=0.4,
                   help="weight of the encoder's self-critic loss (gamma, Eq. 1)")
    p.add_argument("--categories", type=common.positive_int, default=10,
                   help="size of the categorical code c ~ Cat(K) (paper: 10)")
    p.add_argument("--z-scale", type=common.positive_float, default=0.5,
                   help="z ~ Uniform(-s, s)^z_dim (the paper's range is lost); below 1 so that c, "
                        "not z, dominates l_g = G(z,c) early in training")
    p.add_argument("--z-dim", type=common.positive_int, default=100,
                   help="size of the uniform noise z (paper: 100)")
    p.add_argument("--rec-weight", type=common.nonneg_float, default=10.0,
                   help="weight of the reconstruction error (not named in the paper, whose "
                        "Eq. 1 is lost)")
    p.add_argument("--latent-adv", type=common.nonneg_float, default=None,
                   help=f"weight of the encoder's latent-adversarial term (not in the paper: "
                        f"{PAPER['latent_adv']}): E(x) must fool a latent critic LC that tells it "
                        f"from G(z,c) (recipe {RECIPE['latent_adv']})")
    p.add_argument("--latent-adv-gen", type=common.nonneg_float, default=None,
                   help=f"weight of the generator's side of it: G(z,c) must look like E(x) to "
                        f"LC (paper {PAPER['latent_adv_gen']}, recipe {RECIPE['latent_adv_gen']})")
    p.add_argument("--instance-noise", type=common.nonneg_float, default=None,
                   help=f"std of Gaussian noise added to every image Dis reads and to the "
                        f"generated images E reads, falling linearly to 0 over the run (not in "
                        f"the paper: {PAPER['instance_noise']}; recipe {RECIPE['instance_noise']}, "
                        f"images in [-1, 1])")
    p.add_argument("--cluster-mi", type=common.nonneg_float, default=None,
                   help=f"weight of the clustering term on real images (not in the paper: "
                        f"{PAPER['cluster_mi']}; IIC): C(E(x)) and C(E(t(x))), t a random affine "
                        f"warp, must agree and use every category (recipe {RECIPE['cluster_mi']})")
    p.add_argument("--cluster-balance", type=common.nonneg_float, default=2.0,
                   help="IIC's lambda in that term: weight of the clusters' marginal entropies "
                        "against their joint entropy over the two views (1: the mutual "
                        "information)")
    p.add_argument("--cluster-views", type=common.positive_int, default=None,
                   help=f"warps of each image that the clustering term pairs it with (IIC's "
                        f"repeated transforms): its joint distribution of the two views' "
                        f"categories is estimated from this many times --batch-size pairs "
                        f"(recipe {RECIPE['cluster_views']}, --paper {PAPER['cluster_views']})")
    p.add_argument("--cluster-shear", type=common.nonneg_float, default=None,
                   help=f"largest horizontal shear (a change of slant, x moved by up to this "
                        f"times y) in that term's warp, on top of its rotation, scaling and "
                        f"shift (recipe {RECIPE['cluster_shear']}, --paper {PAPER['cluster_shear']})")
    p.add_argument("--cluster-scale", type=common.nonneg_float, default=None,
                   help=f"largest change of width and of height (each apart, by 1 +- this) in "
                        f"that term's warp (recipe {RECIPE['cluster_scale']}, --paper "
                        f"{PAPER['cluster_scale']})")
    p.add_argument("--cluster-jitter", type=common.nonneg_float, default=None,
                   help=f"that term's warp also scales each view's contrast by 1 +- this (the "
                        f"background stays black), so that the categories cannot follow how "
                        f"light or dark an image is (not in the paper; recipe "
                        f"{RECIPE['cluster_jitter']})")
    p.add_argument("--cluster-neighbours", type=common.nonneg_int, default=None,
                   help=f"that term pairs each image with warps of itself or of one of its K "
                        f"nearest training images by pixels (cosine; one of the K + 1 drawn anew "
                        f"for each warp), as SCAN (arXiv:2005.12320) pairs neighbours; 0: with "
                        f"warps of itself, as IIC "
                        f"(recipe {RECIPE['cluster_neighbours']}, --paper {PAPER['cluster_neighbours']})")
    p.add_argument("--latent-dim", type=common.positive_int, default=16,
                   help="size of the latents l_g = G(z,c) and l_e = E(x)")
    p.add_argument("--width", type=common.positive_int, default=None,
                   help=f"channels of the first conv of E and Dis (then 2x, 4x; paper's kind, "
                        f"not its width: {PAPER['width']} under --paper, recipe {RECIPE['width']})")
    p.add_argument("--hidden", type=common.positive_int, default=None,
                   help=f"hidden units of G, C, SC and LC (--paper {PAPER['hidden']}, recipe "
                        f"{RECIPE['hidden']})")
    p.add_argument("--adam-beta1", type=common.decay_rate, default=0.5, help="Adam beta1 for every network")
    args = common.merge_resume_args(p, argv, p.parse_args(argv))
    for name, value in (PAPER if args.paper else RECIPE).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.epochs is None and args.paper:
        args.epochs = PAPER_EPOCHS
    if args.categories < 2:
        p.error("--categories must be at least 2")
    return args


# ----------------------------------------------------------------------------------------
# The networks
# ----------------------------------------------------------------------------------------
class InfoAEEncoder(nn.Module):
    """InfoAE's encoder E (arXiv:1904.08613, §2): strided convs, no pooling, BatchNorm on every layer
    but the first and the last. conv 4x4/2 w (leaky ReLU) -> conv 4x4/2 2w (BN, leaky ReLU)
    -> conv 4x4/2 4w (BN, leaky ReLU) -> fc fc_dim (BN, leaky ReLU) -> linear y_dim.

    Taps: c1 (H/2), c2 (H/4), conv (H/8, last conv), fc, y (the latent l_e = E(x) that the
    decoder, the classifier and the self critic read; the representation eval_probe.py probes).
    `width` is w (64 in the DCGAN-sized setting; infoae.py uses less on CPU).
    """
    def __init__(self, in_channels=1, image_size=32, y_dim=64, width=64, fc_dim=1024, slope=0.2):
        super().__init__()
        w = width
        self.c1 = nn.Sequential(nn.Conv2d(in_channels, w, 4, 2, 1), nn.LeakyReLU(slope, inplace=True))
        self.c2 = nn.Sequential(nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w),
                                nn.LeakyReLU(slope, inplace=True))
        self.c3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w),
                                nn.LeakyReLU(slope, inplace=True))
        s = image_size // 8
        self.fc = nn.Sequential(nn.Linear(4 * w * s * s, fc_dim, bias=False), nn.BatchNorm1d(fc_dim),
                                nn.LeakyReLU(slope, inplace=True))
        self.out = nn.Linear(fc_dim, y_dim)

    def forward(self, x):
        c1 = self.c1(x)
        c2 = self.c2(c1)
        conv = self.c3(c2)
        fc = self.fc(conv.flatten(1))
        return {"c1": c1, "c2": c2, "conv": conv, "fc": fc, "y": self.out(fc)}


ENCODERS = {"infoae": InfoAEEncoder}  # for eval_probe.py


class Decoder(nn.Module):
    """Dec: latent -> image. fc to (4w, H/8, H/8) (BN, ReLU) -> upconv 4x4/2 2w (BN, ReLU)
    -> upconv 4x4/2 w (BN, ReLU) -> upconv 4x4/2 channels, tanh (images live in [-1, 1])."""

    def __init__(self, latent_dim, out_channels, image_size, width):
        super().__init__()
        w, self.s = width, image_size // 8
        self.fc = nn.Sequential(nn.Linear(latent_dim, 4 * w * self.s * self.s, bias=False),
                                nn.BatchNorm1d(4 * w * self.s * self.s), nn.ReLU(inplace=True))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, out_channels, 4, 2, 1), nn.Tanh())

    def forward(self, latent):
        return self.up(self.fc(latent).view(len(latent), -1, self.s, self.s))


class Generator(nn.Module):
    """G: (z, one-hot c) -> latent l_g. Two layers, so no BatchNorm (first and last)."""

    def __init__(self, z_dim, n_categories, latent_dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim + n_categories, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, latent_dim))

    def forward(self, z, c_onehot):
        return self.net(torch.cat([z, c_onehot], 1))


class Classifier(nn.Module):
    """C: latent -> logits over the K categories. Two layers, no BatchNorm."""

    def __init__(self, latent_dim, n_categories, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, n_categories))

    def forward(self, latent):
        return self.net(latent)


SPREAD_VAR_FLOOR = 1e-8  # ImageDiscriminator's spread: var below this counts as 0


class ImageDiscriminator(nn.Module):
    """Dis: image -> real/fake logit. conv 4x4/2 w (leaky ReLU) -> conv 2w (BN) -> conv 4w
    (BN) -> linear 1, whose input also gets the batch's spread after the first layer."""

    def __init__(self, in_channels, image_size, width, slope=0.2):
        super().__init__()
        w, s = width, image_size // 8
        self.c1 = nn.Sequential(nn.Conv2d(in_channels, w, 4, 2, 1), nn.LeakyReLU(slope, inplace=True))
        self.rest = nn.Sequential(
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(slope, inplace=True),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.LeakyReLU(slope, inplace=True),
            nn.Flatten())
        self.out = nn.Linear(4 * w * s * s + 1, 1)

    def forward(self, x):
        h = self.c1(x)
        # minibatch spread: how much the batch varies, taken before any BatchNorm (which
        # would rescale a batch of near-copies back to unit variance). A decoder that ignores
        # z draws near-copies; a real batch varies. (h.std(0) written out: faster on a CPU.)
        # The variance is floored before the root: where every image of the batch is
        # background (MNIST's black border, -1 everywhere) it is exactly 0, sqrt's gradient
        # there is infinite and 0 * inf made Dis's first update NaN; at the floor the
        # gradient is 0, which is exact (such a spread is 0 whatever Dis's weights).
        var = (h - h.mean(0)).square().mean(0)
        spread = var.clamp_min(SPREAD_VAR_FLOOR).sqrt().mean().expand(len(h), 1)
        return self.out(torch.cat([self.rest(h), spread], 1)).squeeze(-1)


class SelfCritic(nn.Module):
    """SC: (latent, one-hot c) -> logit; real = (G(z,c), c), fake = (E(Dec(G(z,c))), c)."""

    def __init__(self, latent_dim, n_categories, hidden, slope=0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim + n_categories, hidden), nn.LeakyReLU(slope, inplace=True),
            nn.Linear(hidden, hidden), nn.LeakyReLU(slope, inplace=True), nn.Linear(hidden, 1))

    def forward(self, latent, c_onehot):
        return self.net(torch.cat([latent, c_onehot], 1)).squeeze(-1)


class LatentCritic(nn.Module):
    """LC (not in the paper): latent -> logit; real = G(z,c), fake = E(x). Reads no c (a real
    image has none). Three layers like SC, no BatchNorm (two batches, real and fake)."""

    def __init__(self, latent_dim, hidden, slope=0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.LeakyReLU(slope, inplace=True),
            nn.Linear(hidden, hidden), nn.LeakyReLU(slope, inplace=True), nn.Linear(hidden, 1))

    def forward(self, latent):
        return self.net(latent).squeeze(-1)


def build_networks(args, image_shape):
    """The encoder's config (saved in the checkpoint) and the six networks by name."""
    channels, size, _ = image_shape
    enc_cfg = common.encoder_config("infoae", image_shape, args.latent_dim, ENCODERS)
    enc_cfg.update(width=args.width)
    nets = {
        "encoder": common.build_encoder(enc_cfg, ENCODERS),
        "decoder": Decoder(args.latent_dim, channels, size, args.width),
        "generator": Generator(args.z_dim, args.categories, args.latent_dim, args.hidden),
        "classifier": Classifier(args.latent_dim, args.categories, args.hidden),
        "discriminator": ImageDiscriminator(channels, size, args.width),
        "self_critic": SelfCritic(args.latent_dim, args.categories, args.hidden),
        "latent_critic": LatentCritic(args.latent_dim, args.hidden),
    }
    return enc_cfg, nets


MIN_PLAYERS = ("encoder", "decoder", "generator", "classifier")
CRITICS = ("discriminator", "self_critic", "latent_critic")

# the flag weighing each min-player term, for the NaN message (critic losses have none)
TERM_FLAGS = {"rec": "--rec-weight", "dec_gen": "--alpha", "dec_rec": "--alpha", "cls_gen": "--beta",
              "cls_enc": "--beta", "enc_sc": "--gamma", "enc_lat": "--latent-adv",
              "gen_lat": "--latent-adv-gen", "clu_mi": "--cluster-mi"}


def check_losses_finite(loss, terms, nets, step, args, what="loss"):
    """common.check_finite with this script's hint: which terms are not finite, which
    networks' weights or BatchNorm statistics are (the one that blew up in an earlier update),
    and this script's flags to try."""
    if torch.isfinite(loss).all():
        return
    bad_terms = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    bad_nets = [k for k, m in nets.items()
                if not all(torch.isfinite(v).all() for v in m.state_dict().values()
                           if v.is_floating_point())]
    flags = sorted({TERM_FLAGS[k] for k in bad_terms if k in TERM_FLAGS})
    hint = (f"not finite: {', '.join(bad_terms) or 'the sum only'}; weights not finite: "
            f"{', '.join(bad_nets) or 'none'}; try a lower --lr (now {args.lr:g})"
            + (f" or a lower {' / '.join(flags)} (the weight of those terms)" if flags else "")
            + (", or run without --amp" if args.amp else ""))
    common.check_finite(loss, step, what, hint)


# ----------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------
def sample_prior(n, z_dim, z_scale, n_categories, device):
    """z ~ Uniform(-s, s)^z_dim and c ~ Cat(K) with equal probabilities (labels, not one-hot)."""
    z = torch.rand(n, z_dim, device=device).mul_(2).sub_(1).mul_(z_scale)
    c = torch.randint(n_categories, (n,), device=device)
    return z, c


class Clustering(NamedTuple):
    """Settings of clu_mi, IIC's term: balance is IIC's lambda (common.cluster_information);
    views how many warps t(x) of each image it pairs with it (IIC's repeated transforms: its
    joint P(y, y') is then estimated from views * N pairs); shear and scale the warp's largest
    horizontal shear and change of width and height (common.random_affine)."""
    balance: float = 1.0
    views: int = 1
    shear: float = 0.0
    scale: float = 0.2
    jitter: float = 0.0


def min_player_terms(nets, x, z, c, sigma=0.0, clustering=Clustering(), partners=None):
    """The terms E, Dec, G and C minimise (jointly, as in the paper's Eq. 2), built with the
    critics Dis, SC and LC frozen so that no gradient reaches them. With l_g = G(z, c),
    x_g = Dec(l_g), l_e = E(x), x_r = Dec(l_e), l_ge = E(x_g), sp(t) = log(1 + e^t) and t(x)
    a random small warp of x (or of its partner, one of x's neighbours):

        term      formula                                 reaches (and so trains)
        rec       mean (x_r - x)^2                        E, Dec
        dec_gen   sp(-Dis(x_g))                           Dec, G
        dec_rec   sp(-Dis(x_r))                           Dec, E
        cls_gen   cross-entropy(C(l_g), c)                G, C
        cls_enc   cross-entropy(C(l_ge), c)               E, Dec, G, C
        enc_sc    sp(-SC(l_ge, c))                        E, Dec, G
        enc_lat   sp(-LC(l_e))            (not in the paper) E
        gen_lat   sp(LC(l_g))             (not in the paper) G
        clu_mi    -IIC(C(l_e), C(E(t(x)))) (not in the paper) E, C

    Nothing is detached between them: Dec "also maximises the mutual information between the
    condition and the generated samples" (§2) through cls_enc, as InfoGAN's generator does.
    sigma: instance noise on the images Dis reads and on the generated images E reads (not
    on E's real images). clustering: clu_mi's settings (Clustering); None leaves clu_mi out
    (its weight is 0), which spares the warps and E's pass over them. partners: the images
    warped for clu_mi, ordered as x.repeat(views) (None: x's own copies).

    Returns (terms, tensors): terms by name, and the intermediate l_g, x_g, x_r, l_ge that
    the critics' losses reuse (detached there).
    """
    E, Dec, G, C = (nets[k] for k in MIN_PLAYERS)
    Dis, SC, LC = (nets[k] for k in CRITICS)
    onehot = F.one_hot(c, C.net[-1].out_features).to(x.dtype)
    # before the noise: the same warps at any sigma
    if clustering is not None:
        views = clustering.views
        source = x.repeat(views, 1, 1, 1) if partners is None else partners
        x_warped = common.random_jitter(
            common.random_affine(source, max_scale=clustering.scale, max_shear=clustering.shear),
            clustering.jitter, brightness=False)
    with common.frozen(Dis, SC, LC):
        l_g = G(z, onehot)  # (N, latent)
        x_g = Dec(l_g)  # generated images
        l_ge = E(common.instance_noise(x_g, sigma))["y"]  # E(Dec(G(z, c)))
        l_e = E(x)["y"]  # E(x)
        x_r = Dec(l_e)  # reconstructions
        terms = {
            "rec": F.mse_loss(x_r, x),
            "dec_gen": F.softplus(-Dis(common.instance_noise(x_g, sigma))).mean(),
            "dec_rec": F.softplus(-Dis(common.instance_noise(x_r, sigma))).mean(),
            "cls_gen": F.cross_entropy(C(l_g), c),
            "cls_enc": F.cross_entropy(C(l_ge), c),
            "enc_sc": F.softplus(-SC(l_ge, onehot)).mean(),
            "enc_lat": F.softplus(-LC(l_e)).mean(),
            "gen_lat": F.softplus(LC(l_g)).mean(),
        }
        if clustering is not None:
            terms["clu_mi"] = -common.cluster_information(C(l_e).repeat(views, 1),
                                                          C(E(x_warped)["y"]), clustering.balance)
    return terms, {"onehot": onehot, "l_g": l_g, "x_g": x_g, "x_r": x_r, "l_ge": l_ge, "l_e": l_e}


def min_player_loss(terms, alpha, beta, gamma, rec_weight=1.0, latent_adv=0.0, latent_adv_gen=0.0,
                    cluster_mi=0.0):
    """The weighted sum of min_player_terms (the module docstring says why these groups)."""
    return (rec_weight * terms["rec"] + alpha * (terms["dec_gen"] + terms["dec_rec"])
            + beta * (terms["cls_gen"] + terms["cls_enc"]) + gamma * terms["enc_sc"]
            + latent_adv * terms["enc_lat"] + latent_adv_gen * terms["gen_lat"]
            + (cluster_mi * terms["clu_mi"] if cluster_mi else 0.0))


def critic_terms(nets, x, t, sigma=0.0):
    """The critics' own losses, inputs detached so that each trains only its critic:

        dis  sp(-Dis(x)) + (sp(Dis(x_g)) + sp(Dis(x_r))) / 2       Dis
        sc   sp(-SC(l_g, c)) + sp(SC(l_ge, c))                      SC
        lat  sp(-LC(l_g)) + sp(LC(l_e))        (not in the paper)   LC
    """
    Dis, SC, LC = (nets[k] for k in CRITICS)
    dis = F.softplus(-Dis(common.instance_noise(x, sigma))).mean() + 0.5 * (
        F.softplus(Dis(common.instance_noise(t["x_g"].detach(), sigma))).mean()
        + F.softplus(Dis(common.instance_noise(t["x_r"].detach(), sigma))).mean())
    sc = (F.softplus(-SC(t["l_g"].detach(), t["onehot"])).mean()
          + F.softplus(SC(t["l_ge"].detach(), t["onehot"])).mean())
    lat = F.softplus(-LC(t["l_g"].detach())).mean() + F.softplus(LC(t["l_e"].detach())).mean()
    return {"dis": dis, "sc": sc, "lat": lat}


# ----------------------------------------------------------------------------------------
# Evaluation and pictures
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(*modules):
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


def predict_clusters(encoder, classifier, data, split, device, batch_size=500):
    """argmax C(E(x)) for every image of a split, and the labels (numpy)."""
    preds, labels = [], []
    with eval_mode(encoder, classifier):
        for x, y in data.batches(split, batch_size):
            preds.append(classifier(encoder(x.to(device))["y"]).argmax(1).cpu())
            labels.append(y.cpu())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def cluster_test_accuracy(nets, data, device):
    common.recalibrate_batchnorm(nets["encoder"], data, device)
    pred, labels = predict_clusters(nets["encoder"], nets["classifier"], data, "test", device)
    return float(common.cluster_accuracy(pred, labels)), pred, labels


def interpolation_pairs(labels, n_rows=10):
    """Index pairs of test images: the first half between different classes, the second
    between two images of one class (classes taken in turn)."""
    classes = [int(k) for k in np.unique(labels)]
    by_class = {k: np.flatnonzero(labels == k) for k in classes}
    pairs = []
    for i in range(n_rows // 2):
        a, b = classes[i % len(classes)], classes[(i + 1) % len(classes)]
        pairs.append((by_class[a][0], by_class[b][0]))
    for i in range(n_rows - n_rows // 2):
        idx = by_class[classes[(i + n_rows // 2) % len(classes)]]
        pairs.append((idx[0], idx[min(1, len(idx) - 1)]))
    return pairs


def save_pictures(run, nets, data, args, device, n_cols=10):
    """samples.png (row k: Dec(G(z, c=k)), one z per column), reconstructions.png (rows of
    test images, each followed by its reconstruction), interpolation.png."""
    E, Dec, G = nets["encoder"], nets["decoder"], nets["generator"]
    with eval_mode(E, Dec, G):
        k = args.categories
        z, _ = sample_prior(n_cols, args.z_dim, args.z_scale, k, device)
        z = z.repeat(k, 1)
        c = torch.arange(k, device=device).repeat_interleave(n_cols)
        common.save_image_grid(Dec(G(z, F.one_hot(c, k).float())), run.path("samples.png"), n_cols)

        x = data.preprocess(data.test_x[:64].to(device), train=False)
        x_r = Dec(E(x)["y"])
        rows = torch.stack([x.view(-1, 16, *x.shape[1:]), x_r.view(-1, 16, *x.shape[1:])], 1)
        common.save_image_grid(rows.flatten(0, 2), run.path("reconstructions.png"), 16)

        pairs = interpolation_pairs(data.test_y.cpu().numpy())
        ends = data.preprocess(data.test_x[torch.tensor(pairs).flatten()].to(device), train=False)
        l = E(ends)["y"].view(len(pairs), 2, -1)  # (rows, 2, latent)
        t = torch.linspace(0, 1, n_cols, device=device)[None, :, None]
        path = (1 - t) * l[:, :1] + t * l[:, 1:]  # (rows, n_cols, latent)
        common.save_image_grid(Dec(path.flatten(0, 1)), run.path("interpolation.png"), n_cols)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def train(args):
    device, rank, world = common.start(args)  # world > 1 under torchrun
    main_process = rank == 0  # the one that evaluates, logs and writes
    data = common.load_data(args.dataset, args.data_root, device, args.image_size)
    common.check_batch(args.batch_size, world, len(data.train_x))
    # the clustering term's partners (checked and found before the long work)
    neighbours = common.neighbour_table(data, args.cluster_neighbours if args.cluster_mi > 0 else 0)
    enc_cfg, nets = build_networks(args, data.image_shape)
    for m in nets.values():
        m.to(device)
    adam = lambda names: common.adam([p for k in names for p in nets[k].parameters()],
                                     lr=args.lr, betas=(args.adam_beta1, 0.999))
    optimizers = {"opt": adam(MIN_PLAYERS), "dis_opt": adam(["discriminator"]),
                  "sc_opt": adam(["self_critic"]), "lat_opt": adam(["latent_critic"])}
    acc_random_init = None  # the monitor's baseline: the untrained networks
    if args.eval_every and main_process:
        with torch.random.fork_rng(devices=[]):  # recalibrating draws STL-10's crops
            untrained = {**nets, "encoder": copy.deepcopy(nets["encoder"])}
            acc_random_init = cluster_test_accuracy(untrained, data, device)[0]

    if args.epochs is None:  # the recipe's: a number of steps, whatever the data's size
        args.epochs = common.epochs_for_steps(RECIPE_STEPS, data, args.batch_size, world)
    run_dir, start_epoch, step, elapsed = common.resume_state(args, SCRIPT, nets, optimizers)
    run = common.Run(SCRIPT, args, run_dir, elapsed)
    common.convert_sync_bn(nets.values(), args.sync_bn, world, device)
    # the networks as the step calls them (compiled); the plain ones are saved, evaluated and
    # frozen. Under torchrun each side's terms are the forward of one DDP module.
    step_nets = {k: common.maybe_compile(m, args.compile) for k, m in nets.items()}
    critic_nets = {k: step_nets[k] for k in CRITICS}
    min_player_terms_step = common.ddp_function(
        min_player_terms, {k: step_nets[k] for k in MIN_PLAYERS}, device, others=critic_nets)
    critic_terms_step = common.ddp_function(critic_terms, critic_nets, device)
    clustering = (Clustering(args.cluster_balance, args.cluster_views, args.cluster_shear,
                             args.cluster_scale, args.cluster_jitter) if args.cluster_mi > 0 else None)
    if world > 1:  # DDP gave every process the main one's weights; now each draws its own z, c
        torch.manual_seed(args.seed + rank)
    if main_process:
        print(f"run folder: {run.dir}  device: {device}  data: {data.name} "
              f"{len(data.train_x)} train / {len(data.test_x)} test  processes: {world}  "
              f"alpha={args.alpha} beta={args.beta} gamma={args.gamma} "
              f"latent_adv={args.latent_adv}/{args.latent_adv_gen} cluster_mi={args.cluster_mi}")

    stats, acc, shown = {}, float("nan"), {}  # shown: the latest monitor, in the progress bar
    total_steps = args.epochs * data.n_batches("train", args.batch_size // world, drop_last=True,
                                               world_size=world)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    out_of_steps = lambda: bool(args.max_steps and step >= args.max_steps)
    for epoch in range(start_epoch, args.epochs):
        if out_of_steps():
            break
        _, bar = common.epoch_batches(data, args, epoch, f"epoch {epoch + 1}/{args.epochs}",
                                      rank, world, with_index=True)
        sums = {}
        for x, _, idx in bar:
            z, c = sample_prior(len(x), args.z_dim, args.z_scale, args.categories, device)
            sigma = args.instance_noise * max(0.0, 1 - step / total_steps)  # annealed to 0
            # E, Dec, G, C: one step on the weighted sum, the critics frozen
            with common.autocast(device, args.amp):
                partners = None if neighbours is None else data.images(
                    "train", common.random_neighbours(neighbours, idx, clustering.views))
                terms, t = min_player_terms_step(x, z, c, sigma, clustering, partners)
                loss = min_player_loss(terms, args.alpha, args.beta, args.gamma, args.rec_weight,
                                       args.latent_adv, args.latent_adv_gen, args.cluster_mi)
            check_losses_finite(loss, terms, nets, step, args)
            optimizers["opt"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["opt"].step()
            # Dis, SC and LC: one step each on their own loss (inputs detached, so one
            # backward of the sum gives each its own loss's gradient)
            with common.autocast(device, args.amp):
                critic_losses = critic_terms_step(x, t, sigma)
            for k in ("dis_opt", "sc_opt", "lat_opt"):
                optimizers[k].zero_grad(set_to_none=True)
            critic_loss = critic_losses["dis"] + critic_losses["sc"] + critic_losses["lat"]
            check_losses_finite(critic_loss, critic_losses, nets, step, args, "the critics' loss")
            critic_loss.backward()
            for k in ("dis_opt", "sc_opt", "lat_opt"):
                optimizers[k].step()
            step += 1

            with torch.no_grad():
                gen_acc = (nets["classifier"](t["l_g"].float()).argmax(1) == c).float().mean()
                spread = {k + "_std": t[k].float().std(0).mean() for k in ("l_g", "l_e")}
            common.add_step(sums, {**terms, **critic_losses, **spread, "loss": loss, "gen_acc": gen_acc})
            bar.set_postfix(rec=f"{terms['rec'].item():.3f}", dis=f"{critic_losses['dis'].item():.2f}",
                            cls=f"{terms['cls_enc'].item():.2f}", **shown)
            if out_of_steps():
                break
        stats = common.means(sums)  # this process's batches
        if not main_process:  # evaluation, logs and checkpoints are the main process's
            continue
        last = epoch + 1 == args.epochs or out_of_steps()
        due = common.eval_due(args.eval_every, epoch, last)
        if due:  # the monitor: cluster accuracy
            acc, _, _ = cluster_test_accuracy(nets, data, device)
            stats["cluster_acc"] = acc
            shown["acc"] = f"{acc:.3f}"
        else:  # the encoder is saved recalibrated, watched or not
            common.recalibrate_batchnorm(nets["encoder"], data, device)
        run.log(epoch=epoch + 1, step=step, time=run.elapsed(), **stats)
        if due or last:
            run.plot(["cluster_acc"], {"cluster_acc": acc_random_init})
        if args.no_progress:
            print(f"epoch {epoch + 1}/{args.epochs}  step {step}  rec {stats['rec']:.4f}  "
                  f"dis {stats['dis']:.3f}  cls_enc {stats['cls_enc']:.3f}  lat {stats['lat']:.3f} "
                  + (f"clu_mi {stats['clu_mi']:.3f}  " if "clu_mi" in stats else "")
                  + f"test cluster acc {acc:.4f}")
        run.checkpoint(encoder=nets["encoder"], encoder_cfg=enc_cfg, args=args, data=data,
                       epoch=epoch + 1, step=step,
                       modules={k: m for k, m in nets.items() if k != "encoder"},
                       optimizers=optimizers, extra={"cluster_acc": acc})

    common.finish_distributed()  # the rest is the main process's alone
    if not main_process:
        return run
    acc, pred, labels = cluster_test_accuracy(nets, data, device)
    save_pictures(run, nets, data, args, device)
    run.log(step=step, test_cluster_acc=acc, cluster_acc_random_init=acc_random_init,
            cluster_sizes=np.bincount(pred, minlength=args.categories).tolist())
    common.print_table([{"epochs": args.epochs, "steps": step, "minutes": run.elapsed() / 60,
                         **{k: stats[k] for k in ("rec", "dis", "sc", "lat", "cls_gen", "cls_enc")
                            if k in stats},
                         "test cluster acc": acc, "untrained": acc_random_init}],
                       title=f"\nInfoAE (alpha={args.alpha}, beta={args.beta}, gamma={args.gamma}, "
                             f"latent_adv={args.latent_adv}/{args.latent_adv_gen}, "
                             f"instance_noise={args.instance_noise}, cluster_mi={args.cluster_mi}) "
                             f"on {data.name}: argmax C(E(x)), Hungarian-matched")
    print(f"pictures: {run.path('samples.png')}, reconstructions.png, interpolation.png")
    print(f"checkpoint: {run.path('checkpoint.pt')}  (python eval_probe.py {run.path('checkpoint.pt')})")
    return run


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    common.run_cli(main)
