"""Deep InfoMax, local objective: DIM(L).

Hjelm, Fedorov, Lavoie-Marchildon, Grewal, Bachman, Trischler, Bengio. "Learning deep
representations by mutual information estimation and maximization", ICLR 2019,
arXiv:1808.06670.

Maximise, over the encoder E and the critics (paper Eq. 8),

    alpha * I(X; y) + beta * mean_i I(C_i(X); y) - gamma * D(Uniform || sigmoid(y)),

with y = E(x) and C_i(x) the local features of an intermediate map. DIM(L) is alpha=0,
beta=1, gamma=0.1 with infoNCE and the encode-and-dot-product critic (the defaults here);
DIM(L+G) is `--alpha 0.5` (or any mix). dim_global.py is the same script with DIM(G)'s
defaults, so `diff dim_local.py dim_global.py` shows only the defaults.

    python dim_local.py                                    # digits, ~2 min on 2 CPU cores
    python dim_local.py --dataset cifar10 --loss infonce --epochs 1000

Where this script fills gaps in or departs from the paper:
- Negatives: every local feature of every other image in the batch ((N-1)*M^2 per positive),
  scored with one einsum; infoNCE is therefore bounded by log((N-1)*M^2 + 1).
- Prior matching uses the non-saturating GAN loss for the encoder (the paper's Eq. 7 is the
  saturating minimax form); the discriminator is updated once per encoder step.
- The concat-and-convolve critic scores all N x N pairs (exactly, by splitting its first
  1x1 conv), not one shuffled negative per image as some ports do.
- Default epochs: the paper's 1000 for CIFAR, 200 for other datasets, 6 for the bundled
  digits so the first run finishes in about two minutes on a laptop CPU.
"""
import math
import time

import torch

import common
from common import UserError


def parse_args(argv=None):
    p = common.ArgumentParser(description="Deep InfoMax with the local objective, DIM(L)")
    common.add_common_args(p, epochs=None, batch_size=64, lr=1e-4)
    p.add_argument("--loss", default="infonce", choices=sorted(common.BOUNDS),
                   help="MI estimator: jsd, infonce or dv (Table 1)")
    p.add_argument("--critic", default="dot", choices=["dot", "concat"],
                   help="local critic: encode-and-dot-product or concat-and-convolve")
    p.add_argument("--alpha", type=common.nonneg_float, default=0.0,
                   help="weight of global MI (alpha, Eq. 8)")
    p.add_argument("--beta", type=common.nonneg_float, default=1.0,
                   help="weight of local MI (beta, Eq. 8)")
    p.add_argument("--gamma", type=common.nonneg_float, default=0.1,
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
    device = common.get_device(args.device)
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
        args, "dim_local", {"encoder": encoder, **nets}, optimizers)
    run = common.Run("dim_local", args, run_dir)
    bound = common.BOUNDS[args.loss]
    # compiled views for speed; the plain modules are what gets saved
    enc = common.maybe_compile(encoder, args.compile)
    global_critic = common.maybe_compile(nets.get("global_critic"), args.compile and args.alpha > 0)
    local_critic = common.maybe_compile(nets.get("local_critic"), args.compile and args.beta > 0)
    print(f"run folder: {run.dir}  device: {device}  data: {data.name} "
          f"{len(data.train_x)} train / {len(data.test_x)} test  local map: {local_layer} "
          f"{tuple(shapes[local_layer])}")

    t0 = time.time()
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps and step >= args.max_steps:
            break
        gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)  # same order on resume
        sums, n_steps = {}, 0
        bar = common.progress(data.batches("train", args.batch_size, shuffle=True, generator=gen,
                                           drop_last=True),
                              total=data.n_batches("train", args.batch_size, drop_last=True),
                              desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress)
        for x, _ in bar:
            with common.autocast(device, args.amp):
                out = enc(x)
                y = out["y"]  # (N, y_dim): the global feature E(x)
                loss = torch.zeros((), device=device)
                logs = {}
                if args.alpha > 0:
                    logs["global_mi"] = bound(global_critic(y, out["conv"]))
                    loss = loss - args.alpha * logs["global_mi"]
                if args.beta > 0:
                    logs["local_mi"] = bound(local_critic(y, out[local_layer]))
                    loss = loss - args.beta * logs["local_mi"]
                if args.gamma > 0:
                    logs["prior_gen"] = common.prior_encoder_loss(prior_disc, y)
                    loss = loss + args.gamma * logs["prior_gen"]
            common.check_finite(loss, step)
            optimizers["opt"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["opt"].step()
            if prior_disc is not None:
                d_loss = common.prior_disc_loss(prior_disc, y)
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
                            mi=f"{logs.get('local_mi', logs.get('global_mi')).item():.3f}")
            if args.max_steps and step >= args.max_steps:
                break
        stats = {k: v / max(n_steps, 1) for k, v in sums.items()}
        run.log(epoch=epoch + 1, step=step, time=time.time() - t0, **stats)
        common.save_checkpoint(run.path("checkpoint.pt"), script="dim_local", encoder=encoder,
                               encoder_cfg=enc_cfg, args=args, data=data, epoch=epoch + 1,
                               step=step, modules=nets, optimizers=optimizers)

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
