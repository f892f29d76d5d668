"""Deep InfoMax extensions of dim_local.py: occlusion, coordinate prediction, multiple globals,
and the common.py pieces they stand on (receptive fields, running the encoder from a map)."""
import json
import math
import os

import pytest
import torch

import common
import dim_local

SHAPE = (1, 32, 32)


@pytest.fixture(scope="module")
def fields():
    encoder = common.build_encoder(common.encoder_config("dcgan", SHAPE))
    return common.receptive_fields(encoder, "c2", SHAPE)


def test_receptive_fields_of_the_32x32_encoder(fields):
    assert fields.shape == (64, 32, 32)
    # c2 location (row 4, column 5) sees pixels 4r-3 .. 4r+6 (two 4x4/2 convs, padding 1)
    field = fields[4 * 8 + 5]
    assert field.any(1).nonzero().flatten().tolist() == list(range(13, 23))
    assert field.any(0).nonzero().flatten().tolist() == list(range(17, 27))
    assert field.sum() == 100 and fields[0].sum() == 49  # the padding cuts a corner to 7x7


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_forward_from_a_map_gives_y_and_keep_bn_stats_keeps_them(arch):
    torch.manual_seed(0)
    encoder = common.build_encoder(common.encoder_config(arch, (3, 32, 32)))
    x = torch.randn(8, 3, 32, 32)
    encoder.eval()
    out = encoder(x)
    assert torch.allclose(common.forward_from(encoder, "c2", out["c2"]), out["y"], atol=1e-5)
    assert not torch.allclose(common.forward_from(encoder, "c2", 0 * out["c2"]), out["y"])
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with common.keep_bn_stats(encoder):
        y_batch_stats = encoder(x)["y"]
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert not torch.allclose(y_batch_stats, out["y"], atol=1e-3)  # batch statistics were used
    encoder(x)  # outside the context the running statistics move again
    assert any(not torch.equal(v, before[k]) for k, v in encoder.state_dict().items()
               if k.endswith("running_mean"))


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_occlusion_hides_one_receptive_field_and_shows_another(fields, p):
    flat = fields.flatten(1).float()
    pairs = ((flat @ flat.T) == 0).nonzero()
    torch.manual_seed(1)
    x = torch.rand(256, *SHAPE) + 0.5  # never 0, so 0 marks an occluded pixel
    occluded = dim_local.occlude(x, fields, pairs, 10, p)
    hidden = (occluded == 0)[:, 0].flatten(1).float()  # (N, H*W)
    assert torch.equal(occluded[occluded != 0], x[occluded != 0])
    fully_hidden = (hidden @ flat.T) == flat.sum(1)  # (N, M*M)
    fully_visible = ((1 - hidden) @ flat.T) == flat.sum(1)
    assert fully_hidden.any(1).all() and fully_visible.any(1).all()
    fraction = hidden.mean().item()
    assert {0.0: 0.0 < fraction < 0.15, 0.5: 0.35 < fraction < 0.65, 1.0: 0.85 < fraction < 1.0}[p]


def test_coordinate_heads_learn_rows_and_columns_in_order():
    torch.manual_seed(0)
    n, m = 8, 4
    k = torch.arange(m * m)
    position = torch.cat([torch.eye(m)[k // m], torch.eye(m)[k % m]], 1)  # (M*M, 2M): row, column
    local_map = position.T.reshape(1, 2 * m, m, m).expand(n, -1, -1, -1).clone()
    y = torch.randn(n, 3)
    heads = {False: dim_local.CoordHead(3 + 2 * m, m, hidden=64),
             True: dim_local.CoordHead(3 + 4 * m, 2 * m - 1, hidden=64)}
    for relative, head in heads.items():
        lm, yy = local_map.clone().requires_grad_(), y.clone().requires_grad_()
        first = dim_local.coordinate_loss(head, yy, lm, relative)
        assert first.item() == pytest.approx(2 * math.log(head.n_classes), abs=0.4)  # chance
        first.backward()
        assert lm.grad.abs().sum() > 0 and yy.grad.abs().sum() > 0  # it trains the encoder too
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(100):
            loss = dim_local.coordinate_loss(head, y, local_map, relative)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.2
    head = heads[False].eval()
    with torch.no_grad():
        logits = head.net(torch.cat([y[:1].expand(m * m, -1), position], 1))
    assert torch.equal(logits[:, :m].argmax(1), k // m)  # rows from the row channels
    assert torch.equal(logits[:, m:].argmax(1), k % m)


def test_random_blocks_are_partial_rectangles():
    torch.manual_seed(0)
    masks = dim_local.random_blocks(500, 8, "cpu")[:, 0]
    rows, cols = masks.amax(2).sum(1), masks.amax(1).sum(1)
    assert torch.equal(rows * cols, masks.sum((1, 2)))  # one rectangle each
    assert rows.min() == cols.min() == 2 and rows.max() == cols.max() == 7  # never the whole map
    assert (masks.mean(0) > 0).all()  # every location is in some block


def first_step(out_dir, *flags):
    run = dim_local.train(dim_local.parse_args(
        ["--paper", "--no-progress", "--max-steps", "1", "--epochs", "1", "--batch-size", "16",
         "--embed-dim", "32", "--gamma", "0", "--out-dir", str(out_dir), *flags]))
    with open(run.path("metrics.jsonl")) as f:
        return json.loads(f.readline()), run


def test_each_flag_adds_its_term_to_the_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "probe_against_random_init", lambda *a, **k: {})  # not tested here
    base, _ = first_step(tmp_path / "base")
    assert base["loss"] == pytest.approx(-base["local_mi"], abs=1e-5)

    occluded, run = first_step(tmp_path / "occlude", "--occlude")
    assert abs(occluded["local_mi"] - base["local_mi"]) > 1e-3  # same init and batch, other y
    assert os.path.exists(run.path("occlusions.png"))

    shifted, run = first_step(tmp_path / "shift", "--shift", "2")
    bn = lambda r: common.load_checkpoint(r.path("checkpoint.pt"))["encoder"]["c1.1.running_mean"]
    for view in ("shift", "warp"):
        crossed, run_x = first_step(tmp_path / view, "--shift", "2", "--cross-view", view)
        assert abs(crossed["local_mi"] - shifted["local_mi"]) > 1e-3  # same batch and C(x), other y
        assert torch.equal(bn(run), bn(run_x))  # the second view's pass leaves BatchNorm's statistics
        assert os.path.exists(run_x.path("views.png"))

    coord, _ = first_step(tmp_path / "coord", "--coord", "both", "--coord-weight", "0.5")
    assert coord["coord_abs"] == pytest.approx(2 * math.log(8), abs=0.5)
    assert coord["coord_rel"] == pytest.approx(2 * math.log(15), abs=0.5)
    assert coord["loss"] == pytest.approx(
        -coord["local_mi"] + 0.5 * (coord["coord_abs"] + coord["coord_rel"]), abs=1e-4)

    multi, _ = first_step(tmp_path / "multi", "--multi-global", "3")
    assert multi["local_mi"] == pytest.approx(base["local_mi"], abs=1e-5)
    assert math.isfinite(multi["multi_global_mi"]) and abs(multi["multi_global_mi"]) > 1e-3
    assert multi["loss"] == pytest.approx(-multi["local_mi"] - multi["multi_global_mi"], abs=1e-4)

    both, run = first_step(tmp_path / "all", "--occlude", "--coord", "absolute",
                           "--multi-global", "2", "--gamma", "0.1", "--loss", "jsd")
    ckpt = common.load_checkpoint(run.path("checkpoint.pt"))
    assert "coord_abs" in ckpt["modules"] and math.isfinite(both["loss"])


def test_bad_flag_combinations_fail_with_one_line():
    for argv in (["--multi-global", "2", "--beta", "0", "--alpha", "1"], ["--occlude-p", "2"],
                 ["--multi-global", "-1"], ["--paper", "--cross-view", "shift"],
                 ["--cross-view", "shift", "--shift", "0"], ["--cross-view", "crop"]):
        with pytest.raises(SystemExit) as e:
            dim_local.parse_args(argv)
        assert e.value.code == 2
