"""Throughput benchmark: images/s, step time, FLOPs, fraction of matmul peak, peak memory.

    python benchmarks/speed.py                       # DIM(L)/DIM(G) breakdown + every script, CPU
    python benchmarks/speed.py --device cuda --amp   # the same on a GPU, bf16
    python benchmarks/speed.py --only dim --embed-dim 512   # trade critic width for speed

For DIM the step is the script's own (its views() and train_step(), with the recipe's
defaults), and its parts are timed apart: encoder (forward+backward), critics
(forward+backward from detached features) and the bound itself (from a detached score tensor),
each after warm-up, with FLOPs counted by torch.utils.flop_counter. The other scripts are timed end
to end: the step time is read from time stamps of the optimiser steps of one run (set-up and
final evaluation excluded), and the FLOPs of a step are the difference between a one-step and
a two-step run under the FLOP counter (which is too slow to be timed itself). The matmul
peak is measured on this machine first (a large fp32 or bf16 matmul), and each step's
achieved FLOP/s is quoted as a fraction of it. Measured tables: docs/speed.md.
"""
import argparse
import contextlib
import io
import math
import os
import resource
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts
import common  # noqa: E402


def parse_args(argv=None):
    p = common.ArgumentParser(description="Throughput benchmark for every script")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=common.batch_size_int, default=64)
    p.add_argument("--embed-dim", type=common.width_int, default=2048, help="DIM dot critic width")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the DIM networks")
    p.add_argument("--repeats", type=common.positive_int, default=5, help="timed steps per measurement")
    p.add_argument("--only", default="all", choices=["all", "dim", "scripts", "shared_exclusive"],
                   help="time a subset: DIM, the other scripts, or shared_exclusive alone")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def flops_of(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, amp, n=2048):
    dtype = torch.bfloat16 if amp else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, repeats=10)
    return 2 * n ** 3 / sec


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB


def bench_dim(args, device, peak, variant):
    import dim_global
    import dim_local
    module = dim_local if variant == "dim_local" else dim_global
    margs = module.parse_args(["--embed-dim", str(args.embed_dim)])
    margs.amp = args.amp
    cfg = common.encoder_config("dcgan", (3, 32, 32), margs.y_dim)  # CIFAR-shaped input
    encoder = common.build_encoder(cfg).to(device)
    shapes = common.tap_shapes(encoder, (3, 32, 32), device)
    critics = {k: m.to(device) for k, m in module.build_critics(margs, encoder, shapes, "c2").items()}
    optimizers = module.build_optimizers(encoder, critics, margs.lr)
    # the networks as the script's step calls them (compiled with --compile)
    step_nets = {k: common.maybe_compile(m, args.compile and not k.startswith("coord"))
                 for k, m in {"encoder": encoder, **critics}.items()}
    enc = step_nets["encoder"]
    critic_name = "local_critic" if variant == "dim_local" else "global_critic"
    critic = step_nets[critic_name]
    tap = "c2" if variant == "dim_local" else "conv"
    x = torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1  # images in [-1, 1]
    rng = torch.Generator().manual_seed(0)
    bound = common.BOUNDS[margs.loss]
    amp = lambda: common.autocast(device, args.amp)

    def full_step():  # the script's own: its views (augmentation) and its train_step
        x_view, x_y = module.views(x, margs, rng)
        module.train_step(step_nets, encoder, optimizers, x_view, x_y, margs, "c2", step=0)

    def encoder_only():
        with amp():
            out = enc(x)
            loss = out["y"].float().sum() + out[tap].float().sum()
        loss.backward()

    with torch.no_grad(), amp():
        out = encoder(x)
    feats = [out["y"].detach().float(), out[tap].detach().float()]

    def critic_only():
        g, l = (f.clone().requires_grad_() for f in feats)
        with amp():
            scores = critic(g, l)
        scores.float().sum().backward()

    with amp():
        scores = critic(*feats).detach().float()

    def bound_only():
        s = scores.clone().requires_grad_()
        bound(s).backward()

    rows = []
    for part, fn in (("step", full_step), ("encoder", encoder_only), ("critic", critic_only),
                     ("bound", bound_only)):
        sec = timed(fn, device, args.repeats)
        fl = flops_of(fn)
        rows.append({"script": variant, "part": part, "ms": 1000 * sec,
                     "img/s": args.batch_size / sec if part == "step" else float("nan"),
                     "GFLOP": fl / 1e9, "peak frac": fl / sec / peak})
    step_ms = rows[0]["ms"]
    for r in rows[1:]:
        r["part"] = f"{r['part']} ({100 * r['ms'] / step_ms:.1f}% of step)"
    rows[0]["peak MiB"] = peak_memory_mb(device)
    return rows


def bench_script(name, args, device, peak, extra=(), label="step"):
    """End-to-end. Optimiser steps are time-stamped (a global post-step hook), so the step
    time is read between the first and the last training step of a run, free of set-up and
    final evaluation. FLOPs come from two shorter runs under FlopCounterMode (the difference
    divided by the difference in steps); the timed run is not one of them, because the
    counter intercepts every operator and slows a step of many small ones (InfoGAN's)."""
    import importlib
    import tempfile
    from torch.optim.optimizer import register_optimizer_step_post_hook
    module = importlib.import_module(name)
    stamps = []
    handle = register_optimizer_step_post_hook(lambda *_: (sync(device), stamps.append(time.perf_counter())))
    runs = []
    try:
        for steps, counted in ((1, True), (2, True), (3 + 2 * args.repeats, False)):
            argv = ["--no-progress", "--max-steps", str(steps), "--batch-size", str(args.batch_size),
                    "--device", device.type, "--epochs", "1000"] + (["--amp"] if args.amp else [])
            argv += list(extra)
            stamps.clear()
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                margs = module.parse_args(argv + ["--out-dir", tmp])
                counter = FlopCounterMode(display=False) if counted else None
                with counter or contextlib.nullcontext():
                    module.train(margs)
            runs.append((steps, list(stamps), counter.get_total_flops() if counted else None))
    finally:
        handle.remove()
    (k1, s1, f1), (k2, s2, f2), (k3, s3, _) = runs
    per_step = len(s2) - len(s1)  # optimiser steps per training step
    if per_step < 1 or len(s3) < k3 * per_step:
        raise RuntimeError(f"{name}: could not find its training steps among {len(s3)} optimiser steps")
    # from the end of the first training step (warm-up) to the end of the last
    sec = (s3[k3 * per_step - 1] - s3[per_step - 1]) / (k3 - 1)
    fl = (f2 - f1) / (k2 - k1)
    return [{"script": name, "part": f"{label} ({per_step} optimiser steps)", "ms": 1000 * sec,
             "img/s": args.batch_size / sec, "GFLOP": fl / 1e9, "peak frac": fl / sec / peak,
             "peak MiB": peak_memory_mb(device)}]


def bench_shared_exclusive(args, device, peak):
    """Its two stages timed apart (each has its own optimiser steps per training step);
    stage 2 starts from a one-step stage-1 checkpoint."""
    import tempfile
    import shared_exclusive
    rows = bench_script("shared_exclusive", args, device, peak, extra=["--stage", "1"],
                        label="stage 1 step")
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        run, _ = shared_exclusive.train(shared_exclusive.parse_args(
            ["--no-progress", "--stage", "1", "--max-steps", "1", "--device", device.type,
             "--out-dir", tmp]))
        rows += bench_script("shared_exclusive", args, device, peak, label="stage 2 step",
                             extra=["--stage", "2", "--shared-from", run.path("checkpoint.pt")])
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = common.get_device(args.device)
    torch.manual_seed(0)
    peak = matmul_peak(device, args.amp)
    print(f"device {device}, {torch.get_num_threads()} threads, {'bf16' if args.amp else 'fp32'} "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s, batch {args.batch_size}")
    rows = []
    if args.only in ("all", "dim"):
        rows += bench_dim(args, device, peak, "dim_local") + bench_dim(args, device, peak, "dim_global")
    if args.only in ("all", "scripts"):
        rows += bench_script("infogan", args, device, peak)
        rows += bench_script("infogan", args, device, peak, label="step, paper widths",
                             extra=["--width", "64", "--fc-dim", "1024"])
        rows += bench_script("infoae", args, device, peak)
        rows += bench_script("infoae", args, device, peak, label="step, paper widths",
                             extra=["--width", "64", "--hidden", "512"])
    if args.only in ("all", "scripts", "shared_exclusive"):
        rows += bench_shared_exclusive(args, device, peak)
    for r in rows:
        r.setdefault("peak MiB", float("nan"))
    common.print_table(rows)


if __name__ == "__main__":
    common.run_cli(main)
