"""Encoders, data loading and run plumbing in common.py."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common


@pytest.mark.parametrize("arch,size,local", [("dcgan", 32, (128, 8, 8)), ("resnet", 32, (128, 8, 8)),
                                             ("alexnet", 64, (384, 16, 16))])
def test_encoders_expose_named_taps(arch, size, local):
    cfg = common.encoder_config(arch, (3, size, size), y_dim=64)
    enc = common.build_encoder(cfg)
    shapes = common.tap_shapes(enc, (3, size, size))
    assert shapes["y"] == (64,) and set(enc.maps) <= set(shapes)
    assert shapes[enc.default_local] == local
    assert shapes["conv"][1:] == (size // 8, size // 8)
    assert common.encoder_config("auto", (3, size, size))["arch"] == ("alexnet" if size == 64 else "dcgan")


def test_encoder_rejects_odd_image_sizes():
    with pytest.raises(common.UserError, match="divisible by 8"):
        common.encoder_config("dcgan", (3, 30, 30))


def test_imagefolder_reads_train_and_test_class_folders(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    data = common.load_data("imagefolder", str(tmp_path))
    assert data.train_x.shape == (6, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.n_classes == 2 and sorted(data.train_y.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(common.UserError, match="missing"):
        common.load_data("imagefolder", str(tmp_path / "nowhere"))


def test_batches_cover_the_split_once_in_range():
    data = common.load_data("digits")
    seen = torch.cat([y for _, y in data.batches("test", 64)])
    assert torch.equal(seen, data.test_y)
    x, _ = next(data.batches("train", 64, shuffle=True, rng=torch.Generator().manual_seed(0)))
    assert x.shape == (64, 1, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.3
    assert data.n_batches("train", 64, drop_last=True) == 1437 // 64


def test_batches_with_index_name_the_images_they_hold():
    data = common.load_data("digits")
    x, y, idx = next(data.batches("train", 64, shuffle=True, rng=torch.Generator().manual_seed(0),
                                  with_index=True))
    assert len(idx.unique()) == 64 and not torch.equal(idx, torch.arange(64))  # shuffled
    assert torch.equal(x, data.images("train", idx)) and torch.equal(y, data.train_y[idx])


def grouped_images(size, groups=4, per_group=6, seed=0):
    """per_group noisy copies of each of `groups` random uint8 images, each copy a little
    brighter or darker (so plain dot products would pick the brightest, not the nearest)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(groups, 1, size, size, generator=g) * 200
    x = protos.repeat_interleave(per_group, 0)
    x = x * (0.8 + 0.4 * torch.rand(len(x), 1, 1, 1, generator=g)) + 10 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 255).to(torch.uint8), torch.arange(groups).repeat_interleave(per_group)


@pytest.mark.parametrize("size", [16, 64])  # 64: pooled to 32 x 32 first
def test_nearest_neighbours_are_other_images_of_the_same_group(size):
    x, group = grouped_images(size)
    nb = common.nearest_neighbours(x, 5, chunk=7)  # chunks that cut a group
    assert nb.shape == (24, 5)
    assert (nb != torch.arange(24)[:, None]).all()  # never the image itself
    assert (group[nb] == group[:, None]).all()  # each group's other 5 copies
    with pytest.raises(ValueError):
        common.nearest_neighbours(x, 24)


def test_neighbour_table_checks_k_against_the_training_images():
    x, group = grouped_images(8)
    data = common.Data("toy", x, group, x[:4], group[:4], 4)
    assert common.neighbour_table(data, 0) is None
    table = common.neighbour_table(data, 3)
    assert table.shape == (24, 4)  # the image itself, then its 3 nearest
    assert torch.equal(table[:, 0], torch.arange(24))
    assert torch.equal(table[:, 1:], common.nearest_neighbours(x, 3))
    with pytest.raises(common.UserError, match="--cluster-neighbours 24 must be less than the 24"):
        common.neighbour_table(data, 24)


def test_random_neighbours_draws_each_rows_own_neighbours_in_repeat_order():
    table = torch.arange(50).view(10, 5) + 100  # row i: 100 + 5i .. 104 + 5i
    idx = torch.tensor([7, 2, 2, 9])
    drawn = common.random_neighbours(table, idx, repeats=3, rng=torch.Generator().manual_seed(0))
    assert drawn.shape == (12,)
    rows = idx.repeat(3)  # the order x.repeat(3, ...) gives the images
    assert ((drawn - 100) // 5 == rows).all()
    assert len(drawn.unique()) > 4  # drawn, not always the first neighbour


def test_non_finite_loss_stops_with_the_step():
    common.check_finite(torch.tensor(1.0), 3, "loss", "lower --lr")
    with pytest.raises(common.UserError, match="loss became nan at step 7; lower --lr"):
        common.check_finite(torch.tensor(float("nan")), 7, "loss", "lower --lr")


def test_checkpoint_roundtrip_rebuilds_the_encoder(tmp_path):
    import argparse
    data = common.load_data("digits")
    cfg = common.encoder_config("dcgan", data.image_shape, 16)
    enc = common.build_encoder(cfg)
    path = str(tmp_path / "checkpoint.pt")
    args = argparse.Namespace(dataset="digits", lr=1e-4)
    common.save_checkpoint(path, script="x", encoder=enc, encoder_cfg=cfg, args=args, data=data,
                           epoch=1, step=5)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind
    rebuilt = common.encoder_from_checkpoint(common.load_checkpoint(path))
    x = torch.randn(4, 1, 32, 32)
    enc.eval(), rebuilt.eval()
    assert torch.equal(enc(x)["y"], rebuilt(x)["y"])


def test_cpu_autocast_keeps_one_step_loss_within_tolerance():
    torch.manual_seed(0)
    enc = common.DCGANEncoder(1, y_dim=16)
    critic = common.DotCritic(16, 128, 64)
    x = torch.randn(16, 1, 32, 32)
    losses = []
    for amp in (False, True):
        with common.autocast(torch.device("cpu"), amp):
            out = enc(x)
            losses.append(common.infonce_bound(critic(out["y"], out["c2"])).item())
    assert losses[1] == pytest.approx(losses[0], abs=0.05 * abs(losses[0]) + 0.05)


def test_adam_helper_takes_the_same_steps_as_plain_adam():
    """common.adam (fused where torch has the kernel) must keep lr, betas, weight decay and
    per-group learning rates: its parameters follow plain Adam's over a few steps, and both
    move (a dropped lr or a swapped beta would part them or freeze them)."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    runs = []
    for make in (lambda g: common.adam(g, lr=0.05, betas=(0.5, 0.9), weight_decay=0.01),
                 lambda g: torch.optim.Adam(g, lr=0.05, betas=(0.5, 0.9), weight_decay=0.01,
                                            foreach=False)):
        params = [p.clone().requires_grad_() for p in start]
        opt = make([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.2}])
        for step in range(4):
            opt.zero_grad()
            loss = sum((p * (k + 1 + step)).square().sum() + p.sum() for k, p in enumerate(params))
            loss.backward()
            opt.step()
        runs.append([p.detach() for p in params])
    for mine, plain, s in zip(*runs, start):
        assert torch.allclose(mine, plain, atol=1e-6)
        assert (mine - s).abs().min() > 1e-3


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Run folders are named by the second; two runs started together (e.g. two seeds in
    parallel) must not share or crash on one. A stale existence check, as when the other
    process creates the folder between check and creation, is simulated by one that never
    sees it."""
    import argparse
    import datetime as real

    class FrozenClock:
        class datetime:
            @staticmethod
            def now():
                return real.datetime(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(common, "datetime", FrozenClock)
    monkeypatch.setattr(common.os.path, "exists", lambda path: False)
    args = argparse.Namespace(out_dir=str(tmp_path / "runs"), dataset="digits", seed=0)
    dirs = [common.Run("dim_local", args).dir for _ in range(3)]
    assert len(set(dirs)) == 3
    assert [os.path.basename(d) for d in dirs] == [
        "dim_local-digits-20260101-120000" + suffix for suffix in ("", "-2", "-3")]
    assert all(os.path.isfile(os.path.join(d, "args.json")) for d in dirs)


def test_speed_benchmark_finds_the_scripts_from_its_folder():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join("benchmarks", "speed.py"), "--help"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--only" in p.stdout, p.stderr


def test_random_shift_translates_each_image_and_fills_with_black():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 2, 9, 9, generator=g) * 2 - 1
    out = common.random_shift(x, 3, torch.Generator().manual_seed(1))
    assert torch.equal(common.random_shift(x, 0, g), x)
    padded = torch.nn.functional.pad(x, (3,) * 4, value=-1.0)
    offsets = set()
    for i in range(len(x)):  # every image is its own translate of the input, channels together
        found = [(dy, dx) for dy in range(7) for dx in range(7)
                 if torch.equal(out[i], padded[i, :, dy:dy + 9, dx:dx + 9])]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 4  # drawn per image, not once per batch


def test_random_affine_warps_each_digit_a_little():
    digits = common.load_data("digits")
    x = digits.preprocess(digits.train_x[:64], train=True)
    torch.manual_seed(0)
    w = common.random_affine(x)
    assert w.shape == x.shape and w.dtype == x.dtype
    assert w.min() >= -1 - 1e-5 and w.max() <= 1 + 1e-5  # still images in [-1, 1]
    moved = (w - x).abs().flatten(1).mean(1)
    assert (moved > 0.01).all()  # every image changed, each by its own warp ...
    assert len(set(moved.tolist())) == len(x)
    # ... but little: the ink moves, it does not vanish or fill the frame (what enters is
    # background, -1)
    ink = lambda t: (t + 1).flatten(1).sum(1)
    assert ((ink(w) / ink(x) - 1).abs() < 0.6).all()
    # scaling alone: width and height are scaled apart (a wide 1 can become a narrow one).
    # On a round blob in mid-frame (nothing cropped) the ink's spread across and down
    # changes by different factors
    r2 = (torch.arange(32.0) - 15.5).square()
    blob = (torch.exp(-(r2[:, None] + r2[None, :]) / 20) * 2 - 1).expand(64, 1, 32, 32)
    def spread(t, dim):  # ink-weighted variance of the column (dim 3) or row (dim 2) index
        ink = (t + 1).squeeze(1)
        pos = torch.arange(32.0).view(*([1, 1, 32] if dim == 3 else [1, 32, 1]))
        mean = (ink * pos).sum((1, 2)) / ink.sum((1, 2))
        return (ink * (pos - mean.view(-1, 1, 1)) ** 2).sum((1, 2)) / ink.sum((1, 2))
    scaled = common.random_affine(blob, max_rotate=0.0, max_shift=0.0)
    wide, tall = spread(scaled, 3) / spread(blob, 3), spread(scaled, 2) / spread(blob, 2)
    assert (wide - tall).abs().mean() > 0.1 and (wide - 1).abs().max() < 0.5
    # shear alone leans an upright bar, each image its own way (InfoAE's clustering warp:
    # slant is what its categories of 5s and 8s split on); the bar's ink-weighted
    # covariance of column and row goes from 0 to about the shear times the row variance
    bar = -torch.ones(64, 1, 32, 32)
    bar[:, :, 6:26, 15:17] = 1
    def lean(t):
        ink = (t + 1).squeeze(1)
        row, col = torch.arange(32.0).view(1, 32, 1), torch.arange(32.0).view(1, 1, 32)
        tot = ink.sum((1, 2))
        mr, mc = (ink * row).sum((1, 2)) / tot, (ink * col).sum((1, 2)) / tot
        return (ink * (row - mr.view(-1, 1, 1)) * (col - mc.view(-1, 1, 1))).sum((1, 2)) / tot
    none = dict(max_rotate=0.0, max_scale=0.0, max_shift=0.0)
    assert lean(bar).abs().max() < 1e-3
    leaned = lean(common.random_affine(bar, max_shear=0.3, **none))
    assert leaned.abs().max() > 8 and leaned.abs().max() < 0.3 * 33.3 * 1.2  # rows' variance 33.3
    assert (leaned > 1).any() and (leaned < -1).any()  # both ways
    assert torch.allclose(common.random_affine(bar, **none), bar, atol=1e-5)
    # no warp at all: the image itself
    same = common.random_affine(x, max_rotate=0.0, max_scale=0.0, max_shift=0.0)
    assert torch.allclose(same, x, atol=1e-5)
    # a generator makes the warps reproducible (DIM and InfoGAN draw them from one they
    # checkpoint), and the warp passes gradients back to the image (G learns through it)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(common.random_affine(x, rng=g1), common.random_affine(x, rng=g2))
    assert not torch.equal(common.random_affine(x, rng=g1), common.random_affine(x, rng=g2.manual_seed(6)))
    leaf = x.clone().requires_grad_()
    common.random_affine(leaf, rng=g1)[:, :, 8:24, 8:24].sum().backward()
    assert leaf.grad.abs().sum() > 0 and leaf.grad[:, :, 14:18, 14:18].abs().min() > 0


def test_cluster_information_values():
    k, n = 10, 2000
    y = torch.arange(n) % k
    sure = F.one_hot(y, k).float() * 50  # confident logits
    log_k = torch.log(torch.tensor(float(k)))
    # one confident cluster each, the same for both views, all used equally: I = log K
    assert torch.allclose(common.cluster_information(sure, sure), log_k, atol=1e-3)
    # views whose clusters are unrelated (each warped copy in a random cluster): ~0; so is
    # an uninformative C
    torch.manual_seed(0)
    assert common.cluster_information(sure, sure[torch.randperm(n)]) < 0.05 * log_k
    assert abs(float(common.cluster_information(torch.zeros(n, k), torch.zeros(n, k)))) < 1e-4
    # all in one cluster: agree, but no information
    one = torch.zeros(n, k)
    one[:, 0] = 50
    assert abs(float(common.cluster_information(one, one))) < 1e-3
    # balance (IIC's lambda) 2 adds H(y) + H(y') = 2 log K on balanced clusters
    assert torch.allclose(common.cluster_information(sure, sure, balance=2.0), 3 * log_k, atol=1e-3)


def test_epochs_for_steps_counts_whole_batches_per_process():
    data = common.Data("toy", torch.zeros(2000, 1, 2, 2, dtype=torch.uint8), torch.zeros(2000),
                       torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1), 10)
    assert common.epochs_for_steps(4960, data, 32) == 80  # 62 whole batches an epoch
    assert common.epochs_for_steps(4961, data, 32) == 81  # a step more needs an epoch more
    assert common.epochs_for_steps(4960, data, 32, world_size=2) == 80  # 1,000 rows, 16 each
    assert common.epochs_for_steps(4960, data, 64, world_size=2) == 160  # 31 batches of 32


def test_random_jitter_changes_contrast_and_optionally_brightness():
    # a black (-1) background with a grey square on it
    x = torch.full((64, 1, 8, 8), -1.0)
    x[:, :, 2:6, 2:6] = 0.0
    rng = lambda: torch.Generator().manual_seed(0)
    both = common.random_jitter(x, 0.5, rng())
    contrast = common.random_jitter(x, 0.5, rng(), brightness=False)
    assert torch.equal(common.random_jitter(x, 0.0, rng()), x)
    # contrast alone: the background stays black, the square's grey is scaled by 1 +- 0.5
    assert torch.equal(contrast[:, :, 0, 0], x[:, :, 0, 0])
    square = (contrast[:, 0, 3, 3] + 1) / 2  # was 0.5 in [0, 1]
    assert square.min() >= 0.25 - 1e-6 and square.max() <= 0.75 + 1e-6 and square.std() > 0.05
    # with brightness the background moves too, by up to strength / 2 of the range (clipped at black)
    background = (both[:, 0, 0, 0] + 1) / 2
    assert background.max() > 0.1 and background.max() <= 0.25 + 1e-6
    # the same draws either way: each image's contrast change is the same in both
    lifted = (both[:, 0, 3, 3] + 1) / 2 - (both[:, 0, 0, 0] + 1) / 2
    inside = background > 0  # background not clipped: the shift cancels in the difference
    assert torch.allclose(lifted[inside], square[inside], atol=1e-6)
