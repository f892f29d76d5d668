"""Deep InfoMax, global objective: DIM(G).

Hjelm, Fedorov, Lavoie-Marchildon, Grewal, Bachman, Trischler, Bengio. "Learning deep
representations by mutual information estimation and maximization", ICLR 2019,
arXiv:1808.06670.

Maximise, over the encoder E and the critics (paper Eq. 8),

    alpha * I(X; y) + beta * mean_i I(C_i(X); y) - gamma * D(Uniform || sigmoid(y)),

with y = E(x) and C(x) the last conv map. DIM(G) is alpha=1, beta=0, gamma=1 (the defaults
here): the global critic flattens C(x), concatenates y and scores the pair with an MLP
(512-512-1); negatives pair y with the conv map of another image. The local term is one flag
away (`--beta 1`), so DIM(L+G) is a setting of either script. dim_local.py is the same
script with DIM(L)'s defaults, so `diff dim_local.py dim_global.py` shows only the defaults.

    python dim_global.py                                   # digits, ~1 min on 2 CPU cores
    python dim_global.py --dataset cifar10 --loss infonce --epochs 1000

Multi-GPU: `torchrun --nproc_per_node=K dim_global.py --device cuda` trains with DDP; --batch-size
stays the global batch, each process scores its embeddings against every process's (gathered
with gradient), so K processes optimise the same bound as one process on the whole batch.

Where this script fills gaps in or departs from the paper:
- Negatives: every other image's conv map in the batch (N-1 per positive), all N x N pairs
  scored at once by splitting the critic's first linear layer; infoNCE is therefore bounded
  by log N.
- Prior matching uses the non-saturating GAN loss for the encoder (the paper's Eq. 7 is the
  saturating minimax form); the discriminator is updated once per encoder step.
- Default epochs: the paper's 1000 for CIFAR, 200 for other datasets, 6 for the bundled
  digits so the first run finishes in about a minute on a laptop CPU.
"""
import math
import time

import torch

import common
from common import UserError


def parse_args(argv=None):
    p = common.ArgumentParser(description="Deep InfoMax with the global objective, DIM(G)")
    common.add_common_args(p, epochs=None, batch_size=64, lr=1e-4)
    p.add_argument("--loss", default="infonce", choices=sorted(common.BOUNDS),
                   help="MI estimator: jsd, infonce or dv (Table 1)")
    p.add_argument("--critic", default="dot", choices=["dot", "concat"],
                   help="local critic: encode-and-dot-product or concat-and-convolve")
    p.add_argument("--alpha", type=common.nonneg_float, default=1.0,
                   help="weight of global MI (alpha, Eq. 8)")
    p.add_argument("--beta", type=common.nonneg_float, default=0.0,
                   help="weight of local MI (beta, Eq. 8)")
    p.add_argument("--gamma", type=common.nonneg_float, default=1.0,
                   help="weight of prior matching (gamma, Eq. 8)")
    p.add_argument("--encoder", default="auto", choices=["auto", *common.ENCODERS],
                   help="auto: dcgan for 32x32, alexnet for 64x64 (paper)")
    p.add_argument("--local-layer", default=None,
                   help="encoder tap giving C(x) for the local objective (default: the "
                        "encoder's next-to-last conv map, as for CIFAR in the paper)")
    p.add_argument("--y-dim", type=common.positive_int, default=64, help="size of y = E(x)")
    p.add_argument("--embed-dim", type=common.positive_int, default=2048,
                   help="dot critic embedding width (paper 2048; smaller is faster on CPU)")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = {"digits": 6, "cifar10": 1000, "cifar100": 1000}.get(args.dataset, 200)
    if args.alpha == args.beta == 0:
        p.error("--alpha and --beta are both 0: nothing would maximise MI")
    return args


def build_critics(args, encoder, shapes, local_layer):
    """Only the terms with a non-zero weight get a network (and an optimiser entry)."""
    critics = {}
    if args.alpha > 0:
        critics["global_critic"] = common.GlobalCritic(math.prod(shapes["conv"]), args.y_dim)
    if args.beta > 0:
        channels = shapes[local_layer][0]
        critics["local_critic"] = (common.DotCritic(args.y_dim, channels, args.embed_dim)
                                   if args.critic == "dot" else
                                   common.ConcatCritic(args.y_dim, channels))
    if args.gamma > 0:
        critics["prior_disc"] = common.PriorDiscriminator(args.y_dim)
    return critics


def train(args):
    device, rank, world = common.init_distributed(args.device)  # world > 1 under torchrun
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must divide by the {world} processes")
    common.seed_everything(args.seed)
    data = common.load_data(args.dataset, args.data_root, device)
    enc_cfg = common.encoder_config(args.encoder, data.image_shape, args.y_dim)
    encoder = common.build_encoder(enc_cfg).to(device)
    shapes = common.tap_shapes(encoder, data.image_shape, device)
    local_layer = args.local_layer or encoder.default_local
    if local_layer not in encoder.maps:
        raise UserError(f"--local-layer {local_layer} is not a feature map of the "
                        f"{enc_cfg['arch']} encoder; choose one of {', '.join(encoder.maps)}")
    nets = build_critics(args, encoder, shapes, local_layer)
    for m in nets.values():
        m.to(device)
    prior_disc = nets.get("prior_disc")
    mi_params = [p for k, m in nets.items() if k != "prior_disc" for p in m.parameters()]
    optimizers = {"opt": torch.optim.Adam(list(encoder.parameters()) + mi_params, lr=args.lr)}
    if prior_disc is not None:
        optimizers["disc_opt"] = torch.optim.Adam(prior_disc.parameters(), lr=args.lr)

    run_dir, start_epoch, step = common.resume_state(
        args, "dim_global", {"encoder": encoder, **nets}, optimizers)
    run = common.Run("dim_global", args, run_dir)
    bound = common.BOUNDS[args.loss]
    # DDP / compiled views for training; the plain modules are what gets saved
    enc, global_critic, local_critic, prior = (
        common.maybe_compile(common.wrap_ddp(m, device), args.compile and m is not None)
        for m in (encoder, nets.get("global_critic"), nets.get("local_critic"), prior_disc))
    gather = common.gather_batch  # negatives from every process's batch (identity on one)
    quiet = args.no_progress or rank > 0
    if rank == 0:
        print(f"run folder: {run.dir}  device: {device}  data: {data.name} "
              f"{len(data.train_x)} train / {len(data.test_x)} test  local map: {local_layer} "
              f"{tuple(shapes[local_layer])}  processes: {world}")

    t0 = time.time()
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps and step >= args.max_steps:
            break
        gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)  # same order on resume
        sums, n_steps = {}, 0
        per_rank = args.batch_size // world  # --batch-size is the global batch
        bar = common.progress(data.batches("train", per_rank, shuffle=True, generator=gen,
                                           drop_last=True, rank=rank, world_size=world),
                              total=data.n_batches("train", per_rank, drop_last=True, world_size=world),
                              desc=f"epoch {epoch + 1}/{args.epochs}", disable=quiet)
        for x, _ in bar:
            with common.autocast(device, args.amp):
                out = enc(x)
                y = out["y"]  # (N, y_dim): the global feature E(x)
                loss = torch.zeros((), device=device)
                logs = {}
                if args.alpha > 0:
                    logs["global_mi"] = bound(global_critic(y, out["conv"], gather=gather))
                    loss = loss - args.alpha * logs["global_mi"]
                if args.beta > 0:
                    logs["local_mi"] = bound(local_critic(y, out[local_layer], gather=gather))
                    loss = loss - args.beta * logs["local_mi"]
                if args.gamma > 0:
                    logs["prior_gen"] = common.prior_encoder_loss(prior, y)
                    loss = loss + args.gamma * logs["prior_gen"]
            common.check_finite(loss, step)
            optimizers["opt"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["opt"].step()
            if prior_disc is not None:
                d_loss = common.prior_disc_loss(prior, y)
                optimizers["disc_opt"].zero_grad(set_to_none=True)
                d_loss.backward()
                optimizers["disc_opt"].step()
                logs["prior_disc"] = d_loss
            step += 1
            n_steps += 1
            logs["loss"] = loss
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            mi=f"{logs.get('global_mi', logs.get('local_mi')).item():.3f}")
            if args.max_steps and step >= args.max_steps:
                break
        stats = {k: v / max(n_steps, 1) for k, v in sums.items()}
        run.log(epoch=epoch + 1, step=step, time=time.time() - t0, **stats)
        common.save_checkpoint(run.path("checkpoint.pt"), script="dim_global", encoder=encoder,
                               encoder_cfg=enc_cfg, args=args, data=data, epoch=epoch + 1,
                               step=step, modules=nets, optimizers=optimizers)

    if rank > 0:
        return run
    probes = common.probe_against_random_init(encoder, enc_cfg, data, device, args.seed)
    run.log(step=step, **probes)
    common.print_table([{"epochs": args.epochs, "steps": step, "minutes": (time.time() - t0) / 60,
                         **{k: v for k, v in stats.items() if k != "prior_disc"}, **probes}],
                       title=f"\nDIM ({args.loss}, alpha={args.alpha}, beta={args.beta}, "
                             f"gamma={args.gamma}) on {data.name}")
    print(f"checkpoint: {run.path('checkpoint.pt')}  (python eval_probe.py {run.path('checkpoint.pt')})")
    return run


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    common.run_cli(main)
