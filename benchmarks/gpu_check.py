"""One command for the first GPU: every training script on CUDA, timed four ways.

    python benchmarks/gpu_check.py                   # about 10 minutes on one H100 (estimate)
    python benchmarks/gpu_check.py --steps 500 --out runs/gpu_check-h100

Each training script (dim_local, dim_global, infogan, infoae, shared_exclusive's two stages,
stage 2 from a one-step stage 1) trains `--steps` steps on the bundled digits (nothing to
download, nothing else to set up), batch 64 per GPU, monitor off, in four ways: plain (fp32 with TF32 matmuls, the scripts'
default on CUDA), `--amp` (bf16 autocast), `--compile`, and under `torchrun` with one process
per GPU (on a one-GPU machine that is the launcher and its environment, world size 1: no DDP).
Reported per run:
- ms per step and images/s: the median time between the ends of consecutive training steps
  (a hook stamps every optimiser step), after `--warmup` steps, so start-up, compilation,
  the epochs' checkpoints and the final evaluation are left out;
- peak GPU memory (torch.cuda.max_memory_allocated) over the whole run;
- the fraction of the GPU's matmul peak: FLOPs of one step (torch's FLOP counter, a two-step
  run minus a one-step run, plain) per second of step, over the peak of a large matmul
  measured here first, at the run's precision (TF32 for fp32, bf16 under --amp).
Writes gpu_check.json (every number, the device, torch and CUDA versions) and gpu_check.md
(the table) under --out and prints the table. A run that fails is reported with its error and
the others go on. Without CUDA it says so in one line and exits with status 2.
"""
import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts
import common  # noqa: E402
from common import UserError  # noqa: E402

# run name: (script, its flags); SHARED_FROM stands for a stage-1 checkpoint made first
SHARED_FROM = "<stage 1 checkpoint>"
SCRIPTS = {"dim_local": ("dim_local", []), "dim_global": ("dim_global", []),
           "infogan": ("infogan", []), "infoae": ("infoae", []),
           "shared_exclusive-1": ("shared_exclusive", ["--stage", "1"]),
           "shared_exclusive-2": ("shared_exclusive", ["--stage", "2", "--shared-from", SHARED_FROM])}
MODES = {"plain": [], "amp": ["--amp"], "compile": ["--compile"]}


def parse_args(argv=None):
    p = common.ArgumentParser(description="Time every training script on a CUDA GPU")
    p.add_argument("--steps", type=common.positive_int, default=300, help="training steps per run")
    p.add_argument("--warmup", type=common.positive_int, default=20,
                   help="steps left out of the timing (compilation happens in the first)")
    p.add_argument("--batch-size", type=common.batch_size_int, default=64, help="batch per GPU")
    p.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated subset")
    p.add_argument("--out", default=None,
                   help="folder for gpu_check.json and gpu_check.md (default runs/gpu_check-<time>)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # torchrun's side
    p.add_argument("--per-step", type=common.positive_int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shared-from", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.scripts = [s for s in args.scripts.split(",") if s]
    bad = [s for s in args.scripts if s not in SCRIPTS]
    if bad:
        p.error(f"unknown script(s) {', '.join(bad)}; choose from {', '.join(SCRIPTS)}")
    if args.warmup + 2 > args.steps:
        p.error(f"--steps {args.steps} leaves nothing to time after --warmup {args.warmup}")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, n=8192, repeats=20):
    """FLOP/s of an n x n matmul at `dtype` (fp32 with TF32 allowed, as the scripts run)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def script_argv(name, steps, batch_size, device, extra=(), shared_from=None):
    flags = [shared_from if f == SHARED_FROM else f for f in SCRIPTS[name][1]]
    return ["--no-progress", "--max-steps", str(steps), "--epochs", "100000", "--batch-size",
            str(batch_size), "--device", device.type, "--eval-every", "0", *flags, *extra]


def stage1_checkpoint(folder, batch_size, device):
    """A one-step stage-1 run of shared_exclusive, for stage 2 to start from."""
    import shared_exclusive
    with contextlib.redirect_stdout(io.StringIO()):
        run, _ = shared_exclusive.train(shared_exclusive.parse_args(
            [*script_argv("shared_exclusive-1", 1, batch_size, device), "--out-dir", folder]))
    return run.path("checkpoint.pt")


def train_once(name, argv, device, flop_counter=None):
    """One run of a script in this process: the time stamps of its optimiser steps (taken
    after a device synchronisation) and its peak GPU memory in MiB."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    module = importlib.import_module(SCRIPTS[name][0])
    stamps = []
    handle = register_optimizer_step_post_hook(
        lambda *_: (sync(device), stamps.append(time.perf_counter())))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
                (flop_counter or contextlib.nullcontext()):
            module.train(module.parse_args([*argv, "--out-dir", tmp]))
    finally:
        handle.remove()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")
    return stamps, peak


def step_times(stamps, per_step, warmup):
    """Seconds between the ends of consecutive training steps after `warmup` steps; a
    training step is `per_step` optimiser steps."""
    ends = stamps[per_step - 1::per_step]
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def flops_per_step(name, batch_size, device, shared_from=None):
    """(FLOPs of one training step, optimiser steps per training step), from a two-step run
    minus a one-step run under torch's FLOP counter (set-up and final evaluation cancel)."""
    from torch.utils.flop_counter import FlopCounterMode
    counted = []
    for steps in (1, 2):
        counter = FlopCounterMode(display=False)
        argv = script_argv(name, steps, batch_size, device, shared_from=shared_from)
        stamps, _ = train_once(name, argv, device, counter)
        counted.append((len(stamps), counter.get_total_flops()))
    (n1, f1), (n2, f2) = counted
    return f2 - f1, n2 - n1


def row_of(name, mode, times, peak_mib, batch, flops_per_gpu, matmul_peak_flops):
    """One table row; `batch` is the global batch, the FLOPs and the peak one GPU's."""
    ms = 1000 * statistics.median(times)
    return {"script": name, "mode": mode, "steps timed": len(times), "ms/step": ms,
            "images/s": batch / (ms / 1000), "peak MiB": peak_mib,
            "fraction of matmul peak": flops_per_gpu / (ms / 1000) / matmul_peak_flops}


def measure(name, mode_flags, steps, warmup, batch_size, device, per_step, shared_from=None):
    """Step times (s) and peak memory of one in-process run of `name`."""
    argv = script_argv(name, steps, batch_size, device, mode_flags, shared_from)
    stamps, peak = train_once(name, argv, device)
    times = step_times(stamps[:steps * per_step], per_step, warmup)  # not the final probes' steps
    if not times:
        raise RuntimeError(f"{name}: {len(stamps)} optimiser steps, too few to time")
    return times, peak


def measure_torchrun(name, args, per_step, n_gpus, shared_from=None):
    """The same run under torchrun, one process per GPU (--batch-size is the global batch
    there, so each GPU keeps --batch-size); rank 0 reports through a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "worker.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n_gpus}", os.path.abspath(__file__), "--worker", name,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
               str(args.batch_size * n_gpus), "--per-step", str(per_step), "--json", out,
               *(["--shared-from", shared_from] if shared_from else [])]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:  # the worker's own one-line error, else stderr's last real line
            lines = [l for l in p.stderr.splitlines() if l.strip() and set(l.strip()) != {"="}]
            said = [l for l in lines if l.startswith("error: ")] or lines[-1:] or ["no output"]
            raise RuntimeError(f"torchrun exited with {p.returncode}: {said[0][:200]}")
        with open(out) as f:
            result = json.load(f)
    return result["times"], result["peak_mib"]


def worker(args):
    """Inside torchrun: one run of args.worker; rank 0 writes its step times."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    times, peak = measure(args.worker, [], args.steps, args.warmup, args.batch_size, device,
                          args.per_step, args.shared_from)
    if int(os.environ.get("RANK", "0")) == 0:
        common.atomic_write_text(args.json, json.dumps({"times": times, "peak_mib": peak}))


def markdown_table(rows):
    keys = ["script", "mode", "ms/step", "images/s", "peak MiB", "fraction of matmul peak"]
    fmt = {"ms/step": "{:.2f}", "images/s": "{:.0f}", "peak MiB": "{:.0f}",
           "fraction of matmul peak": "{:.3f}"}
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        if "error" in r:
            cells = [r["script"], r["mode"], f"failed: {r['error']}", "", "", ""]
        else:
            cells = [fmt.get(k, "{}").format(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def error_text(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def run_all(args, device, n_gpus, peaks, modes=MODES):
    """Every run of the table, in order; a failing run becomes a row with its error."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scripts:
            try:
                shared_from = (stage1_checkpoint(tmp, args.batch_size, device)
                               if SHARED_FROM in SCRIPTS[name][1] else None)
                flops, per_step = flops_per_step(name, args.batch_size, device, shared_from)
            except Exception as e:  # noqa: BLE001 - report it and go on to the next script
                rows.append({"script": name, "mode": "all", "error": error_text(e)})
                continue
            for mode in [*modes, "torchrun"]:
                try:
                    if mode == "torchrun":
                        times, peak = measure_torchrun(name, args, per_step, n_gpus, shared_from)
                        batch = args.batch_size * n_gpus
                    else:
                        torch._dynamo.reset()  # each compiled run starts from no cache
                        times, peak = measure(name, modes[mode], args.steps, args.warmup,
                                              args.batch_size, device, per_step, shared_from)
                        batch = args.batch_size
                    rows.append(row_of(name, mode, times, peak, batch, flops,
                                       peaks["bf16" if mode == "amp" else "tf32"]))
                except Exception as e:  # noqa: BLE001
                    rows.append({"script": name, "mode": mode, "error": error_text(e)})
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("gpu_check needs a CUDA GPU and torch sees none here; "
                        "benchmarks/speed.py times the scripts on a CPU")
    if args.worker:
        return worker(args)
    device = torch.device("cuda")
    n_gpus = torch.cuda.device_count()
    peaks = {"tf32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    info = {"device": torch.cuda.get_device_name(device), "gpus": n_gpus,
            "torch": torch.__version__, "cuda": torch.version.cuda, "steps": args.steps,
            "warmup": args.warmup, "batch_size_per_gpu": args.batch_size,
            "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    print(f"{info['device']} x{n_gpus}, torch {info['torch']}, CUDA {info['cuda']}; matmul peak "
          f"TF32 {peaks['tf32'] / 1e12:.0f}, bf16 {peaks['bf16'] / 1e12:.0f} TFLOP/s")
    rows = run_all(args, device, n_gpus, peaks)
    out = args.out or os.path.join(ROOT, "runs", f"gpu_check-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(out, exist_ok=True)
    table = markdown_table(rows)
    common.atomic_write_text(os.path.join(out, "gpu_check.json"),
                             json.dumps({**info, "rows": rows}, indent=2))
    common.atomic_write_text(os.path.join(out, "gpu_check.md"),
                             f"{info['device']} x{n_gpus}, torch {info['torch']}, CUDA {info['cuda']}, "
                             f"{args.steps} steps, batch {args.batch_size} per GPU, {info['date']}\n\n"
                             + table)
    print("\n" + table + f"\nwrote {out}/gpu_check.json and gpu_check.md")
    return rows


if __name__ == "__main__":
    common.run_cli(main)
