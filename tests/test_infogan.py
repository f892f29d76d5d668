"""InfoGAN: the information loss's sign, the traversal grid's layout, and a short real run
in which Q learns to recover the codes G was given (with checkpoint, eval format, resume)."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
import infogan


def test_info_loss_is_lower_when_q_recovers_the_codes():
    g = torch.Generator().manual_seed(0)
    codes = infogan.Codes(noise_dim=4, n_cat=2, cat_dim=10, n_cont=3)
    _, cat, cont = codes.sample(256, "cpu", rng=g)
    right_logits = 5 * F.one_hot(cat, 10).float()  # (N, 2, 10) peaked on the true category
    wrong_logits = 5 * F.one_hot((cat + 3) % 10, 10).float()
    logvar = torch.full_like(cont, -2.0)
    right = infogan.info_loss((right_logits, cont, logvar), cat, cont, 1.0, 0.1)
    wrong = infogan.info_loss((wrong_logits, -cont, logvar), cat, cont, 1.0, 0.1)
    uniform = infogan.info_loss((torch.zeros_like(right_logits), torch.zeros_like(cont),
                                 torch.zeros_like(cont)), cat, cont, 1.0, 0.1)
    assert right[0] < uniform[0] < wrong[0]
    assert right[1] < wrong[1] and right[2] < wrong[2]  # both parts, not only their sum
    # an uninformative Q gives CE = H(c) = n_cat * log K exactly: the MI bound H - CE is 0
    assert uniform[1].item() == pytest.approx(2 * math.log(10), rel=1e-5)
    # Gaussian NLL of a standard normal Q: 0.5 * (log 2 pi + c^2), summed over the 3 codes
    assert uniform[2].item() == pytest.approx((0.5 * (math.log(2 * math.pi) + cont ** 2)).sum(1).mean().item(), rel=1e-5)
    # the weights scale each part
    only_cont = infogan.info_loss((wrong_logits, cont, logvar), cat, cont, 0.0, 1.0)
    assert only_cont[0].item() == pytest.approx(right[2].item(), rel=1e-5)


def test_descending_the_info_loss_moves_q_toward_the_true_codes():
    cat = torch.tensor([[3]])
    cont = torch.tensor([[0.7]])
    logits = torch.zeros(1, 1, 10, requires_grad=True)
    mu = torch.zeros(1, 1, requires_grad=True)
    loss, _, _ = infogan.info_loss((logits, mu, torch.zeros(1, 1)), cat, cont, 1.0, 0.1)
    loss.backward()
    assert logits.grad[0, 0, 3] < 0 and (logits.grad[0, 0, torch.arange(10) != 3] > 0).all()
    assert mu.grad.item() < 0  # gradient descent raises mu toward c = 0.7


def test_traversal_grid_layout():
    codes = infogan.Codes(noise_dim=5, n_cat=2, cat_dim=10, n_cont=3)
    z = torch.randn(1, 5)
    g_in, (rows, cols) = infogan.traversal_inputs(codes, z, steps=7)
    assert (rows, cols) == (10, 21)
    grid = g_in.view(rows, cols, -1)
    assert torch.equal(grid[..., :5], z.expand(rows, cols, 5))  # one fixed noise vector
    cat1 = grid[..., 5:15].argmax(-1)
    assert torch.equal(cat1, torch.arange(10)[:, None].expand(10, 21))  # row r: category r
    assert (grid[..., 15:25].argmax(-1) == 0).all()  # the second categorical code held at 0
    cont = grid[..., 25:]
    sweep = torch.linspace(-2, 2, 7)
    for j in range(3):
        block = cont[:, j * 7:(j + 1) * 7]
        assert torch.allclose(block[..., j], sweep.expand(10, 7))
        assert (block[..., [k for k in range(3) if k != j]] == 0).all()
    # G maps it to one image per cell, at the data's channels and size
    gen = infogan.Generator(codes.input_dim, out_channels=3, image_size=32).eval()
    with torch.no_grad():
        assert gen(g_in).shape == (rows * cols, 3, 32, 32)


def test_traversal_without_continuous_codes_sweeps_the_noise():
    codes = infogan.Codes(noise_dim=5, n_cat=1, cat_dim=4, n_cont=0)
    z = torch.randn(6, 5)
    g_in, (rows, cols) = infogan.traversal_inputs(codes, z, steps=6)
    assert (rows, cols) == (4, 6)
    assert torch.equal(g_in.view(4, 6, -1)[..., :5], z.expand(4, 6, 5))


def test_bad_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        infogan.parse_args(["--n-cat", "0", "--n-cont", "0"])
    assert e.value.code == 2
    assert "no code for Q to recover" in capsys.readouterr().err


def test_short_run_q_recovers_the_codes_and_resumes(tmp_path):
    # the paper's losses and init alone: the recipe's terms (the clustering term, Q's larger
    # logits) pay off over thousands of steps; over 60 they leave the continuous codes less
    # learnt (correlations 0.14-0.22 at --cat-init-std 0.05), and this test checks the
    # information term
    common_flags = ["--no-progress", "--out-dir", str(tmp_path), "--batch-size", "32",
                    "--traversal-steps", "5", "--instance-noise", "0", "--lambda-cat", "1",
                    "--cluster-mi", "0", "--cat-init-std", "0.02"]
    run = infogan.main(common_flags + ["--epochs", "1", "--max-steps", "30"])
    ckpt_path = run.path("checkpoint.pt")
    assert os.path.exists(run.path("traversal_epoch001.png"))
    assert os.path.exists(run.path("samples_epoch001.png"))
    from PIL import Image
    with Image.open(run.path("traversal_epoch001.png")) as im:  # 10 rows x 2*5 columns of 32+2 px
        assert im.size == (2 + 10 * 34, 2 + 10 * 34)

    # resume: continues the step count in the same folder
    run2 = infogan.main(common_flags + ["--epochs", "2", "--max-steps", "60", "--resume", ckpt_path])
    assert run2.dir == run.dir
    lines = [json.loads(l) for l in open(run.path("metrics.jsonl"))]
    assert [l["step"] for l in lines if "epoch" in l] == [30, 60]
    final = lines[-1]
    assert len(final["cluster_acc_per_code"]) == 1

    # the checkpoint alone rebuilds the encoder (as eval_probe.py does) with the promised taps
    ckpt = common.load_checkpoint(ckpt_path)
    assert ckpt["step"] == 60 and ckpt["encoder_cfg"]["arch"] == "infogan"
    encoder = common.encoder_from_checkpoint(ckpt, infogan.ENCODERS).eval()
    shapes = common.tap_shapes(encoder, (1, 32, 32))
    args = infogan.parse_args([])  # digits defaults: w = 32, fc 256 (the paper's 64, 1024)
    assert (args.width, args.fc_dim, args.q_dim) == (32, 256, 128)
    assert shapes["conv"] == (64, 8, 8) and shapes["fc"] == (256,) and shapes["y"] == (128,)

    # Q recovers the codes of fresh samples from G far better than chance
    codes = infogan.Codes(args.noise_dim, 1, 10, 2)
    gen = infogan.Generator(codes.input_dim, 1, 32, args.width, args.fc_dim)
    gen.load_state_dict(ckpt["modules"]["generator"])
    q_head = infogan.QHead(codes, args.q_dim, args.learn_cont_var)
    q_head.load_state_dict(ckpt["modules"]["q_head"])
    gen.eval()
    g = torch.Generator().manual_seed(123)
    z, cat, cont = codes.sample(2000, "cpu", rng=g)
    with torch.no_grad():
        logits, mu, _ = q_head(encoder(gen(codes.gen_input(z, cat, cont)))["y"])
    cat_acc = (logits.argmax(-1) == cat).float().mean().item()
    # 60 steps do not cluster real digits better than an untrained Q does (0.25-0.29 for
    # seeds 0-3), so the clustering accuracy is checked for what it measures: argmax Q of
    # the saved trunk and head on the test images, as logged
    accs = infogan.cluster_accuracies(encoder, q_head, common.load_data("digits"), "cpu")
    assert accs == pytest.approx(final["cluster_acc_per_code"], abs=1e-12)
    corr = [torch.corrcoef(torch.stack([mu[:, j], cont[:, j]]))[0, 1].item() for j in range(2)]
    print("Q recovers: categorical accuracy", cat_acc, "continuous correlations", corr)
    assert cat_acc > 0.5, cat_acc  # chance is 0.1
    # lambda_cont = 0.1 makes the continuous codes slower to learn; with 2000 samples a
    # correlation's spread under independence is about 0.02
    assert min(corr) > 0.15, corr


def test_runs_under_torchrun_with_two_processes_and_only_rank_0_writes(tmp_path):
    """DDP end to end with two gloo processes: a clean exit, one run folder, and a checkpoint
    whose networks load without DDP's "module." prefixes."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "infogan.py", "--device", "cpu", "--max-steps", "2", "--no-progress",
         "--out-dir", str(tmp_path), "--traversal-steps", "3"],
        cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1 and proc.stdout.count("run folder:") == 1
    assert proc.stdout.count("cluster acc") == 1  # only rank 0 evaluates and prints
    lines = [json.loads(l) for l in open(runs[0] / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [2, 2]  # one epoch line and the final line, once
    ckpt = common.load_checkpoint(runs[0] / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["args"]["batch_size"] == 32
    common.encoder_from_checkpoint(ckpt, infogan.ENCODERS)  # strict: a DDP "module." prefix would fail here
    args = infogan.parse_args([])
    codes = infogan.Codes(args.noise_dim, args.n_cat, args.cat_dim, args.n_cont)
    infogan.Generator(codes.input_dim, 1, 32, args.width, args.fc_dim).load_state_dict(
        ckpt["modules"]["generator"])


def test_recipe_by_default_paper_one_flag_away():
    recipe, paper = infogan.parse_args([]), infogan.parse_args(["--paper"])
    assert {k: getattr(recipe, k) for k in infogan.RECIPE} == infogan.RECIPE
    assert {k: getattr(paper, k) for k in infogan.PAPER} == infogan.PAPER
    assert (paper.width, paper.fc_dim, paper.lambda_cat, paper.cluster_mi) == (64, 1024, 1.0, 0.0)
    assert (paper.epochs, recipe.epochs) == (infogan.PAPER_EPOCHS, None)  # None: RECIPE_STEPS
    assert infogan.parse_args(["--paper", "--width", "32"]).width == 32  # a flag given wins
    assert infogan.parse_args(["--cluster-mi", "0"]).cluster_mi == 0.0


def test_instance_noise_has_the_asked_std_and_zero_is_the_identity():
    x = torch.zeros(64, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert common.instance_noise(x, 0.0, g) is x
    noisy = common.instance_noise(x, 0.7, g)
    assert noisy.shape == x.shape and noisy.std().item() == pytest.approx(0.7, rel=0.02)
    assert abs(noisy.mean().item()) < 0.01


def test_warp_changes_what_d_and_q_read(tmp_path):
    flags = ["--no-progress", "--max-steps", "1", "--epochs", "1", "--eval-every", "0",
             "--instance-noise", "0", "--image-every", "100", "--cluster-mi", "0"]
    first = lambda name, *extra: [json.loads(l) for l in open(infogan.main(
        flags + ["--out-dir", str(tmp_path / name), *extra]).metrics_path) if "epoch" in l][0]
    plain, warped = first("plain"), first("warp", "--warp")
    assert warped["d_loss"] != pytest.approx(plain["d_loss"], abs=1e-4)  # same batch, other views
    assert all(math.isfinite(v) for v in warped.values())
    # --cluster-mi runs its term in D and Q's step (minus IIC's objective at balance 2: on
    # Q's near-uniform start at DCGAN's init, about -2 log 10); 0, the paper, leaves it out
    clustered = first("cluster", "--cluster-mi", "1", "--cat-init-std", "0.02")
    assert "clu_mi" not in plain and clustered["clu_mi"] == pytest.approx(-2 * math.log(10), abs=0.2)


class ClassMeanGenerator(torch.nn.Module):
    """Draws the mean real image of class mapping[c] for category c, whatever z is."""

    def __init__(self, codes, data, mapping):
        super().__init__()
        x = data.train_x.float() / 127.5 - 1 if not data.train_x.is_floating_point() else data.train_x
        means = torch.stack([x[data.train_y == k].mean(0) for k in range(10)])
        self.codes, self.means, self.mapping = codes, means, torch.as_tensor(mapping)

    def forward(self, g_in):
        onehot = g_in[:, self.codes.noise_dim:self.codes.noise_dim + self.codes.cat_dim]
        return self.means[self.mapping[onehot.argmax(1)]]


def test_generated_category_purity_tells_digit_categories_from_merged_ones():
    data = common.load_data("digits")
    codes = infogan.Codes(noise_dim=4, n_cat=1, cat_dim=10, n_cont=0)
    one_digit_each = ClassMeanGenerator(codes, data, [3, 1, 4, 0, 5, 9, 2, 6, 8, 7])
    assert infogan.generated_category_purity(one_digit_each, codes, data, "cpu", n=500) > 0.95
    # two categories per digit for five digits: at most half the samples can be matched
    pairs = ClassMeanGenerator(codes, data, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert 0.4 < infogan.generated_category_purity(pairs, codes, data, "cpu", n=500) <= 0.55


def test_clustering_term_makes_q_agree_on_warped_real_images():
    # --cluster-mi's term alone, into the trunk and Q, with two categorical codes (so a
    # swapped axis shows): each code's categories of real digits and of their warped copies
    # come to share information (IIC's objective at balance 1; log 10 = 2.3 at most) and
    # stay spread over the categories
    torch.manual_seed(0)
    digits = common.load_data("digits")
    args = infogan.parse_args([])
    codes = infogan.Codes(args.noise_dim, 2, 10, 2)
    enc = infogan.InfoGANEncoder(digits.image_shape[0], digits.image_shape[1], 128, width=16, fc_dim=64)
    q_head = infogan.QHead(codes, 128, 1)
    for m in (enc, q_head):
        infogan.dcgan_init(m)
    q_head.rescale_logits_init_(0.1)  # off uniform Q's saddle (no gradient there)
    x = digits.preprocess(digits.train_x[:256], train=True)

    def information():
        with torch.no_grad():
            real = q_head(enc(x)["y"])[0]
            warp = q_head(enc(common.random_affine(x, rng=torch.Generator().manual_seed(5)))["y"])[0]
        return ([float(common.cluster_information(real[:, i], warp[:, i])) for i in range(2)],
                [len(real[:, i].argmax(1).unique()) for i in range(2)])
    before, _ = information()
    opt = torch.optim.Adam([*enc.parameters(), *q_head.parameters()], 1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        xb = x[torch.randint(0, len(x), (64,), generator=g)]
        logits = q_head(enc(torch.cat([xb, common.random_affine(xb, rng=g)]))["y"])[0]
        opt.zero_grad()
        infogan.clustering_loss(logits[:64], logits[64:], balance=2.0).backward()
        opt.step()
    after, used = information()
    print("I(Q's category; Q's category of the warp) per code, before / after:", before, after, used)
    assert max(before) < 0.01 and min(after) > 0.8, (before, after)  # 1.4-1.6 for seeds 0-3
    assert min(used) >= 8


def test_cat_init_std_starts_the_clustering_term_off_its_saddle():
    # DCGAN's N(0, 0.02) leaves Q's softmax nearly uniform, where IIC's objective has almost
    # no gradient; --cat-init-std 0.1 rescales the logits' rows alone, and the term pulls
    g = torch.Generator().manual_seed(0)
    y = torch.randn(256, 128, generator=g)
    y_warp = y + 0.3 * torch.randn(256, 128, generator=g)  # Q's hidden layer for a warped copy
    grads, weights = {}, {}
    for std in (0.02, 0.1):
        torch.manual_seed(1)  # the same draw for both
        q_head = infogan.QHead(infogan.Codes(8, 1, 10, 2), 128, True)
        infogan.dcgan_init(q_head)
        q_head.rescale_logits_init_(std)
        weights[std] = q_head.out.weight.detach().clone()
        infogan.clustering_loss(q_head(y)[0], q_head(y_warp)[0], balance=2.0).backward()
        grads[std] = float(q_head.out.weight.grad[:10].norm())
    assert torch.allclose(weights[0.1][:10], 5 * weights[0.02][:10])
    assert torch.equal(weights[0.1][10:], weights[0.02][10:])  # the continuous codes' rows
    assert grads[0.1] > 10 * grads[0.02], grads


def test_clustering_term_warps_a_neighbour_of_each_real_image(tmp_path, monkeypatch):
    # --cluster-neighbours 1: the second view of each real image is a warp of itself or of
    # its nearest other training image, half the time each
    seen = {}
    draw, warp = common.random_neighbours, common.random_affine
    monkeypatch.setattr(common, "random_neighbours", lambda table, idx, *a, **kw: seen.update(
        table=table, idx=idx, drawn=draw(table, idx, *a, **kw)) or seen["drawn"])
    monkeypatch.setattr(common, "random_affine", lambda x, *a, **kw: seen.setdefault(
        "warped", x) is None or warp(x, *a, **kw))
    run = infogan.main(["--no-progress", "--max-steps", "1", "--epochs", "1", "--eval-every", "0",
                        "--image-every", "100", "--cluster-neighbours", "1",
                        "--out-dir", str(tmp_path)])
    data = common.load_data("digits")
    nearest = common.nearest_neighbours(data.train_x, 1)[:, 0]
    assert torch.equal(seen["table"][:, 1], nearest)
    own = seen["drawn"] == seen["idx"]
    assert torch.equal(seen["drawn"][~own], nearest[seen["idx"][~own]])
    assert 0.25 < own.float().mean() < 0.75  # both partners drawn, about half the time each
    assert torch.equal(seen["warped"], data.images("train", seen["drawn"]))
    assert json.loads(open(run.path("args.json")).read())["cluster_neighbours"] == 1


def test_adam_beta1_is_spelled_as_in_infoae():
    assert infogan.parse_args(["--adam-beta1", "0.3"]).adam_beta1 == 0.3
    with pytest.raises(SystemExit):  # the old spelling is one argparse error, not a silent default
        infogan.parse_args(["--beta1", "0.3"])


def test_ema_averages_the_trained_weights_and_zero_saves_them(tmp_path):
    trained, averaged = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start, w = averaged.weight.detach().clone(), trained.weight.detach().clone()
    common.average_weights_(averaged, trained, 0.9, step=1000)  # d = 0.9
    assert torch.allclose(averaged.weight, 0.9 * start + 0.1 * w)
    common.average_weights_(averaged, trained, 0.9, step=0)  # d = min(0.9, 1 / 10): the start fades fast
    assert torch.allclose(averaged.weight, 0.1 * (0.9 * start + 0.1 * w) + 0.9 * w)
    with pytest.raises(SystemExit):
        infogan.parse_args(["--ema", "1"])  # a decay of 1 never leaves the initialisation

    flags = ["--no-progress", "--width", "8", "--fc-dim", "32", "--q-dim", "16", "--max-steps", "20",
             "--epochs", "1", "--eval-every", "0"]
    saved = {}
    for ema in ("0", "0.5"):
        run = infogan.main(flags + ["--ema", ema, "--out-dir", str(tmp_path / ema)])
        saved[ema] = common.load_checkpoint(run.path("checkpoint.pt"))
    assert "trained_encoder" not in saved["0"]["modules"]  # the checkpoint's encoder is the trained one
    averaged, ckpt = saved["0.5"]["encoder"], saved["0.5"]["modules"]
    # same seed, same training: the trained weights do not depend on --ema
    for k, v in saved["0"]["encoder"].items():
        assert torch.equal(v, ckpt["trained_encoder"][k]), k
    # the average trails the trained weights (d = 0.5 here: about the last two steps)
    diff = (averaged["fc.0.weight"] - ckpt["trained_encoder"]["fc.0.weight"]).abs().mean()
    assert 0 < diff < ckpt["trained_encoder"]["fc.0.weight"].abs().mean()
