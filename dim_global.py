"""Deep InfoMax, global objective: DIM(G).

Hjelm, Fedorov, Lavoie-Marchildon, Grewal, Bachman, Trischler, Bengio. "Learning deep
representations by mutual information estimation and maximization", ICLR 2019,
arXiv:1808.06670.

Maximise, over the encoder E and the critics (paper Eq. 8),

    alpha * I(X; y) + beta * mean_i I(C_i(X); y) - gamma * D(Uniform || sigmoid(y)),

with y = E(x) and C(x) the last conv map. DIM(G) is alpha=1, beta=0, gamma=1 (`--paper`;
the recipe sets gamma=0): the paper's global critic flattens C(x), concatenates y and scores
the pair with an MLP (512-512-1); negatives pair y with the conv map of another image. The
local term is one flag away (`--beta 1`), so DIM(L+G) is a setting of either script.
dim_local.py is the same script with DIM(L)'s defaults, so `diff dim_local.py dim_global.py`
shows only the defaults.

    python dim_global.py                                   # digits, ~2 min on 2 CPU cores
    python dim_global.py --dataset fashion-mnist --data-root DIR   # 60,000 images
    python dim_global.py --dataset cifar10 --paper                 # the paper's configuration

Defaults: the recipe (RECIPE; why, measured: docs/dim.md); `--paper`: the paper's (PAPER); a
flag given wins. Under `torchrun` negatives are gathered from every process (global batch).

Where this script fills gaps in or departs from the paper:
- The dot critic's scores are <g, l> / sqrt(E) for E = --embed-dim (`--score-scale 1` is the
  paper's raw dot product): raw 2048-d products spread by about 12 at initialisation, so
  infoNCE's softmax over ~4,000 candidates starts saturated and learns only from the largest.
- Recipe: `--shift 2` translates training images by up to 2 px (paper: no augmentation).
- Recipe: `--cross-view warp --jitter 0.8`: y from a second, independently warped view of
  each image with its own contrast and brightness, as in AMDIM (Bachman et al. 2019,
  arXiv:1906.00910); `--flip` (off) also mirrors it. bf16 autocast where the device computes
  it natively (`--no-amp`: fp32).
- Recipe: y is 128-d (paper 64, `--y-dim 64`).
- Recipe: Adam at 1e-3 with a cosine decay over the run (paper: 1e-4, constant), no prior
  term (`--gamma 0`), batches of 256 (paper 64, which caps infoNCE at log 64).
- Recipe: `--global-critic dot` embeds flattened C(x) and y (128 wide) and scores their dot
  product, as the local critic does (paper: the MLP, `--global-critic mlp`; same accuracy).
- Recipe length: 16 epochs or 620 x 64 images, whichever is longer (paper: 200 epochs, 1000
  on CIFAR). The k-NN monitor reads fixed subsets every `--log-every` steps.
- Negatives: every other image's conv map in the batch (N-1 per positive), all N x N pairs
  scored at once (the MLP's first linear layer split per input); infoNCE is therefore
  bounded by log N.
- Prior matching uses the non-saturating GAN loss for the encoder (the paper's Eq. 7 is the
  saturating minimax form); the discriminator is updated once per encoder step.

Extensions (off by default; paper Tables 3 and 5, App. A.7):
- `--occlude`: y is computed from the input with random blocks set to 0 (mid-grey), while the
  local map (and the conv map of the global term) come from the full input, so every step
  runs the encoder twice. The blocks tile the image with the side of one local receptive
  field (10 px for the 32x32 encoder's c2), each hidden with probability `--occlude-p`; then
  one receptive field, drawn per image, is hidden entirely and a disjoint one made entirely
  visible: the paper's constraint, met by construction. The paper's sampling was "ad hoc".
- `--coord`: heads predict a local feature's (row, column) from (y, C_k), or the offset of
  C_k from a randomly chosen source C_s from (y, C_s, C_k), with two cross-entropies each,
  averaged over all k; weighted by `--coord-weight` (the paper gives no weight).
- `--multi-global K`: K "less global" features per image, each computed by zeroing the local
  map outside a random rectangle of the M x M grid (sides drawn from [M/4, M-1]) and running
  the rest of the encoder on it; each is scored against the full local map by the same local
  critic and added to the local term (beta * mean over the K features).
- Extra passes (--cross-view, occlusion, masked maps) leave BatchNorm's running statistics.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

SCRIPT = "dim_global"
NAN_HINT = "lower --lr, or use --loss jsd/infonce (the DV bound is known to blow up)"


# The defaults are the recipe measured on real images (docs/dim.md); `--paper` restores the
# paper's configuration instead (arXiv:1808.06670, Sec. 4 and App. A.2). A flag given on the
# command line wins over both. Lengths: the paper's epochs, or the recipe's (recipe_epochs).
PAPER = {"amp": False, "batch_size": 64, "lr": 1e-4, "lr_schedule": "constant", "embed_dim": 2048,
         "shift": 0, "cross_view": "none", "flip": 0.0, "jitter": 0.0, "y_dim": 64,
         "global_critic": "mlp", "gamma": 1.0}
RECIPE = {"batch_size": 256, "lr": 1e-3, "lr_schedule": "cosine", "embed_dim": 128, "shift": 2,
          "cross_view": "warp", "flip": 0.0, "jitter": 0.8, "y_dim": 128,
          "global_critic": "dot", "gamma": 0.0}  # amp: native_bf16


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p, epochs=None, batch_size=None, lr=None, eval_every=1,
                           eval_unit="metrics lines", amp=None)
    p.add_argument("--paper", action="store_true",
                   help="the paper's configuration instead of the recipe (see PAPER, RECIPE)")
    p.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                   help=f"constant, or cosine decay to 0 over the run's steps (paper "
                        f"{PAPER['lr_schedule']}, recipe {RECIPE['lr_schedule']})")
    p.add_argument("--log-every", type=common.nonneg_int, default=0, metavar="STEPS",
                   help="a metrics line (and the monitor, see --eval-every) every STEPS steps "
                        "(0: about 20 lines a run)")
    p.add_argument("--loss", default="infonce", choices=sorted(common.BOUNDS),
                   help="MI estimator: jsd, infonce or dv (Table 1)")
    p.add_argument("--critic", default="dot", choices=["dot", "concat"],
                   help="local critic: encode-and-dot-product or concat-and-convolve")
    p.add_argument("--global-critic", default=None, choices=["mlp", "dot"],
                   help="global critic: an MLP on (flattened C(x), y), or encode-and-dot-product "
                        f"of the two (paper {PAPER['global_critic']}, recipe "
                        f"{RECIPE['global_critic']}: same accuracy, faster)")
    p.add_argument("--alpha", type=common.nonneg_float, default=1.0,
                   help="weight of global MI (alpha, Eq. 8)")
    p.add_argument("--beta", type=common.nonneg_float, default=0.0,
                   help="weight of local MI (beta, Eq. 8)")
    p.add_argument("--gamma", type=common.nonneg_float, default=None,
                   help=f"weight of prior matching (gamma, Eq. 8; paper {PAPER['gamma']}, recipe "
                        f"{RECIPE['gamma']})")
    p.add_argument("--encoder", default="auto", choices=["auto", "dcgan", "alexnet", "resnet"],
                   help="auto: dcgan for 32x32, alexnet for 64x64 (paper, App. A.2); resnet as "
                        "in the CPC comparison (Table 3)")
    p.add_argument("--local-layer", default=None,
                   help="encoder tap giving C(x) for the local objective (default: the "
                        "encoder's next-to-last conv map, as for CIFAR in the paper)")
    p.add_argument("--y-dim", type=common.positive_int, default=None,
                   help=f"size of y = E(x) (paper {PAPER['y_dim']}, recipe {RECIPE['y_dim']})")
    p.add_argument("--embed-dim", type=common.width_int, default=None,
                   help=f"dot critic embedding width (paper {PAPER['embed_dim']}, recipe "
                        f"{RECIPE['embed_dim']}: faster on a CPU)")
    p.add_argument("--score-scale", type=common.positive_float, default=None,
                   help="the dot critic's scores are this times <g, l> (default 1/sqrt(--embed-dim); "
                        "the paper's raw dot product is 1)")
    p.add_argument("--shift", type=common.nonneg_int, default=None, metavar="K",
                   help=f"translate each training image by up to K pixels (paper "
                        f"{PAPER['shift']}: no augmentation outside STL-10; recipe "
                        f"{RECIPE['shift']})")
    p.add_argument("--cross-view", default=None, choices=["none", "shift", "warp"],
                   help=f"compute y from a second view of each image (paper "
                        f"{PAPER['cross_view']}, recipe {RECIPE['cross_view']}; two "
                        "encoder passes per step): shift: shifted again by up to --shift px; "
                        "warp: rotated up to 25 degrees, scaled by up to 20%%, shifted 1.6 px")
    p.add_argument("--flip", type=common.probability, default=None,
                   help="with --cross-view warp: probability that the second view is also "
                        f"mirrored left to right (paper {PAPER['flip']}, recipe {RECIPE['flip']})")
    p.add_argument("--jitter", type=common.nonneg_float, default=None,
                   help="with --cross-view: the second view's contrast and brightness changed "
                        f"by up to this much (paper {PAPER['jitter']}, recipe {RECIPE['jitter']})")
    p.add_argument("--warp-strength", type=common.nonneg_float, default=1.0,
                   help="with --cross-view warp: multiplies its rotation, scaling and shift")
    p.add_argument("--occlude", action="store_true",
                   help="compute y from randomly occluded inputs, local features from the full "
                        "input (Table 5; two encoder passes per step)")
    p.add_argument("--occlude-p", type=common.probability, default=0.5,
                   help="probability that each block of the input is occluded")
    p.add_argument("--coord", default="none", choices=["none", "absolute", "relative", "both"],
                   help="coordinate prediction from (y, local features) (Table 5, App. A.7)")
    p.add_argument("--coord-weight", type=common.nonneg_float, default=1.0,
                   help="weight of the coordinate cross-entropies in the loss")
    p.add_argument("--multi-global", type=common.int_range(0, 64), default=0, metavar="K",
                   help="K less-global features from random blocks of the local map (Table 3)")
    p.add_argument("--knn-rule", default="weighted", choices=common.KNN_RULES,
                   help="the monitor's k-NN (k=20): weighted by exp(cosine / 0.07) as in "
                        "solo-learn, or scikit-learn's uniform vote (runs before 2026-12-06)")
    args = common.merge_resume_args(p, argv, p.parse_args(argv))
    for key, value in (PAPER if args.paper else RECIPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs is None and args.paper:  # the paper's: 1000 on CIFAR, 200 elsewhere
        args.epochs = 1000 if args.dataset in ("cifar10", "cifar100") else 200
    if args.score_scale is None:
        args.score_scale = args.embed_dim ** -0.5
    if args.alpha == args.beta == 0:
        p.error("--alpha and --beta are both 0: nothing would maximise MI")
    if args.cross_view == "shift" and args.shift == 0:
        p.error("--cross-view shift draws a second shift per image: it needs --shift > 0")
    if args.multi_global and args.beta == 0:
        p.error("--multi-global scores features with the local critic: it needs --beta > 0")
    return args


def recipe_epochs(n_train, batch_size, min_images=620 * 64, min_epochs=16):
    """The recipe's length: at least `min_epochs` passes over the data and at least
    `min_images` images through the optimiser (what small sets need: 620 steps of 64),
    whichever is longer."""
    return max(min_epochs, math.ceil(min_images / (n_train // batch_size * batch_size)))


def occlude(x, fields, disjoint_pairs, block, p):
    """Set random blocks of x to 0 (mid-grey). fields: (M*M, H, W) bool receptive fields;
    disjoint_pairs: (P, 2) locations whose fields do not overlap. One pair is drawn per image:
    the first field is hidden entirely and the second left entirely visible."""
    n, _, h, w = x.shape
    grid = torch.rand(n, 1, -(-h // block), -(-w // block), device=x.device) < p
    hidden = grid.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :h, :w]
    pair = disjoint_pairs[torch.randint(len(disjoint_pairs), (n,), device=x.device)]
    hidden = (hidden | fields[pair[:, 0], None]) & ~fields[pair[:, 1], None]
    return x.masked_fill(hidden, 0.0)


class CoordHead(nn.Module):
    """Predicts a (row, column) pair as two categorical variables (App. A.7): MLP with two
    512-unit hidden layers, BatchNorm and ReLU."""

    def __init__(self, in_dim, n_classes, hidden=512):
        super().__init__()
        self.n_classes = n_classes
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * n_classes))

    def forward(self, inputs, rows, cols):
        """Sum of the row and column cross-entropies, averaged over the inputs."""
        logits = self.net(inputs)
        return (F.cross_entropy(logits[:, :self.n_classes], rows) +
                F.cross_entropy(logits[:, self.n_classes:], cols))


def coordinate_loss(head, y, local_map, relative):
    """Absolute: predict where C_k sits from (y, C_k). Relative: predict the offset of C_k
    from a random source C_s (one per image) from (y, C_s, C_k). Averaged over all k."""
    n, _, m, _ = local_map.shape
    local = local_map.flatten(2).transpose(1, 2)  # (N, M*M, C)
    k = torch.arange(m * m, device=y.device)
    rows, cols = (k // m).expand(n, -1), (k % m).expand(n, -1)  # (N, M*M)
    parts = [y[:, None, :].expand(-1, m * m, -1)]
    if relative:
        src = torch.randint(m * m, (n,), device=y.device)
        parts.append(local[torch.arange(n), src][:, None, :].expand(-1, m * m, -1))
        rows = rows - (src // m)[:, None] + m - 1  # offsets shifted to [0, 2M-2]
        cols = cols - (src % m)[:, None] + m - 1
    parts.append(local)
    return head(torch.cat(parts, 2).flatten(0, 1), rows.flatten(), cols.flatten())


def random_blocks(n, m, device):
    """(N, 1, M, M) mask of one random rectangle of the M x M grid per image, sides in
    [M/4, M-1]: a less global view that never covers the whole map."""
    lo, hi = max(1, m // 4), max(1, m - 1)
    size = torch.randint(lo, hi + 1, (2, n, 1), device=device)
    start = (torch.rand(2, n, 1, device=device) * (m - size + 1)).long()
    ar = torch.arange(m, device=device)
    inside = (ar >= start) & (ar < start + size)  # (2, N, M): rows, then columns
    return (inside[0, :, :, None] & inside[1, :, None, :])[:, None].float()


class PriorDiscriminator(nn.Module):
    """Prior matching's discriminator (§3.3): MLP 1000-200-1 telling Uniform[0,1]^D samples
    (real) from sigmoid(y) (fake)."""

    def __init__(self, dim, hidden=(1000, 200)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden[0]), nn.ReLU(inplace=True),
                                 nn.Linear(hidden[0], hidden[1]), nn.ReLU(inplace=True),
                                 nn.Linear(hidden[1], 1))

    def forward(self, v):
        return self.net(v).squeeze(-1)


def prior_disc_loss(prior_disc, global_feat):
    """Discriminator side: prior samples are real, sigmoid(y) (detached) is fake."""
    fake = torch.sigmoid(global_feat.detach().float())
    real = torch.rand_like(fake)
    return F.softplus(-prior_disc(real)).mean() + F.softplus(prior_disc(fake)).mean()


def prior_encoder_loss(prior_disc, global_feat):
    """Encoder side (non-saturating GAN loss): make sigmoid(y) look like prior samples."""
    return F.softplus(-prior_disc(torch.sigmoid(global_feat.float()))).mean()


def build_critics(args, encoder, shapes, local_layer):
    """Only the terms with a non-zero weight get a network (and an optimiser entry)."""
    critics = {}
    if args.alpha > 0:
        conv_dim = math.prod(shapes["conv"])
        critics["global_critic"] = (common.GlobalCritic(conv_dim, args.y_dim)
                                    if args.global_critic == "mlp" else
                                    common.GlobalDotCritic(conv_dim, args.y_dim, args.embed_dim,
                                                           scale=args.score_scale))
    if args.beta > 0:
        channels = shapes[local_layer][0]
        critics["local_critic"] = (common.DotCritic(args.y_dim, channels, args.embed_dim,
                                                    scale=args.score_scale)
                                   if args.critic == "dot" else
                                   common.ConcatCritic(args.y_dim, channels))
    if args.coord in ("absolute", "both"):
        critics["coord_abs"] = CoordHead(args.y_dim + shapes[local_layer][0],
                                         shapes[local_layer][1])
    if args.coord in ("relative", "both"):
        critics["coord_rel"] = CoordHead(args.y_dim + 2 * shapes[local_layer][0],
                                         2 * shapes[local_layer][1] - 1)
    if args.gamma > 0:
        critics["prior_disc"] = PriorDiscriminator(args.y_dim)
    return critics


def build_optimizers(encoder, critics, lr):
    """One Adam for the encoder, the MI critics and the coordinate heads; one for the prior
    discriminator, which plays against them."""
    mi_params = [p for k, m in critics.items() if k != "prior_disc" for p in m.parameters()]
    optimizers = {"opt": common.adam(list(encoder.parameters()) + mi_params, lr=lr)}
    if "prior_disc" in critics:
        optimizers["disc_opt"] = common.adam(critics["prior_disc"].parameters(), lr=lr)
    return optimizers


def views(images, args, rng):
    """(x, x_y): x is what every term but y reads (shifted by up to --shift px), x_y the view
    y is computed from: x itself, or with --cross-view a second view with its own jitter."""
    x = common.random_shift(images, args.shift, rng)
    if args.cross_view == "none":
        return x, x
    if args.cross_view == "shift":
        x_y = common.random_shift(images, args.shift, rng)
    else:  # warp
        s = args.warp_strength
        x_y = common.random_affine(images, 25.0 * s, 0.2 * s, 0.1 * s, flip=args.flip, rng=rng)
    return x, common.random_jitter(x_y, args.jitter, rng)


def dim_loss(nets, encoder, x, x_y, args, local_layer):
    """Minus Eq. 8 (alpha * I(X; y) + beta * I(C(X); y) - gamma * prior term) plus the
    extensions' terms: (loss, the terms by name, y). `nets` holds the networks as the step
    calls them (DDP-wrapped, compiled); `encoder` is the plain one, whose BatchNorm statistics
    the extra passes leave alone and whose layers after `local_layer` --multi-global reruns."""
    bound = common.BOUNDS[args.loss]  # jsd_bound, infonce_bound or dv_bound of the scores
    gather = common.gather_batch  # negatives from every process's batch (identity on one)
    out = nets["encoder"](x)
    local_map = out[local_layer]  # (N, C, M, M): C(x), always from the full input
    if x_y is x:
        y = out["y"]  # (N, y_dim): the global feature E(x)
    else:  # a second pass, which leaves BatchNorm's statistics to the first
        with common.keep_bn_stats(encoder):
            y = nets["encoder"](x_y)["y"]
    loss = torch.zeros((), device=x.device)
    logs = {}
    if args.alpha > 0:  # y against the conv map of its image (positive) and of the others
        logs["global_mi"] = bound(nets["global_critic"](y, out["conv"], gather=gather))
        loss = loss - args.alpha * logs["global_mi"]
    if args.beta > 0:  # y against every local feature of its image and of the others
        logs["local_mi"] = bound(nets["local_critic"](y, local_map, gather=gather))
        loss = loss - args.beta * logs["local_mi"]
    for _ in range(args.multi_global):
        block_map = local_map * random_blocks(len(x), local_map.shape[-1], x.device)
        with common.keep_bn_stats(encoder):  # a less global y from one block of C(x)
            y_block = common.forward_from(encoder, local_layer, block_map)
        mi = bound(nets["local_critic"](y_block, local_map, gather=gather)) / args.multi_global
        logs["multi_global_mi"] = logs.get("multi_global_mi", 0) + mi
        loss = loss - args.beta * mi
    for name in ("coord_abs", "coord_rel"):
        if name in nets:
            logs[name] = coordinate_loss(nets[name], y, local_map, relative=(name == "coord_rel"))
            loss = loss + args.coord_weight * logs[name]
    if args.gamma > 0:
        logs["prior_gen"] = prior_encoder_loss(nets["prior_disc"], y)
        loss = loss + args.gamma * logs["prior_gen"]
    return loss, logs, y


def train_step(nets, encoder, optimizers, x, x_y, args, local_layer, step):
    """One update: the encoder and the critics on dim_loss, then the prior discriminator on
    its own loss. Returns the logged terms (benchmarks/speed.py times this function)."""
    with common.autocast(x.device, args.amp):
        loss, logs, y = dim_loss(nets, encoder, x, x_y, args, local_layer)
    common.check_finite(loss, step, "loss", NAN_HINT)
    optimizers["opt"].zero_grad(set_to_none=True)
    loss.backward()
    optimizers["opt"].step()
    if "prior_disc" in nets:
        d_loss = prior_disc_loss(nets["prior_disc"], y)
        optimizers["disc_opt"].zero_grad(set_to_none=True)
        d_loss.backward()
        optimizers["disc_opt"].step()
        logs["prior_disc"] = d_loss
    logs["loss"] = loss
    return logs


def train(args):
    device, rank, world = common.start(args)  # world > 1 under torchrun
    main_process = rank == 0  # the one that evaluates, logs and writes
    data = common.load_data(args.dataset, args.data_root, device, args.image_size)
    common.check_batch(args.batch_size, world, len(data.train_x))
    if args.epochs is None:  # the recipe's length, from the data's size (in args.json)
        args.epochs = recipe_epochs(len(data.train_x), args.batch_size)
    enc_cfg = common.encoder_config(args.encoder, data.image_shape, args.y_dim)
    encoder = common.build_encoder(enc_cfg).to(device)
    shapes = common.tap_shapes(encoder, data.image_shape, device)
    local_layer = args.local_layer or encoder.default_local
    if local_layer not in encoder.maps:
        raise UserError(f"--local-layer {local_layer} is not a feature map of the "
                        f"{enc_cfg['arch']} encoder; choose one of {', '.join(encoder.maps)}")
    if args.multi_global:
        common.encoder_stages(encoder)  # fails early for encoders that cannot run from a map
    if args.occlude:
        fields = common.receptive_fields(encoder, local_layer, data.image_shape).to(device)
        flat = fields.flatten(1).float()
        disjoint_pairs = ((flat @ flat.T) == 0).nonzero()  # (P, 2): (hidden, visible)
        if len(disjoint_pairs) == 0:
            raise UserError(f"every receptive field of {local_layer} overlaps every other: "
                            f"occlusion needs an earlier --local-layer")
        block = int(fields.flatten(1).sum(1).max().sqrt().ceil())  # an interior field's side
    critics = {k: m.to(device) for k, m in build_critics(args, encoder, shapes, local_layer).items()}
    optimizers = build_optimizers(encoder, critics, args.lr)
    # the monitor's baseline: the untrained encoder (the one every run starts from)
    knn_y_random_init = (common.knn_monitor(encoder, data, device, rule=args.knn_rule,
                                            amp=args.amp)
                         if args.eval_every and main_process else None)

    run_dir, start_epoch, step, elapsed = common.resume_state(
        args, SCRIPT, {"encoder": encoder, **critics}, optimizers)
    steps_per_epoch = data.n_batches("train", args.batch_size // world, drop_last=True,
                                     world_size=world)
    planned_steps = args.epochs * steps_per_epoch  # the schedule's; --max-steps cuts it short
    total_steps = min(planned_steps, args.max_steps or math.inf)
    if not args.log_every:  # fixed once, in args.json, so a resumed run logs at the same steps
        args.log_every = max(1, round(planned_steps / 20))
    run = common.Run(SCRIPT, args, run_dir, elapsed)
    common.convert_sync_bn([encoder, *critics.values()], args.sync_bn, world, device)
    # the networks as the step calls them (DDP-wrapped, compiled); the plain ones are saved
    step_nets = {k: common.maybe_compile(common.wrap_ddp(m, device),
                                         args.compile and not k.startswith("coord"))
                 for k, m in {"encoder": encoder, **critics}.items()}
    if main_process:
        print(f"run folder: {run.dir}  device: {device}  data: {data.name} "
              f"{len(data.train_x)} train / {len(data.test_x)} test  local map: {local_layer} "
              f"{tuple(shapes[local_layer])}  processes: {world}")

    stats, shown = {}, {}  # shown: the latest monitor, in the progress bar
    # the running sums of the current metrics line, carried over epochs and checkpoints
    sums = (dict(common.load_checkpoint(args.resume).get("extra", {}).get("sums", {}))
            if args.resume else {})
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        rng, bar = common.epoch_batches(data, args, epoch, f"epoch {epoch + 1}/{args.epochs}",
                                        rank, world)
        for images, _ in bar:
            x, x_y = views(images, args, rng)
            if x_y is not x and step == 0 and main_process:  # each image beside its second view
                common.save_image_grid(torch.stack((x[:32], x_y[:32]), 1).flatten(0, 1),
                                       run.path("views.png"), 8)
            if args.occlude:  # y from an occluded input, everything else from the full one
                x_y = occlude(x_y, fields, disjoint_pairs, block, args.occlude_p)
                if step == 0 and main_process:
                    common.save_image_grid(x_y[:64], run.path("occlusions.png"), 8)
            if args.lr_schedule == "cosine":  # a function of the step alone: resumes exactly
                common.set_lr(optimizers, args.lr * (1 + math.cos(math.pi * step / planned_steps)) / 2)
            logs = train_step(step_nets, encoder, optimizers, x, x_y, args, local_layer, step)
            step += 1

            common.add_step(sums, logs)
            bar.set_postfix(loss=f"{logs['loss'].item():.3f}",
                            **{k: f"{logs[k].item():.3f}" for k in ("global_mi", "local_mi") if k in logs}, **shown)
            last = step >= total_steps
            if step % args.log_every == 0 or last:  # a metrics line: each term's mean since the last
                stats, sums = common.means(sums), {}
                if main_process and common.eval_due(args.eval_every, step // args.log_every - 1, last):
                    stats["knn_y"] = common.knn_monitor(encoder, data, device, rule=args.knn_rule,
                                                         amp=args.amp)
                    shown["knn_y"] = f"{stats['knn_y']:.3f}"
                run.log(epoch=epoch + 1, step=step, time=run.elapsed(), **stats)
                run.plot(["knn_y"], {"knn_y": knn_y_random_init})
            if last:
                break
        run.checkpoint(encoder=encoder, encoder_cfg=enc_cfg, args=args, data=data, epoch=epoch + 1,
                       step=step, modules=critics, optimizers=optimizers, extra={"sums": sums})

    common.finish_distributed()  # the rest is the main process's alone
    if not main_process:
        return run
    probes = common.probe_against_random_init(encoder, enc_cfg, data, device, args.seed)
    if "knn_y" in stats:
        probes.update(knn_y=stats["knn_y"], knn_y_random_init=knn_y_random_init)
    run.log(step=step, **probes)
    common.print_table([{"epochs": args.epochs, "steps": step, "minutes": run.elapsed() / 60,
                         **{k: v for k, v in stats.items() if k != "prior_disc"}, **probes}],
                       title=f"\nDIM ({args.loss}, alpha={args.alpha}, beta={args.beta}, "
                             f"gamma={args.gamma}) on {data.name}")
    print(f"checkpoint: {run.path('checkpoint.pt')}  (python eval_probe.py {run.path('checkpoint.pt')})")
    return run


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    common.run_cli(main)
