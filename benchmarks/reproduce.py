"""Every method's documented recipe, run and evaluated by one command.

    python benchmarks/reproduce.py                                   # the bundled digits
    python benchmarks/reproduce.py --dataset mnist --data-root DIR --seeds 0,1,2   # DIR/MNIST/raw
    python benchmarks/reproduce.py --dataset fashion-mnist --data-root DIR --only dim_local
    python benchmarks/reproduce.py --merge a.json b.json --out all.json   # calls run side by side

Each recipe is one command line of a training script (RECIPES below), on the bundled digits
or on MNIST / Fashion-MNIST read offline from --data-root (for shared_exclusive the colourful
pairs built from them). Every run is evaluated with eval_probe.py's probes (DIM) or with
the numbers the script logs for its own representation (InfoGAN and InfoAE: clustering
accuracy of the categorical code; shared/exclusive: what S and Z predict). The baselines are
measured in the same call: logistic regression, cosine 20-NN and k-means on raw pixels, and
the untrained encoder; with shared_exclusive rows, the grey images' own level too (its MLP
probe on the class from the grey pixels and from their first 16 and 32 principal components).

Numbers depend on the thread count (float reductions are split differently), the torch
version and the device, so the runs use a fixed --threads and the JSON records all three.
A seed gives the same numbers on every run of the same command on the same machine.
Writes --out (JSON, method -> seed -> metric) and prints a markdown table.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# method -> (script, flags). A dataset other than the bundled digits adds --dataset and
# --data-root (shared_exclusive: the colourful pairs built from it, see PAIR_DATASETS).
SE_PROBES = ["--probes", "sk-mlp,whitened-sk-mlp"]
RECIPES = {
    # every script's defaults are its measured recipe (docs/<script>.md); --paper restores the
    # paper's configuration
    "dim_local": ("dim_local.py", []),
    "dim_local_paper": ("dim_local.py", ["--paper"]),
    "dim_global": ("dim_global.py", []),
    "dim_global_paper": ("dim_global.py", ["--paper"]),
    "infogan": ("infogan.py", []),
    "infogan_paper": ("infogan.py", ["--paper"]),
    "infoae": ("infoae.py", []),
    "infoae_paper": ("infoae.py", ["--paper"]),
    # shared/exclusive: the MLP probe and the MLP on PCA-whitened codes (what lies in
    # directions of small variance), in one run
    "shared_exclusive": ("shared_exclusive.py", SE_PROBES),
    # the paper's configuration (arXiv:1912.03915): 64-d S and 8-d Z, neither normalised, L1
    # 0.1, the S-Z adversary at 0.1 and no HSIC, c2's map for C(x); the recipe's stage lengths
    "shared_exclusive_paper": ("shared_exclusive.py", ["--paper", *SE_PROBES]),
}
# lengths the benchmark sets where the paper's would not fit CPU minutes (DIM: 200 epochs
# outside CIFAR, whose 2048-wide DIM(L) critic costs over a second a CPU step; InfoGAN and
# InfoAE give none, --paper runs 50 epochs: 94,000 steps of 60,000 images)
EXTRA_FLAGS = {**{(m, d): ["--epochs", e] for m in ("dim_local_paper", "dim_global_paper")
                  for d, e in (("digits", "6"), ("mnist", "20"), ("fashion-mnist", "1"))},
               **{(m, "fashion-mnist"): ["--epochs", "2"] for m in ("infogan_paper", "infoae_paper")}}
# dataset -> the folder torchvision reads under --data-root
RAW_FOLDERS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
# shared_exclusive's pairs; digits: its default
PAIR_DATASETS = {"mnist": "colorful-mnist", "fashion-mnist": "colorful-fashion-mnist"}
SHARED_EXCLUSIVE_KEYS = {  # reproduce key -> the script's logged metric (MLP probe)
    "s_x_class": "acc_SX_class", "s_y_class": "acc_SY_class",
    "s_x_background": "acc_SX_background", "s_y_foreground": "acc_SY_foreground",
    "z_x_background": "acc_ZX_background", "z_y_foreground": "acc_ZY_foreground",
    "z_x_class": "acc_ZX_class", "z_y_class": "acc_ZY_class",
}
SHARED_EXCLUSIVE_KEYS.update({k + "_whitened": v + "_whitened-sk-mlp" for k, v in list(SHARED_EXCLUSIVE_KEYS.items())})


def positive_int(s):
    if int(s) <= 0:  # 0 or less would mean no cap, or fail every recipe
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return int(s)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=["digits", *RAW_FOLDERS],
                   help="digits: scikit-learn's bundled digits (offline); mnist, fashion-mnist: "
                        "read from --data-root in torchvision's layout")
    p.add_argument("--data-root", default=None,
                   help="folder holding DATASET in torchvision's layout (DIR/MNIST/raw, "
                        "DIR/FashionMNIST/raw); with no --dataset it means mnist")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of " + ",".join(RECIPES) + " (default: every "
                        "method the dataset has)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every run")
    p.add_argument("--out", default="results.json", help="JSON written here")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="cap every run's steps (a smoke test of this script; not the recipes' numbers)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the raw-pixel baselines (minutes on 60,000 images), e.g. in calls "
                        "that --merge joins to one that measured them")
    p.add_argument("--keep-runs", default=None, metavar="DIR",
                   help="keep the run folders under DIR (default: a temporary folder)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: join these --out files (one dataset, threads and torch, "
                        "say calls that ran side by side) into --out and print their table")
    args = p.parse_args(argv)
    if args.only is None:
        pairs = args.dataset in ("digits", *PAIR_DATASETS)
        args.only = ",".join(m for m in RECIPES if pairs or not m.startswith("shared_exclusive"))
    args.only = [m for m in args.only.split(",") if m]
    bad = [m for m in args.only if m not in RECIPES]
    if bad:
        p.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(RECIPES)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if len(set(args.seeds)) != len(args.seeds) or not all(0 <= s < 2**32 for s in args.seeds):
        p.error(f"--seeds {','.join(map(str, args.seeds))}: each seed once, each in [0, 2**32)")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.data_root is not None and args.dataset == "digits":
        args.dataset = "mnist"  # the older spelling: --data-root alone meant MNIST
    if args.dataset != "digits":
        if args.data_root is None:
            p.error(f"--dataset {args.dataset} needs --data-root DIR holding {RAW_FOLDERS[args.dataset]}")
        raw = os.path.join(args.data_root, RAW_FOLDERS[args.dataset])
        if not os.path.isdir(raw):
            p.error(f"--data-root {args.data_root} has no {RAW_FOLDERS[args.dataset]} folder "
                    "(torchvision's layout)")
    no_pairs = [m for m in args.only if m.startswith("shared_exclusive")
                and args.dataset not in ("digits", *PAIR_DATASETS)]
    if no_pairs:
        p.error(f"{', '.join(no_pairs)}: no colourful pairs are built from {args.dataset}; "
                f"leave it out of --only")
    # what would fail only after the first recipe (minutes to an hour in) is checked now
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        p.error(f"--out {args.out}: {folder} is not a writable folder")
    if args.keep_runs and not args.merge:
        used = [f"{m}-seed{s}" for m in args.only for s in args.seeds
                if os.path.exists(os.path.join(args.keep_runs, f"{m}-seed{s}"))]
        if used:
            p.error(f"--keep-runs {args.keep_runs} already holds {', '.join(used)}; pass a new folder")
    return args


def recipe_command(method, dataset, data_root, seed):
    """The command line behind a number, as a user would type it."""
    script, flags = RECIPES[method]
    data = []
    if dataset != "digits":
        name = PAIR_DATASETS[dataset] if method.startswith("shared_exclusive") else dataset
        data = ["--dataset", name, "--data-root", data_root]
    return ["python", script, *data, *flags, *EXTRA_FLAGS.get((method, dataset), []),
            "--seed", str(seed)]


def environment(threads):
    """What the numbers and minutes depend on. `cpu_capability` is the widest vector
    instruction set torch's CPU kernels use here (AVX2, AVX512, ...), which the minutes follow
    (docs/shared_exclusive.md)."""
    import torch
    return {"threads": threads, "torch": torch.__version__, "device": "cpu",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine()}


def environment_clash(a, b):
    """The first key both environments record with different values, or None (files written
    before a key was recorded are not refused for lacking it)."""
    return next((k for k in a if k in b and a[k] != b[k]), None)


class RunFailed(Exception):
    pass


def run(cmd, threads, log_path):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               CUDA_VISIBLE_DEVICES="")  # the recorded numbers are CPU numbers
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, *cmd[1:]], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    if code != 0:
        with open(log_path) as f:
            lines = [l for l in f.read().splitlines() if l.strip()]
        raise RunFailed(f"exit {code}: {lines[-1] if lines else 'no output'}")


def last_metrics(run_dir):
    """The run's end-of-training lines (those after the last epoch's), merged."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f.read().splitlines() if l.strip()]
    final = {}
    for line in reversed(lines):
        if "epoch" in line and final:
            break
        final = {**line, **final}
    return final


def probe(checkpoint, threads, log_path, random_init=False):
    """eval_probe.py's linear / k-NN / k-means accuracy on y and linear on conv, as
    {tap: {probe: acc}} (conv's k-NN and k-means, on 4,096-d features, are not reported)."""
    results = {}
    for tap, probes in (("y", "linear,knn,kmeans"), ("conv", "linear")):
        out = f"{checkpoint}{'.random-init' if random_init else ''}.{tap}.eval.json"
        # the README's y_knn: scikit-learn's uniform vote, as when the tables were measured
        run(["python", "eval_probe.py", checkpoint, "--probes", probes, "--taps", tap,
             "--knn-rule", "uniform", "--out", out, *(["--random-init"] if random_init else [])],
            threads, f"{os.path.splitext(log_path)[0]}-{tap}.log")
        with open(out) as f:
            results.update({r["tap"]: r for r in json.load(f)["results"]})
    return results


def metrics_of(method, run_dir, threads):
    m = last_metrics(run_dir)
    if method.startswith("dim_"):
        ckpt = os.path.join(run_dir, "checkpoint.pt")
        res = probe(ckpt, threads, os.path.join(run_dir, "eval.log"))
        rnd = probe(ckpt, threads, os.path.join(run_dir, "eval-random-init.log"), random_init=True)
        return {"y_linear": res["y"]["linear"], "y_knn": res["y"]["knn"],
                "y_kmeans": res["y"]["kmeans"], "conv_linear": res["conv"]["linear"],
                "untrained_y_linear": rnd["y"]["linear"], "untrained_y_knn": rnd["y"]["knn"],
                "untrained_y_kmeans": rnd["y"]["kmeans"], "untrained_conv_linear": rnd["conv"]["linear"]}
    if method in ("infogan", "infogan_paper"):
        return {"cluster_acc": m["cluster_acc"]}
    if method in ("infoae", "infoae_paper"):
        return {"cluster_acc": m["test_cluster_acc"]}
    return {k: m[v] for k, v in SHARED_EXCLUSIVE_KEYS.items()}


def pixel_baselines(dataset, data_root):
    """Raw pixels of the test split (images as the scripts read them, 32x32): standardised
    logistic regression, cosine 20-NN (neighbours from the train split) and k-means."""
    import torch
    import common
    data = common.load_data(dataset, data_root or "./data")
    flat = lambda x: (x.float() / 255).flatten(1).numpy()
    tx, vx = flat(data.train_x), flat(data.test_x)
    ty, vy = data.train_y.numpy(), data.test_y.numpy()
    torch.set_num_threads(1)
    return {"pixels_linear": common.linear_probe(tx, ty, vx, vy),
            "pixels_knn": common.knn_accuracy(tx, ty, vx, vy, k=20),
            "pixels_kmeans": common.kmeans_accuracy(vx, vy, data.n_classes, seed=0)}


def grey_baselines(dataset, data_root, seed=0):
    """The grey images' own level for shared_exclusive's pairs: the script's MLP probe (sk-mlp)
    predicting the class from the grey source's raw pixels and from their first 16 and 32
    principal components (fitted on the train split), test accuracy. S's class accuracy is
    read against these: a code cannot hold more class than the images it is computed from."""
    import warnings
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits
    import common
    import shared_exclusive
    data = common.load_data(dataset, data_root or "./data")
    flat = lambda x: (x.float() / 255).flatten(1).numpy()
    tx, vx = flat(data.train_x), flat(data.test_x)
    ty, vy = data.train_y.numpy(), data.test_y.numpy()
    levels = {}
    # as the script's evaluation table fits it: one BLAS thread, convergence warnings ignored
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, dims in (("grey_pixels_mlp", None), ("grey_pca16_mlp", 16), ("grey_pca32_mlp", 32)):
            pca = PCA(dims, random_state=seed).fit(tx) if dims else None
            tr, te = (pca.transform(tx), pca.transform(vx)) if pca else (tx, vx)
            levels[name] = shared_exclusive.probe_accuracy("sk-mlp", tr, ty, te, vy, seed)
    return levels


COLUMNS = {  # method -> the metrics its row shows
    "dim_local": ["y_linear", "y_knn", "y_kmeans", "conv_linear"],
    "dim_global": ["y_linear", "y_knn", "y_kmeans", "conv_linear"],
    "dim_local_paper": ["y_linear", "y_knn", "y_kmeans", "conv_linear"],
    "dim_global_paper": ["y_linear", "y_knn", "y_kmeans", "conv_linear"],
    **{m: ["cluster_acc"] for m in ("infogan", "infogan_paper", "infoae", "infoae_paper")},
}  # shared_exclusive's rows: shared_exclusive_cell


def shared_exclusive_cell(m, suffix):
    """'S class a / b, S colour c / d, Z colour e / f, Z class g / h' for X / Y."""
    pairs = [("S class", "s_x_class", "s_y_class"), ("S colour", "s_x_background", "s_y_foreground"),
             ("Z colour", "z_x_background", "z_y_foreground"), ("Z class", "z_x_class", "z_y_class")]
    return ", ".join(f"{name} {m[x + suffix]:.3f} / {m[y + suffix]:.3f}" for name, x, y in pairs)


def markdown(results):
    lines = ["| method | command | seed | result | minutes |", "| --- | --- | --- | --- | --- |"]
    for method in RECIPES:
        for seed, m in results.get(method, {}).items():
            cells = [f"failed ({m['error']})"] if "error" in m else []
            if method.startswith("shared_exclusive") and "error" not in m:
                cells = [shared_exclusive_cell(m, "") + "; whitened-sk-mlp " + shared_exclusive_cell(m, "_whitened")]
            for k in COLUMNS[method] if not cells else []:
                base = m.get("untrained_" + k)
                cells.append(f"{k} {m[k]:.3f}" + (f" (untrained {base:.3f})" if base is not None else ""))
            cmd = shlex.join(recipe_command(method, results["dataset"], "DIR", seed))
            lines.append(f"| {method} | `{cmd}` | {seed} | {', '.join(cells)} | {m['minutes']:.1f} |")
    b = results["baselines"]
    if b:
        knn = f", 20-NN {b['pixels_knn']:.3f}" if "pixels_knn" in b else ""
        lines.append(f"| raw pixels | | | linear {b['pixels_linear']:.3f}{knn}, k-means {b['pixels_kmeans']:.3f} | |")
    if "grey_pixels_mlp" in b:
        lines.append(f"| grey images, MLP probe on the class | | | pixels {b['grey_pixels_mlp']:.3f}, "
                     f"PCA-16 {b['grey_pca16_mlp']:.3f}, PCA-32 {b['grey_pca32_mlp']:.3f} | |")
    return "\n".join(lines)


def merge(paths):
    """One results dict from several --out files of the same dataset, threads and torch
    version; a method and seed present in two of them is an error, not a silent choice."""
    results = None
    for path in paths:
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --merge {path}: not a readable results file ({e})")
        for method in RECIPES:  # files written before pairs of garments: "digit" is the class
            for m in part.get(method, {}).values() if method.startswith("shared_exclusive") else ():
                for k in [k for k in m if "_digit" in k]:
                    m[k.replace("_digit", "_class")] = m.pop(k)
        if results is None:
            results = part
            continue
        results["baselines"] = results["baselines"] or part["baselines"]
        if part["dataset"] != results["dataset"]:
            raise SystemExit(f"error: --merge {path}: dataset {part['dataset']} differs from "
                             f"{results['dataset']}")
        clash = environment_clash(part["environment"], results["environment"])
        if clash:
            raise SystemExit(f"error: --merge {path}: environment {clash} {part['environment'][clash]!r} "
                             f"differs from {results['environment'][clash]!r}")
        results["environment"] = {**part["environment"], **results["environment"]}  # what any file records
        for method in RECIPES:
            for seed, m in part.get(method, {}).items():
                if seed in results.get(method, {}):
                    raise SystemExit(f"error: --merge {path}: {method} seed {seed} is in two files")
                results.setdefault(method, {})[seed] = m
    return results


def print_table(results, out):
    env = results["environment"]
    isa = f" ({env['cpu_capability']})" if "cpu_capability" in env else ""
    print(f"\n{results['dataset']}; CPU{isa}, {env['threads']} thread{'s' if env['threads'] != 1 else ''}, "
          f"torch {env['torch']}\n")
    print(markdown(results))
    print(f"\nwrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        results = merge(args.merge)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print_table(results, args.out)
        return
    results = {"environment": environment(args.threads),
               "dataset": args.dataset, "data_root": args.data_root,
               "baselines": {} if args.no_baselines else pixel_baselines(args.dataset, args.data_root)}
    if not args.no_baselines and any(m.startswith("shared_exclusive") for m in args.only):
        results["baselines"].update(grey_baselines(args.dataset, args.data_root))
    keep = args.keep_runs or tempfile.mkdtemp(prefix="reproduce-")
    for method in args.only:
        for seed in args.seeds:
            cmd = recipe_command(method, args.dataset, args.data_root, seed)
            out_dir = os.path.join(keep, f"{method}-seed{seed}")
            os.makedirs(out_dir, exist_ok=False)
            print(f"{shlex.join(cmd)}  ({args.threads} threads)", flush=True)
            t0 = time.time()
            try:
                cap = ["--max-steps", str(args.max_steps)] if args.max_steps else []
                run(cmd + cap + ["--out-dir", out_dir, "--no-progress"], args.threads,
                    os.path.join(out_dir, "train.log"))
                minutes = (time.time() - t0) / 60
                (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir)
                              if os.path.isdir(os.path.join(out_dir, d))]
                m = metrics_of(method, run_dir, args.threads)
            except RunFailed as e:  # recorded, and the other recipes still run
                minutes, m = (time.time() - t0) / 60, {"error": str(e)}
                print(f"  failed: {e}", flush=True)
            else:
                print("  " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()) +
                      f"  [{minutes:.1f} min]", flush=True)
            results.setdefault(method, {})[str(seed)] = {**m, "minutes": round(minutes, 2)}
            with open(args.out, "w") as f:  # after every run, so a long call can be read midway
                json.dump(results, f, indent=2)
    print(f"\nruns kept in {keep}")
    print_table(results, args.out)
    failed = [f"{m} seed {s}" for m in args.only for s, r in results[m].items() if "error" in r]
    if failed:  # the table says why; the exit status must say that it did not all run
        import common
        raise common.UserError(f"{len(failed)} of {len(args.only) * len(args.seeds)} runs failed "
                               f"({', '.join(failed)}); see their train.log under {keep}")


if __name__ == "__main__":
    import common  # a broken MNIST folder, a full disk: one line and exit status 2
    common.run_cli(main)
