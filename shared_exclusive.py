"""Shared and exclusive representations of image pairs, by mutual information estimation.

Sanchez, Serrurier, Ortner. "Learning Disentangled Representations via Mutual Information
Estimation", ECCV 2020, arXiv:1912.03915.

Pairs (X, Y) from two domains share some factors. Each domain gets a shared encoder (S, 64-d
in the paper, 16-d and whitened here on colourful digits) and an exclusive encoder (Z, 8-d);
R = (S, Z). Two stages (PAPERS.md §5):

    stage 1  max  b1 [I(C(X); S_Y) + I(C(Y); S_X)] + a1 [I(X; S_Y) + I(Y; S_X)] - l1 |S_X - S_Y|
    stage 2  max  b2 I(C(X); R_X) + a2 I(X; R_X) - c CLUB(S_X; Z_X)   (and the same for Y),
             the shared encoders frozen,

with C(.) the local feature map of the encoder being trained, DIM's estimators (JSD by
default) and critics, and CLUB (Cheng et al., ICML 2020) a variational upper bound of
I(S; Z) that the exclusive encoder minimises directly. The paper drives I(S; Z) down with an
adversary instead, - g D(joint (S_X, Z_X) || shuffled (S_X, Z_X')), D a discriminator that
tells (S, Z) from (S, Z shuffled across the batch), which Z learns to fool: that is
`--adversarial 0.1 --club 0` here (both can be on at once). It removed little of the digit
from Z in this budget (below), hence the default.

    python shared_exclusive.py                     # colourful digits, CPU, 5.3 min on 2 idle cores
    python shared_exclusive.py --dataset colorful-mnist --epochs 20
    python shared_exclusive.py --stage 1           # then: --stage 2 --shared-from RUN/checkpoint.pt
    torchrun --standalone --nproc_per_node=2 shared_exclusive.py --device cpu   # 2 processes

Data: colourful-MNIST (PAPERS.md §5) and the same construction on scikit-learn's bundled
digits (the offline default): X is the white digit on a background colour, Y the digit drawn
in a colour on white, both colours drawn independently from 12 hues (common.PALETTE).

What "shared" means is decided by the pairing, not by the method. The critics of stage 1 must
tell a true pair from a pair mixed across the batch, and only what the two images of a true
pair have in common helps. With `--pairing same-image` (the paper's) both images are drawn
from one MNIST image, so S is everything about that image except colour: digit class *and*
style (slant, thickness), learned without any label. With `--pairing same-class` the two
images are different drawings of one class, so the only thing they share is the class: S
becomes a class code, and the pairing itself is the (weak) supervision: someone had to know
the labels to form the pairs. Pairs with nothing in common would leave S nothing to learn.

Where this script fills gaps in or departs from the paper:
- Stage 2's global/local weights are not given in PAPERS.md; they default to stage 1's
  (local 1, global 0.5). All weights are flags.
- S is standardised per dimension (`--shared-norm batch`: the shared encoder's last layer is
  followed by BatchNorm without affine parameters, common.StandardizedDCGANEncoder). The paper
  does not say how S is scaled. Left unbounded (`--shared-norm none`), the critics' first
  layers absorb any scale of S, so the L1 term is paid off by shrinking S instead of by
  removing colour. Unbounded, after 18 epochs with `--l1 1.0`, S had shrunk to a total
  variance of 0.04 (about 1 at `--l1 0.1`), |S_X - S_Y| was still 0.77x that of unrelated
  pairs, the global critics were at chance, and a linear probe read the background from S_X
  at 100% and the foreground from S_Y at 99%; standardised, the same flags give 25% / 20%
  and 0.045x. (Unit-norm S is evaded too: a constant part took 71% of its squared norm.)
  Standardised S also made the global critics learn far sooner (at epoch 6 the global JSD
  estimate was -0.44 against -1.27 unbounded; -1.39 is chance).
- On colourful digits S is *whitened* over the batch by default (`--shared-norm whiten`,
  common.Whitening: Cholesky whitening with the batch's own statistics, gradients through
  them, running ones in eval), 16-d (`--shared-dim 16`), trained 36 epochs; elsewhere S is
  standardised and 64-d as in the paper (colourful-MNIST is unmeasured here). Standardised
  per dimension, S kept colour in directions of tiny variance (below), where the L1 pull
  costs next to nothing; whitened, every direction has unit variance and costs the same.
  A batch must hold more samples than S has dimensions (checked before training starts).
  Stage 1 alone, seed 0, S_X background / S_Y foreground under the MLP on PCA-whitened
  codes (`--probe whitened-mlp`), digit 0.97 throughout: whitened 16-d S at 36 epochs 0.09 /
  0.12 (seed 1: 0.11 / 0.12); the same at 18 epochs 0.30 / 0.28 (`--l1 10`: 0.37 / 0.38);
  standardised 16-d S at 36 epochs 0.32 / 0.23 (the default probe: 0.11 / 0.09, so it is the
  whitening that removes the colour, not the size); whitened 32-d at 36
  epochs 0.12 / 0.10 (still aligning: |S_X - S_Y| 0.13x unrelated pairs against 0.078x at
  16-d). Not kept: whitened 64-d (batch 128, 18 epochs: 1.00 / 0.93, only part of the 64
  unit-variance directions align in that budget and colour fills the rest); shrinking a
  small batch's covariance toward the running one (the encoder shrank directions faster than
  the average followed); an L1 pull measured in whitened coordinates from a detached
  moving-average covariance (alone, S collapsed to a few directions, digit 0.14; added to
  the plain L1, S pushed everything past its top 3 directions under the metric's floor).
- The L1 term is the L1 norm of S_X - S_Y (summed over the code's dimensions), averaged
  over the batch, with weight 3.0 by default, not the paper's 0.1 (`--l1 0.1` for it; the
  paper's weight goes with its own, unstated, scale of S). On standardised S, 0.1 aligns S_X
  with S_Y (their L1 distance 0.11x that of unrelated pairs after 18 epochs) but leaves a
  colour residual that a linear probe reads: background from S_X 94%, foreground from S_Y
  67% (97% / 78% after 30 epochs: more steps do not remove it). After 18 epochs, 0.3 gives
  62% / 36%, 1.0 gives 25% / 20%, 3.0 gives 19% / 16% (distance 0.045x), the digit at
  90-91% throughout (64-d standardised S, as every number in this bullet). Above 3 it no
  longer clearly helps (MLP probe, seed 0; those defaults gave S_X background 0.22): `--l1 10`
  and `--l1 30` gave 0.16 and 0.19 (digit 0.93, 0.94), within the spread between seeds (0.18
  to 0.22 at 3).
- I(S; Z) is pushed down by CLUB, which the paper does not use (its adversary is
  `--adversarial`, off by default). q(S | Z), a diagonal Gaussian whose mean and log-variance
  are MLPs of Z (200 wide; one per domain, not trained by the encoders' optimiser), is fitted
  by maximum likelihood to the batch's (S, Z) pairs, `--disc-steps 10` Adam steps at
  `--club-lr 1e-3` per encoder step; the exclusive encoder, through Z only (S is frozen),
  minimises CLUB = mean_i [log q(s_i | z_i) - mean_j log q(s_j | z_i)], weight `--club 3`
  for each domain. Why it works where the adversary did not: Z's digit is redundant given S
  (S reads it at 94%), so removing it costs the MI terms nothing, and q regresses S's 64
  numbers from Z, a far denser signal than the discriminator's one bit per sample. q sees Z
  standardised per dimension over the batch: the digit Z keeps sits in dimensions of small
  variance (with CLUB on raw Z, Z_Y's first principal component held 93% of its variance and
  an MLP on the top two components read the digit at 0.17 against 0.43 from all eight), and
  on raw Z q found too little of it. Stage 2 runs 24 epochs on colourful digits (12 before):
  CLUB is still removing digit at epoch 12.
- The adversary's negatives shuffle Z with a random cyclic permutation (a derangement), so no
  sample is paired with its own Z by chance. Its loss is the standard GAN cross-entropy; the
  exclusive encoder gets the non-saturating form (make the joint look shuffled), weight 0.1
  (the paper's) when `--adversarial 0.1` turns it on.
  The discriminator (an MLP 1000-200-1 as DIM's prior discriminator) takes `--disc-steps 10`
  steps per encoder step, each on a new shuffle: stepping once, it stayed at chance (its
  loss 2.70 of 2.77 for two discriminators) and never pushed on Z; trained apart on the final
  features for 1000 steps, the same discriminator tells joint from shuffled at 69%.
- Local MI uses DIM's encode-and-dot-product critic on the encoder's 8x8 map (`--critic
  concat` for concat-and-convolve), global MI DIM(G)'s critic on the last conv map; negatives
  are all other images of the batch. Stage 2's local map comes from the exclusive encoder.
- Colours and same-class partners are drawn once with a fixed seed (common.PAIR_DATA_SEED):
  every run and every evaluation sees the same pairs.
- `--max-steps` caps the steps of *each* stage (smoke tests run both stages).
- Evaluation: a classifier on frozen S_X, S_Y, Z_X, Z_Y (test split, trained on the train
  split) for digit, background and foreground colour; `--probe mlp` (one 200-unit hidden
  layer; default, since "carries no colour" should not depend on colour being linear) or
  `--probe linear`. Default epochs: 36 for stage 1 and 24 for stage 2 on colourful digits
  (1437 training pairs, 22 steps an epoch), 20 per stage on colourful-MNIST (the paper's
  count is not in PAPERS.md).
- Dot critic embedding 256 wide by default (DIM's 2048 is a flag away): on a CPU the critics
  would otherwise cost as much as the encoders.
- Under torchrun, `--batch-size` is the global batch, split evenly over the processes, each
  reading its own shard of the data. The MI critics score every process's samples (negatives
  gathered with common.gather_batch); the S-Z adversary shuffles Z within each process's own
  batch (a product-of-marginals sample needs no other rows), and CLUB scores and fits q on
  each process's own batch (q's gradients averaged like any module's). BatchNorm statistics are per
  process. Rank 0 alone prints, writes the run folder and evaluates.

Measured (`python shared_exclusive.py --seed S`, the defaults: colourful digits, whitened
16-d S, 36 + 24 epochs; test accuracy, chance: digit 0.10, colours 0.083; 9.0-10.4 min a run,
one thread each on 2 CPU cores shared with another job; seed 0 again with 2 threads on the
idle CPU: 5.3 min, default probe S_X background 0.09, S_Y foreground 0.11, Z_X / Z_Y digit
0.27 / 0.17, the thread count changing the rounding). Cells are digit / background /
foreground; "mlp" is the default probe, "white" the MLP on PCA-whitened codes (`--probe
whitened-mlp`, which reads what lies in directions of small variance; its test hides a label
in a direction 500x smaller than the rest):

    seed  probe  S_X             S_Y             Z_X             Z_Y
    0     mlp    0.97 0.09 0.09  0.97 0.10 0.13  0.21 1.00 0.08  0.14 0.10 1.00
          white  0.97 0.09 0.09  0.97 0.09 0.12  0.47 1.00 0.06  0.55 0.10 1.00
    1     mlp    0.97 0.09 0.07  0.98 0.08 0.09  0.26 1.00 0.08  0.18 0.09 1.00
          white  0.97 0.11 0.09  0.97 0.07 0.12  0.54 1.00 0.09  0.53 0.10 1.00
    2     mlp    0.96 0.10 0.10  0.96 0.09 0.09  0.24 1.00 0.09  0.20 0.07 1.00
          white  0.97 0.09 0.08  0.97 0.08 0.09  0.58 1.00 0.07  0.49 0.08 1.00

S carries the digit (0.96-0.97) and no colour to either probe (0.07-0.13 against 0.083).
Z carries its own colour (1.00) and nothing of the other image, but not only its colour:
the default probe reads the digit from Z at 0.14-0.26 and the whitened one at 0.47-0.58,
so the paper's "Z predicts its colour and not the digit" is not reached here. With a 16-d
S, R = (S, Z) may hold less of the image than with 64-d, and the stage-2 MI terms push what
S lacks (style, which goes with the digit) into Z; CLUB removes from Z only what S holds. A
32-d whitened S did not help Z (seed 0, default probe: Z_X / Z_Y digit 0.29 / 0.17, S_X
background 0.15), so the size is not the whole story.
The paper's adversary instead of CLUB did worse on the old 64-d S (`--adversarial 0.1 --club
0 --exclusive-epochs 12`, default probe): Z_X / Z_Y digit 0.40 / 0.56 and 0.45 / 0.49 (seeds
0, 1), where CLUB gave 0.11 / 0.14.

The previous defaults (64-d S standardised per dimension, 18 stage-1 epochs) gave, seeds 0 /
1 / 2, default probe: S_X background 0.22 / 0.18 / 0.18, S_Y foreground 0.10 / 0.10 / 0.11,
Z_X digit 0.11 / 0.11 / 0.13, Z_Y digit 0.14 / 0.14 / 0.25; whitened probe (seeds 0 and 1):
S_X background 0.46-0.49, S_Y foreground 0.35-0.42, Z_X / Z_Y digit 0.43 / 0.52 (seed 0).
In seed 0's standardised S_X three principal directions held 99% of the variance
(eigenvalues 36.8, 21.0, 5.7, then 0.39 down to 0.0003): an MLP on the top 8 components read
the digit at 0.92 and the background at 0.10, on the bottom 56 the background at 0.44. What
was tried on that S before whitening it (stage 1 alone, seed 0 unless said; default probe
S_X digit / background, whitened S_X background): a squared-L2 pull at weight 30 on top of
the L1, 0.96 / 0.20, 0.45; a Barlow Twins cross-correlation term between S_X and S_Y, 0.95 /
0.21, 0.42; `--shared-dim 8`, 0.88 / 0.15, 0.25; a CLUB bound of what S_X - S_Y shares with
S_X and with S_Y (each code then lowered it by taking in its own colour: 0.93 / 0.78); `--lr
2e-4` (stage 1), 0.91 / 0.08, 0.36 (seed 1: digit 0.89); `--epochs 36`, 0.93 / 0.09, 0.41
(seed 1: 0.92 / 0.08, 0.44). The last two passed the default probe by squeezing S's variance
into fewer directions, not by removing colour.
Stage 2 on the old seed-0 stage 1 (`--stage 2 --shared-from RUN/checkpoint.pt --probe
whitened-mlp`, one thread, 4.4 min each), Z_X / Z_Y digit under the whitened probe, colours
0.95-1.00 throughout: those defaults 0.36 / 0.49; `--club 10` 0.49 / 0.51; q reading Z
whitened over the batch instead of standardised (code not kept) 0.59 / 0.72;
`--exclusive-dim 3` 0.22 / 0.20. On the new seed-0 stage 1 (whitened probe): the defaults 0.47
/ 0.55; `--club 10` 0.53 / 0.51; `--exclusive-global 0` 0.51 / 0.52; `--exclusive-local 0`
0.64 / 0.59; `--exclusive-norm whiten` (Z whitened like S) 0.50 / 0.49; `--exclusive-dim 3`
0.28 / 0.29, colours 1.00 / 0.99 (whitened too: 0.29 / 0.29). A Z just large enough for its
colour is the surest lever found; the default stays at the paper's 8.

Why CLUB leaves the digit in Z: q is evaded, not beaten. On that stage 1 (defaults, one
thread) CLUB's online estimate falls to 0.07-0.13 by epoch 12 (0.06-0.09 at the end) and q's
fit loss sits at the no-information level (about 8.0 a domain for a white 16-d S) from epoch
12 on. A fresh q trained 3000 steps on the final training codes still finds S in Z on the
test codes: 0.4 nats on standardised Z, 1.6 (Z_X) and 2.2 (Z_Y) on PCA-whitened Z. Z_X's
covariance eigenvalues are 57 and 8.7 (the colour), then 0.33 down to 0.0026: the digit sits
in six small directions. An untrained exclusive encoder already gives Z digit 0.49 (default
probe) / 0.47 (whitened), so under the whitened probe training never gets below that level.
It moves the digit into small directions instead of removing it. Tried on the same stage 1
(code not kept; Z_X / Z_Y digit, default probe then whitened; colours 0.99-1.00 in every row;
these defaults: 0.19 / 0.19, 0.48 / 0.52):

    q fitted on draws from the last 22 batches, not the current one   0.21 / 0.14   0.47 / 0.51
    q on Z whitened by running (detached) statistics                  0.37 / 0.57   0.44 / 0.59
      same, --disc-steps 30                                           0.35 / 0.42   0.49 / 0.46
      same, with the 22-batch replay                                  0.53 / 0.50   0.59 / 0.57
    CLUB against the other image's shared-encoder fc features         0.12 / 0.12   0.52 / 0.57
    Z standardised, Gaussian noise 0.5 added in training              0.55 / 0.59   0.56 / 0.62
      same, noise 1.0                                                 0.61 / 0.62   0.61 / 0.68
    exclusive encoder's output layer initialised at zero              0.36 / 0.30   0.57 / 0.56
    stage-2 critics on the frozen shared encoder's maps               0.21 / 0.20   0.47 / 0.59
    --exclusive-epochs 72                                             0.38 / 0.45   0.55 / 0.57

The cross target gave the best default-probe row by pushing the digit into directions of a
few millionths of the colour's variance (offline q on whitened Z: 2.3 / 2.7 nats). Like the
squeezed S above, that hides the digit from the default probe and does not remove it. Noise
closes the small directions to the critics and to q alike, so nothing removes what lies in
them. Longer training lets the MI terms put more of the digit back in.

Stage 2 alone on one stage 1 (`--stage 1`, seed 0, 4.1 min), with `--stage 2 --shared-from
RUN/checkpoint.pt` and the flags below (12 epochs unless said; minutes on the shared CPU):

    stage 2                                                 Z_X digit/bg   Z_Y digit/fg   min
    --adversarial 0.1 --club 0 (the paper's, old defaults)  0.49  1.00     0.58  1.00     3.1
    --club 0 and an HSIC penalty, weight 100 (below)        0.49  1.00     0.53  1.00     2.8
    --club 1 --club-lr 1e-4, q on raw Z                     0.41  1.00     0.63  0.99     2.3
    --club 1 --club-lr 1e-3, q on raw Z                     0.26  1.00     0.43  0.99     2.3
      same, --club 5                                        0.28  1.00     0.41  0.99     2.3
      same, --club-lr 3e-3                                  0.31  1.00     0.45  0.99     2.3
      same, q on Z whitened over the batch (Cholesky)       0.34  1.00     0.53  1.00     2.3
      same, q on Z standardised per dimension (kept)        0.20  1.00     0.28  0.96     2.5
    --club 3 (q on standardised Z here and below)           0.18  1.00     0.29  0.98     2.3
      same, --lr 3e-4 (stage 2 only)                        0.13  1.00     0.33  0.96     2.2
      same, --adversarial 0.1 (both terms)                  0.19  1.00     0.24  0.98     2.5
      same, --exclusive-epochs 24 (the defaults)            0.13  1.00     0.15  0.98     4.1

(`--adversarial 0` in every row but the first and "both".) An HSIC penalty (Gretton et al.
2005: Gaussian kernels on S and on Z, each standardised per dimension, median-distance
bandwidths, minimised by the exclusive encoder; tried, not kept) did nothing: its batch
estimate sat at the independence floor (0.0022, as with Z shuffled) from the first epoch
while the probe read the digit at 0.5. On the 360 test pairs too, those kernels saw no
dependence (0.0005 against 0.0004 shuffled; on test batches of 64, Z bandwidths 4-100x
smaller gave at most 1.2x the shuffled value): the digit is a small variation of Z within
each colour, which a kernel whose distances the colour dominates does not see, so the
penalty had nothing to push on.

Before CLUB, with the paper's adversary (`--adversarial 0.1 --club 0`, 12 epochs of stage 2
unless said): a randomly initialised exclusive encoder's Z already gives 0.50 / 0.51 (MLP
probe), so Z has to be pushed off the digit, not merely left untaught. On one stage 1
(`--l1 1.0`), stage 2 with the discriminator stepping once for 6 epochs gave Z_X / Z_Y
digit 0.59 / 0.67, ten steps for 12 epochs 0.45 / 0.56, and ten steps with the GAN weight
at 1.0 for 10 epochs 0.52 / 0.56: the adversary as set up here removes little of it in the
steps this budget allows. What did remove most of it is Z's size: stage 2 alone on the
stage 1 of an idle run (3.2 min; Z_X / Z_Y digit 0.42 / 0.49 with 8 dims), with
`--stage 2 --shared-from RUN/checkpoint.pt --exclusive-dim K`, gave 0.19 / 0.25 (K = 3),
0.18 / 0.30 (K = 3, seed 1) and 0.20 / 0.21 (K = 2), colours still 1.00 every time; with
`--exclusive-local 0` instead (8 dims, global MI only) 0.56 / 0.53. A colour needs only a
few dimensions, and the spare ones of an 8-d Z pick up digit cues the adversary does not
remove. Z stays at the paper's 8 dimensions; CLUB removes the digit without shrinking it.
A colour code need not carry the digit: an MLP on an image's mean RGB (3 numbers) reads the
digit at 0.125 and its own colour at 1.00. On the same stage 1, stage 2 alone with the
adversary gave Z_X / Z_Y digit 0.52 / 0.59 in 12 epochs and 0.41 / 0.41 in 36
(`--exclusive-epochs 36`, 8 min), the discriminator's loss near chance (2.4-2.6 of 2.77)
throughout; a discriminator with 10x the learning rate, or one scoring all N x N (S, Z)
pairs as negatives instead of one shuffle, with the GAN weight at 1.0, gave 0.40 / 0.40 and
0.40 / 0.45 in 12 epochs (experiments, not flags). The online discriminator, not the
objective, is what falls short: it never tells the joint from the shuffled well enough to
push Z off the digit. CLUB's q, regressing S from Z, does.
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

SCRIPT = "shared_exclusive"
REPS = ("SX", "SY", "ZX", "ZY")  # representation names used in metric keys (acc_SX_digit ...)
# the encoder behind each --shared-norm / --exclusive-norm
NORM_ARCH = {"batch": "dcgan-std", "whiten": "dcgan-white", "none": "dcgan"}


def parse_args(argv=None):
    # conflict_handler="resolve": this script replaces common's --dataset (pair datasets),
    # --epochs and --max-steps (per stage) while keeping their spelling.
    p = common.ArgumentParser(description="Shared and exclusive representations by MI estimation",
                              conflict_handler="resolve")
    common.add_common_args(p, epochs=None, batch_size=64, lr=1e-4)
    p.add_argument("--dataset", default="colorful-digits", choices=common.PAIR_DATASETS,
                   help="pairs: colourful bundled digits (offline) or colourful MNIST")
    p.add_argument("--epochs", type=common.positive_int, default=None,
                   help="epochs of stage 1, and of stage 2 unless --exclusive-epochs is given "
                        "(default: 36 on colorful-digits, 20 on colorful-mnist)")
    p.add_argument("--max-steps", type=common.positive_int, default=None,
                   help="stop each stage after this many optimisation steps (smoke tests)")
    p.add_argument("--pairing", default="same-image", choices=common.PAIRINGS,
                   help="X and Y from one image (paper) or from two images of one class")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"],
                   help="1: shared encoders, 2: exclusive encoders (needs --shared-from), both")
    p.add_argument("--exclusive-epochs", type=common.positive_int, default=None,
                   help="epochs of stage 2 (default: --epochs when given, else 24 on "
                        "colorful-digits and 20 on colorful-mnist)")
    p.add_argument("--shared-from", default=None, metavar="PATH",
                   help="checkpoint.pt of a run whose stage 1 is done (for --stage 2)")
    p.add_argument("--loss", default="jsd", choices=sorted(common.BOUNDS),
                   help="MI estimator for every MI term: jsd (paper), infonce or dv")
    p.add_argument("--critic", default="dot", choices=["dot", "concat"],
                   help="local critic: encode-and-dot-product or concat-and-convolve")
    p.add_argument("--local-layer", default="c2", choices=list(common.DCGANEncoder.maps),
                   help="encoder tap giving the local map C(x)")
    p.add_argument("--shared-dim", type=common.positive_int, default=None,
                   help="size of S (default: 16 on colorful-digits, 64, the paper's, elsewhere)")
    p.add_argument("--exclusive-dim", type=common.positive_int, default=8, help="size of Z")
    p.add_argument("--shared-local", type=common.nonneg_float, default=1.0,
                   help="stage 1 weight of the cross local MI I(C(X); S_Y) + I(C(Y); S_X)")
    p.add_argument("--shared-global", type=common.nonneg_float, default=0.5,
                   help="stage 1 weight of the cross global MI I(X; S_Y) + I(Y; S_X)")
    p.add_argument("--l1", type=common.nonneg_float, default=3.0,
                   help="stage 1 weight of the L1 term |S_X - S_Y| (paper: 0.1, on an S of "
                        "unstated scale; see the docstring)")
    p.add_argument("--exclusive-local", type=common.nonneg_float, default=1.0,
                   help="stage 2 weight of the local MI I(C(X); (S_X, Z_X)) (and for Y)")
    p.add_argument("--exclusive-global", type=common.nonneg_float, default=0.5,
                   help="stage 2 weight of the global MI I(X; (S_X, Z_X)) (and for Y)")
    p.add_argument("--adversarial", type=common.nonneg_float, default=0.0,
                   help="stage 2 weight of the paper's GAN loss that drives I(S; Z) down (paper: 0.1; "
                        "off by default, --club does it here; see the docstring)")
    p.add_argument("--club", type=common.nonneg_float, default=3.0,
                   help="stage 2 weight of CLUB's upper bound of I(S; Z) (not in the paper; see the "
                        "docstring)")
    p.add_argument("--club-lr", type=float, default=1e-3,
                   help="Adam learning rate of CLUB's q(S | Z), stepped --disc-steps times per "
                        "encoder step")
    p.add_argument("--shared-norm", default=None, choices=list(NORM_ARCH),
                   help="S whitened over the batch (common.Whitening; default on colorful-digits), "
                        "standardised per dimension (BatchNorm without affine; default elsewhere) "
                        "or left unbounded")
    p.add_argument("--exclusive-norm", default="none", choices=["none", "whiten"],
                   help="Z left as the encoder gives it or whitened over the batch like S")
    p.add_argument("--disc-steps", type=common.positive_int, default=10,
                   help="steps of the S-Z discriminator D (each on a new shuffle of the batch) and "
                        "of CLUB's q(S | Z) per encoder step (stage 2)")
    p.add_argument("--embed-dim", type=common.positive_int, default=256,
                   help="dot critic embedding width (DIM's 2048 is slow on a CPU)")
    p.add_argument("--probe", default="mlp", choices=["mlp", "linear", "whitened-mlp"],
                   help="classifier of the evaluation table (whitened-mlp: the MLP on PCA-whitened "
                        "codes, which reads what lies in directions of small variance)")
    p.add_argument("--n-queries", type=common.positive_int, default=4,
                   help="query images per domain in the nearest-neighbour PNG")
    args = p.parse_args(argv)
    if args.exclusive_epochs is None:  # --epochs, when given, sets both stages
        args.exclusive_epochs = args.epochs or {"colorful-digits": 24}.get(args.dataset, 20)
    if args.epochs is None:
        args.epochs = {"colorful-digits": 36}.get(args.dataset, 20)
    digits = args.dataset == "colorful-digits"
    if args.shared_dim is None:
        args.shared_dim = 16 if digits else 64
    if args.shared_norm is None:
        args.shared_norm = "whiten" if digits else "batch"
    if args.stage == "2" and not (args.shared_from or args.resume):
        p.error("--stage 2 trains on frozen shared encoders: pass --shared-from RUN/checkpoint.pt "
                "of a run that did stage 1")
    if args.shared_from and args.stage != "2":
        p.error("--shared-from is only used with --stage 2")
    if args.shared_local == args.shared_global == 0 and args.stage != "2":
        p.error("--shared-local and --shared-global are both 0: stage 1 would maximise nothing")
    return args


# ----------------------------------------------------------------------------------------
# The method: cross MI (stage 1), MI of R = (S, Z) plus the S-Z adversary (stage 2)
# ----------------------------------------------------------------------------------------
class SZDiscriminator(common.PriorDiscriminator):
    """Tells the joint (S, Z) (logit > 0) from (S, Z shuffled across the batch); the same
    1000-200-1 MLP as DIM's prior discriminator, on the concatenation."""

    def forward(self, s, z):
        return super().forward(torch.cat([s, z], 1).float())


def shuffle_across_batch(z, generator=None):
    """Z rows moved along a random cycle: row i gets the Z of another sample, never its own,
    so (S, shuffled Z) is a draw from the product of marginals with no pair left intact."""
    n = z.shape[0]
    order = torch.randperm(n, generator=generator).to(z.device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(1)
    return z[perm]


def sz_disc_loss(disc, s, z, generator=None):
    """Discriminator side: joint (S, Z) is labelled 1, shuffled 0 (encoders detached)."""
    s, z = s.detach(), z.detach()
    return (F.softplus(-disc(s, z)).mean()
            + F.softplus(disc(s, shuffle_across_batch(z, generator))).mean())


def sz_encoder_loss(disc, s, z):
    """Exclusive encoder side (non-saturating): make the joint be classified as shuffled."""
    return F.softplus(disc(s, z)).mean()


class SZPredictor(nn.Module):
    """CLUB's variational net q(S | Z) (Cheng et al. 2020): a diagonal Gaussian over S whose
    mean and log-variance (bounded by tanh, as in CLUB's code) are MLPs of Z."""

    def __init__(self, z_dim, s_dim, hidden=200):
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, s_dim))
        self.logvar = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, s_dim),
                                    nn.Tanh())

    def forward(self, z):
        # each dimension standardised over the batch: the digit that Z still carries lies in
        # dimensions of small variance (the colour takes most of it), which the evaluation's
        # probe standardises too; on raw Z, q read too little of it to push it out
        z = z.float()
        z = (z - z.mean(0)) / z.std(0).clamp_min(1e-6)
        return self.mean(z), self.logvar(z)


def club_fit_loss(q, s, z):
    """q's own loss: the negative log-likelihood of S given Z (encoders detached)."""
    mean, logvar = q(z.detach())
    return (((s.detach().float() - mean) ** 2) / logvar.exp() + logvar).sum(1).mean() / 2


def club(q, s, z):
    """CLUB's upper bound of I(S; Z): log q(s_i | z_i) minus its mean over every s_j of the
    batch; about 0 when q finds nothing of S in Z. The exclusive encoder minimises it
    through Z (q's weights are stepped only by club_fit_loss)."""
    mean, logvar = q(z)  # (N, dim_S) each
    s = s.float()
    positive = -((s - mean) ** 2 / (2 * logvar.exp())).sum(1)  # (N,)
    # (N, N, dim_S): z_i's prediction scored against every s_j, averaged over j
    negative = -((s[None, :, :] - mean[:, None, :]) ** 2 / (2 * logvar.exp()[:, None, :])).sum(2).mean(1)
    return (positive - negative).mean()


def build_networks(args, image_shape, device):
    """Encoders and critics of both stages (all built, so every checkpoint has every key)."""
    shared_cfg = common.encoder_config(NORM_ARCH[args.shared_norm], image_shape, args.shared_dim)
    excl_cfg = common.encoder_config(NORM_ARCH[args.exclusive_norm], image_shape, args.exclusive_dim)
    enc = {f"shared_{d}": common.build_encoder(shared_cfg) for d in "xy"}
    enc.update({f"exclusive_{d}": common.build_encoder(excl_cfg) for d in "xy"})
    shapes = common.tap_shapes(enc["shared_x"], image_shape)
    local_ch, conv_dim = shapes[args.local_layer][0], math.prod(shapes["conv"])

    def local_critic(dim):
        return (common.DotCritic(dim, local_ch, args.embed_dim) if args.critic == "dot" else
                common.ConcatCritic(dim, local_ch))

    r_dim = args.shared_dim + args.exclusive_dim
    critics = {}
    for d in "xy":
        # stage 1: scores the *other* domain's S against this domain's maps
        critics[f"shared_local_critic_{d}"] = local_critic(args.shared_dim)
        critics[f"shared_global_critic_{d}"] = common.GlobalCritic(conv_dim, args.shared_dim)
        critics[f"exclusive_local_critic_{d}"] = local_critic(r_dim)
        critics[f"exclusive_global_critic_{d}"] = common.GlobalCritic(conv_dim, r_dim)
        critics[f"sz_disc_{d}"] = SZDiscriminator(r_dim)
        critics[f"sz_club_{d}"] = SZPredictor(args.exclusive_dim, args.shared_dim)
    for m in (*enc.values(), *critics.values()):
        m.to(device)
    return enc, critics, {"shared": shared_cfg, "exclusive": excl_cfg}


def shared_step(x, y, enc, critics, bound, args, gather=None):
    """Stage 1 loss: cross MI (local and global, both directions) and the L1 term.
    `gather` (common.gather_batch under torchrun) draws the critics' negatives from every
    process's batch."""
    out_x, out_y = enc["shared_x"](x), enc["shared_y"](y)
    s_x, s_y = out_x["y"], out_y["y"]  # (N, shared_dim): S_X, S_Y
    logs = {}
    loss = torch.zeros((), device=x.device)
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


def exclusive_step(x, y, enc, critics, bound, args, gather=None):
    """Stage 2 loss: MI of R = (S, Z) with the image, and the adversary on (S, Z).
    Returns the (S, Z) of each domain for the discriminator's own step."""
    logs, sz = {}, {}
    loss = torch.zeros((), device=x.device)
    for d, img in (("x", x), ("y", y)):
        with torch.no_grad():  # frozen shared encoder (kept in eval mode by the caller)
            s = enc[f"shared_{d}"](img)["y"]
        out = enc[f"exclusive_{d}"](img)
        z = out["y"]  # (N, exclusive_dim)
        r = torch.cat([s, z], 1)  # R = (S, Z)
        if args.exclusive_local > 0:
            critic = critics[f"exclusive_local_critic_{d}"]
            logs[f"local_mi_{d}"] = bound(critic(r, out[args.local_layer], gather=gather))
            loss = loss - args.exclusive_local * logs[f"local_mi_{d}"]
        if args.exclusive_global > 0:
            critic = critics[f"exclusive_global_critic_{d}"]
            logs[f"global_mi_{d}"] = bound(critic(r, out["conv"], gather=gather))
            loss = loss - args.exclusive_global * logs[f"global_mi_{d}"]
        if args.adversarial > 0:
            logs[f"sz_gen_{d}"] = sz_encoder_loss(critics[f"sz_disc_{d}"], s, z)
            loss = loss + args.adversarial * logs[f"sz_gen_{d}"]
        if args.club > 0:  # I(S; Z) down through CLUB's upper bound
            logs[f"club_{d}"] = club(critics[f"sz_club_{d}"], s, z)
            loss = loss + args.club * logs[f"club_{d}"]
        sz[d] = (s, z)
    return loss, logs, sz


# ----------------------------------------------------------------------------------------
# Evaluation: classifiers on frozen S and Z, nearest neighbours
# ----------------------------------------------------------------------------------------
def representations(enc, pair, device, stages_done):
    """{rep: (train features, test features)} for S_X, S_Y and, after stage 2, Z_X, Z_Y."""
    reps = {}
    for rep in REPS:
        if rep[0] == "Z" and 2 not in stages_done:
            continue
        d = rep[1].lower()
        encoder = enc[("shared_" if rep[0] == "S" else "exclusive_") + d]
        data = pair.domain(d)
        tr, _ = common.extract_features(encoder, data, "train", ("y",), device=device)
        te, _ = common.extract_features(encoder, data, "test", ("y",), device=device)
        reps[rep] = (tr["y"], te["y"])
    return reps


def probe_accuracy(kind, train_x, train_y, test_x, test_y, seed):
    if kind == "linear":
        return common.linear_probe(train_x, train_y, test_x, test_y)
    from sklearn.decomposition import PCA
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    # whitened-mlp rescales every principal direction to unit variance first, so what lies in
    # directions of small variance weighs as much as the rest (S keeps colour there: docstring)
    scale = PCA(whiten=True) if kind == "whitened-mlp" else StandardScaler()
    clf = make_pipeline(scale, MLPClassifier((200,), alpha=1e-3, max_iter=500, random_state=seed))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def evaluation_table(reps, pair, kind, seed):
    """Rows of accuracy per representation and target, and the flat metrics dict."""
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits
    rows, metrics = [], {}
    tr_lab, te_lab = pair.train_labels.cpu().numpy(), pair.test_labels.cpu().numpy()
    for rep, (tr, te) in reps.items():
        row = {"representation": rep[0] + "_" + rep[1]}
        for col, target in enumerate(common.PAIR_LABELS):
            # one BLAS thread: these fits are small, and threads spinning on a busy CPU made
            # them up to 50x slower
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter("ignore", ConvergenceWarning)
                acc = probe_accuracy(kind, tr, tr_lab[:, col], te, te_lab[:, col], seed)
            row[target] = acc
            metrics[f"acc_{rep}_{target}"] = acc
        rows.append(row)
    return rows, metrics


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
def load_shared(path, enc, args):
    """Stage 2 alone: take both shared encoders from a run that did stage 1."""
    ckpt = common.load_checkpoint(path)
    extra = ckpt.get("extra", {})
    if ckpt["script"] != SCRIPT or not extra.get("shared_epochs_done"):
        raise UserError(f"{path} is not a {SCRIPT} checkpoint with stage 1 done; run --stage 1 first")
    if ckpt["dataset"] != args.dataset or extra.get("pairing") != args.pairing:
        raise UserError(f"{path} was trained on {ckpt['dataset']} ({extra.get('pairing')}); pass "
                        f"the same --dataset and --pairing to stage 2")
    try:
        enc["shared_x"].load_state_dict(ckpt["encoder"])
        enc["shared_y"].load_state_dict(ckpt["modules"]["shared_y"])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path} does not match these flags ({str(e).splitlines()[0][:120]}); "
                        "use the --shared-dim and --shared-norm of the stage 1 run") from None
    return int(extra["shared_epochs_done"])


def pair_extra(args, domain, part, shared_done):
    """What eval_probe needs besides the dataset name to rebuild an encoder's data:
    common.load_pair_domain(ckpt["dataset"], extra["pair_domain"], pairing=..., seed=...)."""
    return {"pair_domain": domain, "part": part, "pairing": args.pairing,
            "pair_seed": common.PAIR_DATA_SEED, "shared_epochs_done": shared_done}


def save_encoders(run, enc, cfgs, parts, args, pair, epoch, step, shared_done):
    """shared_x.pt, shared_y.pt and/or exclusive_x.pt, exclusive_y.pt in the common format."""
    for part in parts:
        for d in "xy":
            common.save_checkpoint(run.path(f"{part}_{d}.pt"), script=SCRIPT, encoder=enc[f"{part}_{d}"],
                                   encoder_cfg=cfgs[part], args=args, data=pair.domain(d), epoch=epoch,
                                   step=step, extra=pair_extra(args, d, part, shared_done))


def train(args):
    device, rank, world = common.init_distributed(args.device)  # world > 1 under torchrun
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must divide by the {world} processes")
    for part, norm, dim in (("shared", args.shared_norm, args.shared_dim),
                            ("exclusive", args.exclusive_norm, args.exclusive_dim)):
        if norm == "whiten" and args.batch_size // world <= dim:
            raise UserError(f"--{part}-norm whiten needs more than --{part}-dim {dim} samples per "
                            f"process: raise --batch-size (now {args.batch_size} over {world})")
    common.seed_everything(args.seed)
    pair = common.load_pair_data(args.dataset, args.data_root, device, args.pairing)
    enc, critics, cfgs = build_networks(args, pair.image_shape, device)
    shared_done = load_shared(args.shared_from, enc, args) if args.shared_from else 0
    stage1 = [p for k, m in {**enc, **critics}.items() if k.startswith("shared") for p in m.parameters()]
    stage2 = [p for k, m in {**enc, **critics}.items() if k.startswith("exclusive") for p in m.parameters()]
    optimizers = {"shared_opt": common.adam(stage1, lr=args.lr),
                  "exclusive_opt": common.adam(stage2, lr=args.lr),
                  "club_opt": common.adam([p for d in "xy" for p in critics[f"sz_club_{d}"].parameters()],
                                               lr=args.club_lr),
                  "disc_opt": common.adam([p for d in "xy" for p in critics[f"sz_disc_{d}"].parameters()],
                                               lr=args.lr)}
    # the epoch plan: (stage, epoch within the stage); a checkpoint's epoch counts plan entries
    plan = ([(1, e) for e in range(args.epochs)] if args.stage in ("1", "both") else []) + \
           ([(2, e) for e in range(args.exclusive_epochs)] if args.stage in ("2", "both") else [])
    modules = {"encoder": enc["shared_x"], **{k: m for k, m in enc.items() if k != "shared_x"}, **critics}
    run_dir, start, step = common.resume_state(args, SCRIPT, modules, optimizers)
    if args.resume:
        shared_done = common.load_checkpoint(args.resume)["extra"].get("shared_epochs_done", 0)
    run = common.Run(SCRIPT, args, run_dir)
    if args.shared_from and not args.resume:  # the run folder holds every encoder it used
        save_encoders(run, enc, cfgs, ["shared"], args, pair, 0, 0, shared_done)
    bound = common.BOUNDS[args.loss]
    # DDP / compiled views for training; the plain modules are what gets saved. Stage 2 runs
    # the frozen shared encoders as plain modules (no gradient to synchronise).
    fwd = {k: common.maybe_compile(common.wrap_ddp(m, device), args.compile)
           for k, m in {**enc, **critics}.items()}
    frozen = {**fwd, "shared_x": enc["shared_x"], "shared_y": enc["shared_y"]}
    gather = common.gather_batch  # negatives from every process's batch (identity on one)
    per_rank = args.batch_size // world  # --batch-size is the global batch
    if rank == 0:
        print(f"run folder: {run.dir}  device: {device}  data: {pair.name} ({pair.pairing}) "
              f"{len(pair.train_x)} train / {len(pair.test_x)} test pairs  processes: {world}")

    t0 = time.time()
    stage_steps = {1: 0, 2: 0}
    stats = {}
    for i in range(start, len(plan)):
        stage, epoch = plan[i]
        n_epochs = args.epochs if stage == 1 else args.exclusive_epochs
        if args.max_steps and stage_steps[stage] >= args.max_steps:
            continue
        for d in "xy":  # stage 2 keeps the shared encoders frozen, BatchNorm statistics included
            enc[f"shared_{d}"].train(stage == 1).requires_grad_(stage == 1)
            enc[f"exclusive_{d}"].train(stage == 2)
        opt = optimizers["shared_opt" if stage == 1 else "exclusive_opt"]
        gen = torch.Generator().manual_seed(args.seed * 100003 + i)  # same order on resume
        sums, n_steps = {}, 0
        bar = common.progress(pair.batches("train", per_rank, shuffle=True, generator=gen,
                                           drop_last=True, rank=rank, world_size=world),
                              total=pair.n_batches("train", per_rank, drop_last=True, world_size=world),
                              desc=f"stage {stage} epoch {epoch + 1}/{n_epochs}",
                              disable=args.no_progress or rank > 0)
        for x, y, _ in bar:
            with common.autocast(device, args.amp):
                if stage == 1:
                    loss, logs, sz = shared_step(x, y, fwd, fwd, bound, args, gather)
                else:
                    loss, logs, sz = exclusive_step(x, y, frozen, fwd, bound, args, gather)
            common.check_finite(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # the S-Z discriminator's own steps; Z is shuffled within each process's batch (a
            # product-of-marginals sample needs no other process's rows)
            for _ in range(args.disc_steps if stage == 2 and args.adversarial > 0 else 0):
                d_loss = sum(sz_disc_loss(fwd[f"sz_disc_{d}"], *sz[d], gen) for d in "xy")
                optimizers["disc_opt"].zero_grad(set_to_none=True)
                d_loss.backward()
                optimizers["disc_opt"].step()
                logs["sz_disc"] = d_loss
            for _ in range(args.disc_steps if stage == 2 and args.club > 0 else 0):  # CLUB's q
                q_loss = sum(club_fit_loss(fwd[f"sz_club_{d}"], *sz[d]) for d in "xy")
                optimizers["club_opt"].zero_grad(set_to_none=True)
                q_loss.backward()
                optimizers["club_opt"].step()
                logs["club_fit"] = q_loss
            step += 1
            stage_steps[stage] += 1
            n_steps += 1
            logs["loss"] = loss
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", mi=f"{logs.get('local_mi_x', loss).item():.3f}")
            if args.max_steps and stage_steps[stage] >= args.max_steps:
                break
        stats = {k: v / max(n_steps, 1) for k, v in sums.items()}
        if stage == 1:
            shared_done = epoch + 1
        run.log(stage=stage, epoch=epoch + 1, step=step, time=time.time() - t0, **stats)
        common.save_checkpoint(run.path("checkpoint.pt"), script=SCRIPT, encoder=enc["shared_x"],
                               encoder_cfg=cfgs["shared"], args=args, data=pair.domain("x"),
                               epoch=i + 1, step=step, modules={k: m for k, m in modules.items() if k != "encoder"},
                               optimizers=optimizers, extra=pair_extra(args, "x", "shared", shared_done))
        # this stage's encoders, one checkpoint each: shared_*.pt stop changing after stage 1
        save_encoders(run, enc, cfgs, ["shared" if stage == 1 else "exclusive"], args, pair,
                      i + 1, step, shared_done)

    common.finish_distributed()  # the rest is rank 0's alone
    if rank > 0:
        return run, {}
    stages_done = {s for s, _ in plan} | ({1} if shared_done else set())
    reps = representations(enc, pair, device, stages_done)
    rows, metrics = evaluation_table(reps, pair, args.probe, args.seed)
    run.log(step=step, probe=args.probe, **metrics)
    save_neighbours(reps, pair, run.path("neighbours.png"), args.n_queries)
    common.print_table(rows, title=f"\n{args.probe} probe test accuracy on {pair.name} ({pair.pairing}), "
                                   f"{step} steps, {(time.time() - t0) / 60:.1f} min "
                                   f"(chance: digit 0.10, colours {1 / len(common.PALETTE):.3f})")
    print("goal: S_* high on digit, near chance on colours; Z_X high on background, "
          "Z_Y high on foreground, both low on digit")
    saved = [f"{part}_{d}.pt" for part in ("shared", "exclusive") for d in "xy" if os.path.exists(run.path(f"{part}_{d}.pt"))]
    print(f"encoders ({', '.join(saved)}) and neighbours.png in {run.dir}")
    return run, metrics


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    common.run_cli(main)
