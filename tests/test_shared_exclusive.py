"""shared_exclusive.py: the colourful pair builder, the S-Z adversary's shuffle, the frozen
shared encoders of stage 2, and the sign of every loss term."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import shared_exclusive as se

FAST = ["--no-progress", "--max-steps", "2", "--epochs", "1", "--batch-size", "32",
        "--embed-dim", "32", "--shared-dim", "16", "--probes", "linear", "--n-queries", "2"]


def digits_gray():
    tx, ty, _, _ = common.load_digits_data()
    return tx, ty


def colour_labels_from_pixels(x, y):
    """Recover (background of X, foreground of Y) from pixels alone.
    X's corner is pure background; in Y, the inkiest pixel's distance from white points along
    (white - foreground), a direction that differs for each palette colour."""
    palette = se.PALETTE.float()
    corner = x[:, :, 0, 0].float()  # (N, 3)
    bg = torch.cdist(corner, palette).argmin(1)
    ink = 255.0 - y.float()  # (N, 3, H, W)
    flat = ink.flatten(2)  # (N, 3, H*W)
    darkest = flat.sum(1).argmax(1)  # (N,)
    direction = flat[torch.arange(len(y)), :, darkest]  # (N, 3)
    cos = torch.nn.functional.normalize(direction, dim=1) @ \
        torch.nn.functional.normalize(255.0 - palette, dim=1).T
    return bg, cos.argmax(1)


def test_pair_builder_keeps_the_digit_and_colour_labels_match_pixels():
    gray, labels = digits_gray()
    x, y, lab = se.colorize_pairs(gray, labels, "same-image", torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (len(gray), 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(lab[:, 0], labels)
    bg_rgb, fg_rgb = se.PALETTE[lab[:, 1]], se.PALETTE[lab[:, 2]]
    n = torch.arange(len(gray))
    # every palette colour has a channel at 0: there X shows the ink itself and Y its negative
    c_bg, c_fg = (bg_rgb == 0).int().argmax(1), (fg_rgb == 0).int().argmax(1)
    assert torch.equal(x[n, c_bg], gray[:, 0])
    assert torch.equal(y[n, c_fg], 255 - gray[:, 0])
    # where the ink is full, X is white; where there is none, Y is white
    assert torch.equal(x[:, :, 0, 0], bg_rgb) and (y[:, :, 0, 0] == 255).all()
    bg, fg = colour_labels_from_pixels(x, y)
    assert torch.equal(bg, lab[:, 1]) and torch.equal(fg, lab[:, 2])


def test_the_two_colours_are_drawn_independently():
    from scipy.stats import chi2_contingency
    gray = torch.zeros(24000, 1, 32, 32, dtype=torch.uint8)
    _, _, lab = se.colorize_pairs(gray, torch.zeros(24000, dtype=torch.long), "same-image",
                                      torch.Generator().manual_seed(0))
    k = len(se.PALETTE)
    joint = np.zeros((k, k))
    np.add.at(joint, (lab[:, 1].numpy(), lab[:, 2].numpy()), 1)
    assert (joint > 0).all()  # every (background, foreground) combination occurs, same ones too
    assert abs(np.trace(joint) / joint.sum() - 1 / k) < 0.01  # same colour no more than by chance
    assert chi2_contingency(joint).pvalue > 1e-3
    marginal = joint.sum(1) / joint.sum()
    assert np.abs(marginal - 1 / k).max() < 0.01  # uniform over the 12 hues


def test_same_class_pairing_draws_another_image_of_the_class():
    gray, labels = digits_gray()
    x, y, lab = se.colorize_pairs(gray, labels, "same-class", torch.Generator().manual_seed(2))
    assert torch.equal(lab[:, 0], labels)
    c_fg = (se.PALETTE[lab[:, 2]] == 0).int().argmax(1)
    y_ink = 255 - y[torch.arange(len(y)), c_fg]  # (N, H, W): the grayscale image Y was drawn from
    where = {}
    for j, img in enumerate(gray[:, 0]):
        where.setdefault(img.numpy().tobytes(), []).append(j)
    for i in range(len(y)):
        sources = where[y_ink[i].numpy().tobytes()]  # images identical to Y's (duplicates too)
        assert sources != [i]  # another image than X's own
        assert (labels[sources] == labels[i]).all()


def test_pair_data_domains_and_offline_error():
    pair = se.load_pair_data("colorful-digits")
    assert pair.train_labels.shape == (1437, 3) and pair.test_labels.shape == (360, 3)
    gray, labels = digits_gray()  # fixed pairs: every run and eval_probe see the same ones
    x, _, lab = se.colorize_pairs(gray, labels, "same-image",
                                      torch.Generator().manual_seed(se.PAIR_DATA_SEED))
    assert torch.equal(pair.train_x, x) and torch.equal(pair.train_labels, lab)
    dom = pair.domain("y", "foreground")
    assert torch.equal(dom.train_x, pair.train_y) and dom.n_classes == 12
    assert torch.equal(dom.test_y, pair.test_labels[:, 2])
    x, y, lab = next(pair.batches("train", 16))
    assert x.shape == (16, 3, 32, 32) and -1 <= x.min() and x.max() <= 1 and lab.shape == (16, 3)
    with pytest.raises(common.UserError, match="could not load mnist"):
        se.load_pair_data("colorful-mnist", root="/nonexistent-offline-root")
    with pytest.raises(common.UserError, match="could not load fashion-mnist"):
        se.load_pair_data("colorful-fashion-mnist", root="/nonexistent-offline-root")


def test_pairs_of_any_grey_dataset_carry_its_classes(monkeypatch):
    """colorful-fashion-mnist: the same construction on the grey dataset common.load_data
    reads (here a stand-in with 3 classes of 40 images), labelled by class, not digit."""
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g)
    grey = common.Data("fashion-mnist", images(40), torch.arange(40) % 3, images(12), torch.arange(12) % 3, 3)
    asked = []
    monkeypatch.setattr(common, "load_data", lambda name, *a, **kw: asked.append(name) or grey)
    pair = se.load_pair_data("colorful-fashion-mnist", pairing="same-class")
    assert asked == ["fashion-mnist"] and pair.n_classes == 3 and se.PAIR_LABELS[0] == "class"
    assert torch.equal(pair.train_labels[:, 0], grey.train_y) and torch.equal(pair.test_labels[:, 0], grey.test_y)
    x, y, _ = se.colorize_pairs(grey.train_x, grey.train_y, "same-class",
                                torch.Generator().manual_seed(se.PAIR_DATA_SEED))
    assert torch.equal(pair.train_x, x) and torch.equal(pair.train_y, y)
    assert pair.domain("x", "class").n_classes == 3 and pair.domain("y", "foreground").n_classes == 12
    assert torch.equal(pair.domain("y").test_y, grey.test_y)  # the class by default
    # eval_probe's label for older callers: "digit" is the class
    ckpt = {"extra": {"pair_domain": "y", "pairing": "same-class", "pair_seed": se.PAIR_DATA_SEED},
            "dataset": "colorful-fashion-mnist", "image_shape": [3, 32, 32]}
    assert torch.equal(se.probe_data(ckpt, "./data", torch.device("cpu"), label="digit").train_y, grey.train_y)


def test_shuffle_in_the_adversary_breaks_the_pairing():
    z = torch.arange(50)[:, None].float()
    for seed in range(5):
        zs = se.shuffle_across_batch(z, torch.Generator().manual_seed(seed))
        assert torch.equal(zs.sort(0).values, z)  # a permutation of the batch
        assert (zs != z).all()  # no sample keeps its own Z
    # a discriminator separates joint from shuffled exactly when S and Z are dependent
    torch.manual_seed(0)
    for dependent, lo, hi in ((True, 0.9, 1.01), (False, 0.35, 0.65)):
        disc = se.SZDiscriminator(6, hidden=(64, 32))
        opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(150):
            s = torch.randn(128, 4)
            z = s[:, :2] + 0.1 * torch.randn(128, 2) if dependent else torch.randn(128, 2)
            loss = se.sz_disc_loss(disc, s, z, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        s = torch.randn(512, 4)
        z = s[:, :2] + 0.1 * torch.randn(512, 2) if dependent else torch.randn(512, 2)
        with torch.no_grad():
            acc = ((disc(s, z) > 0).float().mean() + (disc(s, se.shuffle_across_batch(z)) < 0).float().mean()) / 2
        assert lo < acc < hi, (dependent, acc)


class Stub(nn.Module):
    """An 'encoder' whose outputs are given tensors (forward ignores its input)."""

    def __init__(self, **out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def loss_args(**kw):
    base = dict(shared_local=0.0, shared_global=0.0, l1=0.0, exclusive_local=0.0,
                exclusive_global=0.0, adversarial=0.0, hsic=0.0, hsic_batches=1, hsic_estimator="unbiased",
                local_layer="c2", exclusive_local_layer="c2")
    return SimpleNamespace(**{**base, **kw})


def test_stage1_loss_signs():
    n = 8
    s_x, s_y = torch.randn(n, 4), torch.randn(n, 4)
    maps = dict(c2=torch.zeros(n, 2, 2, 2), conv=torch.zeros(n, 3, 1, 1))
    enc = {"shared_x": Stub(y=s_x, **maps), "shared_y": Stub(y=s_y, **maps)}
    eye = torch.eye(n)
    informative = lambda s, c, gather=None: (4 * eye - 4 * (1 - eye))[:, :, None].expand(n, n, 4).clone()
    blind = lambda s, c, gather=None: torch.zeros(n, n, 4)
    x = torch.zeros(n, 3, 32, 32)
    for term in ("shared_local", "shared_global"):
        losses = {}
        for name, critic in (("informative", informative), ("blind", blind)):
            critics = {f"shared_{kind}_critic_{d}": critic for kind in ("local", "global") for d in "xy"}
            losses[name], logs, _ = se.shared_step(x, x, enc, critics, common.jsd_bound, loss_args(**{term: 1.0}))
        # more MI -> lower loss: the bounds enter with a minus sign
        assert losses["informative"] < losses["blind"] - 1.0, term
    # the L1 term is added: S codes far apart cost more than equal ones
    critics = {f"shared_{kind}_critic_{d}": blind for kind in ("local", "global") for d in "xy"}
    far, logs, _ = se.shared_step(x, x, enc, critics, common.jsd_bound, loss_args(l1=1.0))
    assert torch.isclose(far, (s_x - s_y).abs().sum(1).mean()) and far > 1.0  # the L1 norm
    enc_same = {"shared_x": Stub(y=s_x, **maps), "shared_y": Stub(y=s_x, **maps)}
    same, _, _ = se.shared_step(x, x, enc_same, critics, common.jsd_bound, loss_args(l1=1.0))
    assert same == 0


def test_stage1_local_term_is_cross_not_self():
    """I(C(X); S_Y): the X-side critic must be given S_Y and X's own local map."""
    n = 4
    s_x, s_y = torch.full((n, 2), 1.0), torch.full((n, 2), 2.0)
    c_x, c_y = torch.full((n, 1, 1, 1), 10.0), torch.full((n, 1, 1, 1), 20.0)
    enc = {"shared_x": Stub(y=s_x, c2=c_x, conv=c_x), "shared_y": Stub(y=s_y, c2=c_y, conv=c_y)}
    seen = {}

    def recorder(name):
        def critic(s, c, gather=None):
            seen[name] = (float(s[0, 0]), float(c.flatten()[0]))
            return torch.zeros(n, n, 1)
        return critic

    critics = {f"shared_{k}_critic_{d}": recorder(f"{k}_{d}") for k in ("local", "global") for d in "xy"}
    se.shared_step(torch.zeros(n), torch.zeros(n), enc, critics, common.jsd_bound,
                   loss_args(shared_local=1.0, shared_global=1.0))
    assert seen == {"local_x": (2.0, 10.0), "global_x": (2.0, 10.0),
                    "local_y": (1.0, 20.0), "global_y": (1.0, 20.0)}


def test_stage2_loss_signs_and_no_gradient_into_shared():
    n = 8
    torch.manual_seed(0)
    shared = {d: common.DCGANEncoder(3, 32, 4, fc_dim=16).eval() for d in "xy"}
    z = torch.randn(n, 2, requires_grad=True)
    maps = dict(c2=torch.zeros(n, 2, 2, 2), conv=torch.zeros(n, 3, 1, 1))
    w = torch.tensor([1.0, -2.0])
    enc = {"shared_x": shared["x"], "shared_y": shared["y"],
           "exclusive_x": Stub(y=z, **maps), "exclusive_y": Stub(y=z, **maps)}
    blind = lambda r, c, gather=None: torch.zeros(n, n, 4)
    x = torch.randn(n, 3, 32, 32)
    for logit_shift, name in ((3.0, "detected"), (-3.0, "fooled")):
        disc = lambda s, zz, b=logit_shift: zz @ w + b  # a linear discriminator on Z
        critics = {f"exclusive_{k}_critic_{d}": blind for k in ("local", "global") for d in "xy"}
        critics.update(sz_disc_x=disc, sz_disc_y=disc)
        loss, logs, sz = se.exclusive_step(x, x, enc, critics, common.jsd_bound, loss_args(adversarial=1.0))
        if name == "detected":
            detected = loss
            z.grad = None
            loss.backward()
            # gradient descent on Z lowers the discriminator's "joint" logit w.z
            assert (z.grad @ w).sum() > 0
            assert all(p.grad is None for m in shared.values() for p in m.parameters())
            assert not sz["x"][0].requires_grad  # S is computed without a graph
        else:
            fooled = loss
    assert detected > fooled + 2.0  # the GAN term is a cost: lower when the adversary is fooled
    # the MI terms of R = (S, Z) enter with a minus sign as in stage 1
    eye = torch.eye(n)
    informative = lambda r, c, gather=None: (4 * eye - 4 * (1 - eye))[:, :, None].expand(n, n, 4).clone()
    for term in ("exclusive_local", "exclusive_global"):
        values = []
        for critic in (informative, blind):
            critics = {f"exclusive_{k}_critic_{d}": critic for k in ("local", "global") for d in "xy"}
            values.append(se.exclusive_step(x, x, enc, critics, common.jsd_bound, loss_args(**{term: 1.0}))[0])
        assert values[0] < values[1] - 1.0, term


def colour_times_digit_codes(n=512, seed=0):
    """S reads the digit; Z is a colour code plus a small digit offset whose sign flips with
    the colour: the dependence lives within each colour, as in a trained Z."""
    g = torch.Generator().manual_seed(seed)
    digit, colour = torch.randint(10, (n,), generator=g), torch.randint(12, (n,), generator=g)
    s = 3 * torch.eye(10)[digit] + 0.3 * torch.randn(n, 10, generator=g)
    sign = torch.where(torch.arange(12) % 2 == 0, 1.0, -1.0)
    z = 5 * torch.randn(12, 8, generator=g)[colour] + 0.3 * sign[colour, None] * torch.randn(10, 8, generator=g)[digit]
    return s, z, torch.randperm(n, generator=g)


def test_hsic_sees_a_digit_that_lives_within_each_colour_and_its_gradient_removes_it():
    s, z, perm = colour_times_digit_codes()
    dependent, shuffled = se.hsic_dependence(s, z, "unbiased"), se.hsic_dependence(s, z[perm], "unbiased")
    assert dependent > 0.04 and abs(shuffled) < 0.01
    # a kernel at the median distance alone, which the colour sets, is blind to it: the reason
    # for the narrow bandwidths
    ks = se.gaussian_gram(s)
    median_only = [float(se.normalised_hsic(ks, se.gaussian_gram(c))) for c in (z, z[perm])]
    assert abs(median_only[0] - median_only[1]) < 0.005
    # descending its gradient through Z lowers it (the encoder's side of the penalty)
    z = z.clone().requires_grad_()
    se.hsic_dependence(s, z, "unbiased").backward()
    assert torch.isfinite(z.grad).all()
    lower = se.hsic_dependence(s, (z - 20 * z.grad / z.grad.norm()).detach(), "unbiased")
    assert lower < dependent - 0.02


def test_hsic_of_independent_codes_is_zero_on_average_whatever_z_looks_like():
    g = torch.Generator().manual_seed(0)
    for n_colours in (12, 3):  # a layout with fewer colours too
        ours, biased = [], []
        for _ in range(10):
            s = torch.randn(256, 8, generator=g)
            z = torch.randn(n_colours, 2, generator=g)[torch.randint(n_colours, (256,), generator=g)]
            z = z + 0.05 * torch.randn(256, 2, generator=g)
            ours.append(float(se.hsic_dependence(s, z, "unbiased")))
            biased.append(float(se.hsic_dependence(s, z, "alignment")))
        assert abs(np.mean(ours)) < 0.005 and np.mean(biased) > 0.05


def test_hsic_penalty_takes_the_class_out_of_z_without_merging_its_colours():
    """Z: twelve colours round a circle, each pushed outward by an amount S also holds (the
    area the colour covers, as in a trained Z_Y). Adam on the penalty alone should drop the
    amount and leave the colours apart. The biased estimate (the centred kernel alignment)
    merges them: what a heavier HSIC term did to Z's colour in training."""
    def descend(penalty, steps=60, n=256):
        g = torch.Generator().manual_seed(0)
        angle = torch.arange(12) * 2 * math.pi / 12
        circle = torch.stack([angle.cos(), angle.sin()], 1)
        centre, push = circle.clone().requires_grad_(), (0.15 * circle).requires_grad_()
        opt = torch.optim.Adam([centre, push], lr=0.01)
        for _ in range(steps):
            colour, amount = torch.randint(12, (n,), generator=g), torch.randn(n, generator=g)
            s = torch.randn(n, 32, generator=g)
            s[:, 0] = 2 * amount
            z = centre[colour] + amount[:, None] * push[colour] + 0.02 * torch.randn(n, 2, generator=g)
            z = (z - z.mean(0)) / z.std(0)
            opt.zero_grad()
            penalty(s, z).backward()
            opt.step()
        centre = (centre - centre.mean(0)).detach()
        gaps = torch.cdist(centre, centre) + 10 * torch.eye(12)
        return gaps.min() / centre.norm(dim=1).mean(), push.norm(dim=1).mean().item()
    gap, push = descend(lambda s, z: se.hsic_dependence(s, z, "unbiased"))
    assert push < 0.05 and gap > 0.25  # from 0.15 and 0.52 (twelve evenly spaced)
    gap, push = descend(lambda s, z: se.hsic_dependence(s, z, "alignment"))
    assert gap < 0.1


def test_hsic_term_scores_the_batch_with_its_detached_predecessors():
    n = 64
    s_all, z_all, _ = colour_times_digit_codes(3 * n)
    maps = dict(c2=torch.zeros(n, 2, 2, 2), conv=torch.zeros(n, 3, 1, 1))
    memory, args = {}, loss_args(hsic=2.0, hsic_batches=3)
    for b in range(3):
        z = z_all[b * n:(b + 1) * n].clone().requires_grad_()
        s = Stub(y=s_all[b * n:(b + 1) * n])
        enc = {"shared_x": s, "shared_y": s, "exclusive_x": Stub(y=z, **maps), "exclusive_y": Stub(y=z, **maps)}
        loss, logs, _ = se.exclusive_step(torch.zeros(n), torch.zeros(n), enc, {}, common.jsd_bound, args, memory=memory)
    # batch 2 is scored with batches 1 and 0, newest first, and only its own rows carry gradient
    rows = torch.cat([torch.arange(2 * n, 3 * n), torch.arange(n, 2 * n), torch.arange(n)])
    assert torch.allclose(logs["hsic_x"], se.hsic_dependence(s_all[rows], z_all[rows], "unbiased"))
    assert torch.allclose(loss, 2.0 * (logs["hsic_x"] + logs["hsic_y"]))
    assert len(memory["x"]) == 2 and not any(m[1].requires_grad for m in memory["x"])
    loss.backward()
    assert z.grad.abs().sum() > 0


def test_discriminator_loss_sign():
    torch.manual_seed(0)
    s, z = torch.randn(64, 3), torch.randn(64, 2)
    right = lambda s_, z_: 10.0 * (z_ == z).all(1).float() * 2 - 10.0  # +10 on the joint, -10 shuffled
    wrong = lambda s_, z_: -right(s_, z_)
    assert se.sz_disc_loss(right, s, z) < 1e-3
    assert se.sz_disc_loss(wrong, s, z) > 10
    # the encoder's GAN loss is the opposite: low when the joint is called shuffled
    assert se.sz_encoder_loss(wrong, s, z) < 1e-3 < se.sz_encoder_loss(right, s, z)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_whitened_probe_reads_a_label_hidden_in_a_direction_of_small_variance():
    # the label lives in x0 - x1, a direction 500x smaller than the nuisance x0 + x1: the
    # per-dimension-scaled MLP and linear probes miss it, the whitened MLP reads it
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 3, n)
        big = rng.normal(size=(n, 4)) * 10
        small = (y - 1) * 0.02 + rng.normal(size=n) * 0.004
        return np.concatenate([big[:, :1] + small[:, None], big[:, :1] - small[:, None], big[:, 1:]], 1), y

    (a, ya), (b, yb) = make(600), make(300)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = {k: se.probe_accuracy(k, a, ya, b, yb, 0) for k in ("sk-mlp", "linear", "whitened-sk-mlp")}
    assert acc["whitened-sk-mlp"] > 0.9
    assert acc["sk-mlp"] < 0.5 and acc["linear"] < 0.5


def test_stage2_flags_leave_stage1_initialisation_alone():
    built = {}
    for dim in (4, 8):
        common.seed_everything(0)
        enc, critics, _ = se.build_networks(se.parse_args(["--exclusive-dim", str(dim)]), (3, 32, 32),
                                            torch.device("cpu"))
        built[dim] = {**enc, **critics}, torch.get_rng_state()
    (a, rng_a), (b, rng_b) = built[4], built[8]
    for k in ("shared_x", "shared_y", "shared_local_critic_x", "shared_global_critic_y"):
        for (name, v), w in zip(a[k].state_dict().items(), b[k].state_dict().values()):
            assert torch.equal(v, w), (k, name)
    assert torch.equal(rng_a, rng_b)  # stage 1's training draws the same numbers too
    assert a["exclusive_x"].out.weight.shape == (4, 1024) and b["exclusive_x"].out.weight.shape == (8, 1024)


def test_stage2_leaves_the_shared_encoders_unchanged(tmp_path):
    argv = [*FAST, "--out-dir", str(tmp_path)]
    run, metrics = se.main(argv)  # both stages
    assert set(metrics) == {f"acc_{r}_{t}" for r in se.REPS for t in se.PAIR_LABELS}
    assert all(0 <= v <= 1 for v in metrics.values())
    assert [m["stage"] for m in read_metrics(run.dir) if "stage" in m] == [1, 2]
    assert os.path.exists(run.path("neighbours.png"))
    # shared_*.pt were written at the end of stage 1; checkpoint.pt at the end of stage 2
    final = torch.load(run.path("checkpoint.pt"), weights_only=True)
    after = {"x": final["encoder"], "y": final["modules"]["shared_y"]}
    common.seed_everything(0)  # the same initial weights as the run's
    init, _, _ = se.build_networks(se.parse_args(argv), (3, 32, 32), torch.device("cpu"))
    for d in "xy":
        stage1 = torch.load(run.path(f"shared_{d}.pt"), weights_only=True)
        assert stage1["extra"]["pair_domain"] == d and stage1["extra"]["part"] == "shared"
        assert stage1["dataset"] == "colorful-digits" and stage1["image_shape"] == [3, 32, 32]
        for k, v in stage1["encoder"].items():  # weights and BatchNorm statistics alike
            assert torch.equal(v, after[d][k]), k
        assert not torch.equal(stage1["encoder"]["out.weight"], init[f"shared_{d}"].out.weight)
        excl = torch.load(run.path(f"exclusive_{d}.pt"), weights_only=True)["encoder"]
        assert excl["out.weight"].shape == (2, 1024)  # stage 2 did train the exclusive encoders
        assert not torch.equal(excl["out.weight"], init[f"exclusive_{d}"].out.weight)
    rebuilt = common.encoder_from_checkpoint(stage1, se.ENCODERS)  # from its cfg alone: the whitened 16-d S
    assert rebuilt.out.out_features == 16 and isinstance(rebuilt.y_norm, se.Whitening)
    # stage 2 alone starts from exactly these shared encoders
    fresh, _, _ = se.build_networks(se.parse_args(argv), (3, 32, 32), torch.device("cpu"))
    args2 = se.parse_args([*argv, "--stage", "2", "--shared-from", run.path("checkpoint.pt")])
    assert se.load_shared(run.path("checkpoint.pt"), fresh, args2) == 1
    for d in "xy":
        assert all(torch.equal(v, after[d][k]) for k, v in fresh[f"shared_{d}"].state_dict().items())
    args2.pairing = "same-class"
    with pytest.raises(common.UserError, match="same --dataset and --pairing"):
        se.load_shared(run.path("checkpoint.pt"), fresh, args2)


def test_every_probe_of_the_list_gets_its_own_keys_and_bad_lists_are_refused():
    rng = np.random.default_rng(0)
    digit = rng.integers(0, 10, 400)
    codes = np.eye(10)[digit] + 0.1 * rng.normal(size=(400, 10))  # the digit, linearly
    labels = torch.as_tensor(np.stack([digit, digit % 2, rng.integers(0, 12, 400)], 1))
    pair = SimpleNamespace(train_labels=labels[:300], test_labels=labels[300:])
    metrics, tables = se.evaluate({"SX": (codes[:300], codes[300:])}, pair, ["linear", "sk-mlp"], 0)
    assert [p for p, _ in tables] == ["linear", "sk-mlp"]
    assert set(metrics) == {f"acc_SX_{t}{s}" for t in se.PAIR_LABELS for s in ("", "_sk-mlp")}
    assert metrics["acc_SX_class"] > 0.95 and metrics["acc_SX_class_sk-mlp"] > 0.95
    assert metrics["acc_SX_foreground"] < 0.3 and metrics["acc_SX_foreground_sk-mlp"] < 0.3
    # two fits at a time: the same numbers, in the same places
    assert se.evaluate({"SX": (codes[:300], codes[300:])}, pair, ["linear", "sk-mlp"], 0, jobs=2) == (metrics, tables)
    assert se.parse_args(["--probes", "sk-mlp,whitened-sk-mlp"]).probes == ["sk-mlp", "whitened-sk-mlp"]
    for bad in ("sk-mlp,bogus", "sk-mlp,sk-mlp", ",", "mlp"):  # mlp: its old name, now sk-mlp
        with pytest.raises(SystemExit):
            se.parse_args(["--probes", bad])


def test_user_errors(tmp_path):
    with pytest.raises(SystemExit):
        se.parse_args(["--stage", "2"])  # no shared encoders to start from
    with pytest.raises(SystemExit):
        se.parse_args(["--dataset", "digits"])  # not a pair dataset
    bogus = tmp_path / "checkpoint.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="not a readable checkpoint"):
        se.main([*FAST, "--stage", "2", "--shared-from", str(bogus), "--out-dir", str(tmp_path)])
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no run folder left behind


def test_both_stages_run_under_torchrun_and_only_rank_0_writes(tmp_path):
    """Two gloo processes, two steps per stage: a clean exit, one run folder, every checkpoint
    written once and readable, one evaluation table (rank 0's)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "shared_exclusive.py", "--device", "cpu", *FAST, "--batch-size", "40",  # 20 > 16 a process
         "--out-dir", str(tmp_path)],
        cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1 and proc.stdout.count("run folder:") == 1
    assert proc.stdout.count("probe test accuracy") == 1 and "processes: 2" in proc.stdout
    assert [m.get("stage") for m in read_metrics(runs[0])] == [1, 2, None]  # 2 epochs, 1 table
    ckpt = common.load_checkpoint(runs[0] / "checkpoint.pt")
    assert ckpt["step"] == 4 and set(ckpt["modules"]) >= {"shared_y", "exclusive_x", "sz_disc_y"}
    for part in ("shared", "exclusive"):
        for d in "xy":  # strict rebuild: a DDP "module." prefix would fail here
            common.encoder_from_checkpoint(common.load_checkpoint(runs[0] / f"{part}_{d}.pt"),
                                           se.ENCODERS)


def test_whitening_gives_unit_variance_in_every_direction_and_eval_uses_running_statistics():
    torch.manual_seed(0)
    # a correlated code whose principal variances span 10^4: per-dimension scaling leaves the
    # small directions small, whitening must not
    mix = torch.diag(torch.logspace(-2, 0, 8)) @ torch.linalg.qr(torch.randn(8, 8))[0]
    data = torch.randn(4096, 8) @ mix + 3
    w = se.Whitening(8)
    out = w(data[:256])
    assert torch.allclose(torch.cov(out.T), torch.eye(8), atol=1e-2)
    with pytest.raises(common.UserError, match="more than 8"):
        w(data[:8])
    for i in range(50):  # the running statistics follow the training batches
        w(data[i * 64:(i + 1) * 64 + 16])
    w.eval()
    out = w(data)
    assert torch.allclose(w(data[:5]), out[:5], atol=1e-4)  # a fixed map, no batch statistics
    eig = torch.linalg.eigvalsh(torch.cov(out.T))
    assert eig.min() > 0.7 and eig.max() < 1.4  # white up to the running estimate's error


def test_whitened_encoder_passes_gradients_through_its_statistics_and_reloads():
    torch.manual_seed(0)
    cfg = common.encoder_config("dcgan-white", (3, 32, 32), 8, se.ENCODERS)
    enc = common.build_encoder(cfg, se.ENCODERS)
    x = torch.randn(24, 3, 32, 32)
    target = torch.randn(24, 8)
    (enc(x)["y"] * target).sum().backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert enc.c1[0].weight.grad.abs().sum() > 0  # reaches the first layer
    # gradients flow through the batch statistics: the output does not change with the
    # scale of the code, so neither may the loss (a whitening with detached statistics would
    # pass a nonzero gradient to the scale)
    scale = torch.ones((), requires_grad=True)
    (se.Whitening(8)(torch.randn(24, 8) * scale) * target).sum().backward()
    assert abs(scale.grad) < 1e-3
    enc.eval()
    copy = common.build_encoder(cfg, se.ENCODERS)  # what eval_probe does with a checkpoint's encoder_cfg
    copy.load_state_dict(enc.state_dict())
    copy.eval()
    with torch.no_grad():
        assert torch.allclose(copy(x)["y"], enc(x)["y"])


def test_spherical_code_keeps_only_its_direction_and_reloads():
    """--exclusive-norm sphere: whitened, then every code at length sqrt(dim), so a code's
    length can carry nothing; the direction still spreads over the circle."""
    torch.manual_seed(0)
    cfg = common.encoder_config(se.NORM_ARCH["sphere"], (3, 32, 32), 2, se.ENCODERS)
    enc = common.build_encoder(cfg, se.ENCODERS)
    x = torch.randn(48, 3, 32, 32)
    z = enc(x)["y"]
    assert torch.allclose(z.norm(dim=1), torch.full((48,), 2 ** 0.5), atol=1e-4)
    angle = torch.atan2(z[:, 1], z[:, 0])
    assert (angle > 0).float().mean().item() == pytest.approx(0.5, abs=0.25)  # not one point
    (z[:, 0] * torch.linspace(-1, 1, 48)).sum().backward()
    assert enc.c1[0].weight.grad.abs().sum() > 0
    # a length-only target gets no gradient: the length is fixed
    enc.zero_grad()
    enc(x)["y"].norm(dim=1).sum().backward()
    assert enc.c1[0].weight.grad.abs().max() < 1e-5
    enc.eval()
    copy = common.build_encoder(cfg, se.ENCODERS)
    copy.load_state_dict(enc.state_dict())
    copy.eval()
    with torch.no_grad():
        assert torch.allclose(copy(x)["y"], enc(x)["y"], atol=1e-5)
        assert torch.allclose(copy(x)["y"].norm(dim=1), torch.full((48,), 2 ** 0.5), atol=1e-4)


def test_each_stage_reads_its_own_local_layer():
    """--local-layer feeds stage 1's local critics, --exclusive-local-layer stage 2's."""
    n = 4
    maps = dict(c2=torch.zeros(n, 2, 2, 2), conv=torch.zeros(n, 3, 1, 1))
    enc = {f"{k}_{d}": Stub(y=torch.zeros(n, 2), **maps) for k in ("shared", "exclusive") for d in "xy"}
    seen = []

    def recording(code, local, gather=None):
        seen.append(local.shape[1])  # channels: 2 for c2, 3 for conv
        return torch.zeros(n, n, local.shape[2] * local.shape[3])

    critics = {f"{k}_local_critic_{d}": recording for k in ("shared", "exclusive") for d in "xy"}
    x = torch.zeros(n, 3, 32, 32)
    args = loss_args(shared_local=1.0, exclusive_local=1.0, local_layer="conv", exclusive_local_layer="c2")
    se.shared_step(x, x, enc, critics, common.jsd_bound, args)
    se.exclusive_step(x, x, enc, critics, common.jsd_bound, args)
    assert seen == [3, 3, 2, 2]
    # and the critics are built for those maps' channels
    enc, built, _ = se.build_networks(se.parse_args(["--local-layer", "conv", "--exclusive-local-layer", "c2"]),
                                      (3, 32, 32), torch.device("cpu"))
    shapes = common.tap_shapes(enc["shared_x"], (3, 32, 32))
    assert shapes["conv"][0] != shapes["c2"][0]
    assert built["shared_local_critic_x"].l_skip.in_channels == shapes["conv"][0]
    assert built["exclusive_local_critic_x"].l_skip.in_channels == shapes["c2"][0]


def test_whitening_under_bf16_autocast_stays_float32_and_white():
    """--amp: the encoder hands Whitening a bf16 code; its covariance, running statistics and
    output stay float32, and the output is as white as without autocast."""
    torch.manual_seed(0)
    lin, w = nn.Linear(16, 8), se.Whitening(8)
    x = torch.randn(256, 16) @ torch.diag(torch.logspace(-1, 1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        code = lin(x)
        out = w(code)
    assert code.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert w.running_cov.dtype == w.running_mean.dtype == torch.float32
    assert torch.allclose(torch.cov(out.T), torch.eye(8), atol=1e-2)
    assert torch.allclose(w.running_cov, torch.cov(code.float().T), atol=1e-4)  # the first batch's


def test_amp_runs_both_stages_with_finite_numbers(tmp_path):
    run, metrics = se.main([*FAST, "--amp", "--out-dir", str(tmp_path)])
    lines = read_metrics(run.dir)
    assert [m.get("stage") for m in lines] == [1, 2, None]
    with open(run.path("args.json")) as f:
        assert json.load(f)["amp"] is True
    for m in lines[:2]:
        assert all(np.isfinite(v) for k, v in m.items() if isinstance(v, float)), m
    assert lines[0]["l1"] > 0 and all(0 < abs(lines[1][f"hsic_{d}"]) < 1 for d in "xy")
    assert all(0 <= v <= 1 for v in metrics.values()) and len(metrics) == 12


def test_eval_probe_names_the_class_label_and_refuses_its_old_name_in_one_line(capsys):
    import eval_probe
    assert eval_probe.parse_args(["checkpoint.pt"]).pair_label == "class"
    with pytest.raises(SystemExit) as e:
        eval_probe.parse_args(["checkpoint.pt", "--pair-label", "digit"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "digit is now class" in err


def test_each_stage_runs_the_recipes_steps_and_paper_swaps_the_configuration(tmp_path):
    """No --epochs: each stage's epochs come from RECIPE_STEPS and the 1,437 training pairs
    (22 steps an epoch), recorded in args.json; --paper runs the paper's S, Z and adversary."""
    for flags in ([], ["--paper"]):
        run, _ = se.main(["--no-progress", "--max-steps", "1", "--embed-dim", "32", "--probes", "linear",
                          "--eval-every", "0", "--n-queries", "2", "--out-dir", str(tmp_path / f"run{len(flags)}"),
                          *flags])
        with open(run.path("args.json")) as f:
            args = json.load(f)
        assert (args["epochs"], args["exclusive_epochs"]) == (36, 29)
        stage2 = read_metrics(run.dir)[1]
        expected = se.PAPER if flags else se.RECIPE
        assert {k: args[k] for k in expected} == expected
        adversary, hsic = "sz_disc" in stage2, "hsic_x" in stage2
        assert (adversary, hsic) == ((True, False) if flags else (False, True))
    final = torch.load(run.path("exclusive_y.pt"), weights_only=True)["encoder"]
    assert final["out.weight"].shape == (8, 1024) and "y_norm.running_cov" not in final  # 8-d Z, not whitened


def test_sphere_ramp_moves_z_from_white_to_the_sphere():
    """--sphere-ramp: the power 0 leaves Z white (lengths spread), 1 puts it on the circle, and
    the training loop ramps it over the given fraction of stage 2's steps."""
    torch.manual_seed(0)
    cfg = common.encoder_config(se.NORM_ARCH["sphere"], (3, 32, 32), 2, se.ENCODERS)
    enc = common.build_encoder(cfg, se.ENCODERS)
    x = torch.randn(48, 3, 32, 32)
    encoders = {"exclusive_x": enc, "exclusive_y": enc}
    se.set_sphere_power(encoders, 0, 10)
    white = enc(x)["y"]
    cov = torch.cov(white.T)
    assert torch.allclose(cov, torch.eye(2), atol=1e-3)  # white, and the lengths vary
    assert white.norm(dim=1).std() > 0.2
    se.set_sphere_power(encoders, 5, 10)
    assert enc.y_norm.power.item() == pytest.approx(0.5)
    half = enc(x)["y"].norm(dim=1)
    assert 0 < half.std() < white.norm(dim=1).std()
    se.set_sphere_power(encoders, 12, 10)  # past the ramp, and ramp 0: the sphere
    assert torch.allclose(enc(x)["y"].norm(dim=1), torch.full((48,), 2 ** 0.5), atol=1e-4)
    se.set_sphere_power(encoders, 0, 0)
    assert enc.y_norm.power.item() == 1.0
    assert "y_norm.power" not in enc.state_dict()  # a saved encoder loads onto the sphere


def test_sphere_ramp_needs_the_sphere():
    with pytest.raises(SystemExit):
        se.parse_args(["--exclusive-norm", "whiten", "--sphere-ramp", "0.5"])
    assert se.parse_args(["--exclusive-norm", "sphere", "--sphere-ramp", "0.3"]).sphere_ramp == 0.3
    whitened = se.parse_args(["--exclusive-norm", "whiten"])  # the recipe's ramp has nothing to move
    assert (whitened.exclusive_norm, whitened.sphere_ramp) == ("whiten", se.RECIPE["sphere_ramp"])
