"""eval_probe.py's measures of a representation (MINE, NDM, MS-SSIM, t-SNE) on data whose
dependence is known, and eval_probe.ms_ssim against values computed by hand."""
import json
import math
import os

import pytest
import torch

import common
import dim_local
import eval_probe

MS_SSIM_W = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def test_ms_ssim_is_one_for_identical_images_and_falls_with_noise():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    assert torch.allclose(eval_probe.ms_ssim(x, x), torch.ones(8), atol=1e-5)
    scores = [eval_probe.ms_ssim(x, x + s * torch.randn_like(x)).mean().item()
              for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(a > b for a, b in zip(scores, scores[1:])) and scores[-1] < 0.5
    y = x + 0.2 * torch.randn_like(x)
    assert torch.allclose(eval_probe.ms_ssim(x, y), eval_probe.ms_ssim(y, x), atol=1e-6)  # symmetric
    per_image = eval_probe.ms_ssim(x, y)
    assert torch.allclose(eval_probe.ms_ssim(x.flip(0), y.flip(0)), per_image.flip(0), atol=1e-6)


@pytest.mark.parametrize("side,scales", [(32, 3), (64, 4)])
def test_ms_ssim_of_flat_images_matches_the_formula(side, scales):
    # flat images: contrast-structure is exactly 1 at every scale, so MS-SSIM is the last
    # scale's luminance term raised to that scale's renormalised weight
    a, b, c1 = 0.5, 0.25, (0.01 * 2) ** 2
    luminance = (2 * a * b + c1) / (a * a + b * b + c1)
    expected = luminance ** (MS_SSIM_W[scales - 1] / sum(MS_SSIM_W[:scales]))
    got = eval_probe.ms_ssim(torch.full((2, 1, side, side), a), torch.full((2, 1, side, side), b))
    assert torch.allclose(got, torch.full((2,), expected), atol=1e-5)


def gaussian_pairs(n, dim, rho, generator):
    a = torch.randn(n, dim, generator=generator)
    return a, rho * a + math.sqrt(1 - rho ** 2) * torch.randn(n, dim, generator=generator)


@pytest.mark.parametrize("rho", [0.0, 0.8])
def test_mine_recovers_the_mutual_information_of_correlated_gaussians(rho):
    g = torch.Generator().manual_seed(0)
    a, b = gaussian_pairs(3000, 2, rho, g)
    at, bt = gaussian_pairs(1000, 2, rho, g)
    true_mi = -2 / 2 * math.log(1 - rho ** 2)  # two independent pairs of dimensions
    est = eval_probe.mine_estimate(a, b, at, bt, steps=300, lr=1e-3, hidden=64)
    assert est["steps"] == 300
    if rho == 0:
        assert abs(est["test"]) < 0.05
    else:  # a lower bound that gets most of the way there: 1.02 nats
        assert 0.7 * true_mi < est["test"] < 1.15 * true_mi


@pytest.mark.parametrize("dependent", [False, True])
def test_ndm_is_zero_for_independent_factors_and_the_total_correlation_otherwise(dependent):
    g = torch.Generator().manual_seed(0)

    def factors(n):  # four factors sharing 2*z: pairwise correlation 0.8
        z = torch.randn(n, 1, generator=g)
        return torch.randn(n, 4, generator=g) + (2 * z if dependent else 0)

    est = eval_probe.ndm_estimate(factors(3000), factors(1000), steps=300, lr=1e-3, hidden=64)
    if not dependent:
        assert abs(est["test"]) < 0.05
    else:  # total correlation -0.5 log det R = 1.80 nats for the equicorrelated Gaussian
        tc = -0.5 * math.log(0.2 ** 3 * (1 + 3 * 0.8))
        assert 0.7 * tc < est["test"] < 1.1 * tc


def test_a_decoder_from_an_informative_code_reconstructs_better():
    data = common.load_data("digits")
    x_train, x_test = data.train_x[:600], data.test_x[:200]
    prepare = lambda b: data.preprocess(b, train=False)
    code = lambda x: torch.nn.functional.avg_pool2d(prepare(x), 4).flatten(1)  # 8x8 thumbnail
    g = torch.Generator().manual_seed(0)
    noise = lambda x: torch.randn(len(x), 64, generator=g)
    kw = dict(image_shape=data.image_shape, epochs=3, prepare=prepare)
    good = eval_probe.msssim_of_decoder(x_train, code(x_train), x_test, code(x_test), **kw)
    bad = eval_probe.msssim_of_decoder(x_train, noise(x_train), x_test, noise(x_test), **kw)
    assert good["test"] > bad["test"] + 0.1 and 0 < bad["test"] < 1


def test_eval_probe_writes_every_measure_to_eval_json(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "probe_against_random_init", lambda *a, **k: {})
    run = dim_local.train(dim_local.parse_args(
        ["--no-progress", "--max-steps", "1", "--epochs", "1", "--batch-size", "16",
         "--embed-dim", "32", "--out-dir", str(tmp_path)]))
    result = eval_probe.main([run.path("checkpoint.pt"), "--probes", "linear", "--taps", "y",
                              "--device", "cpu", "--mine", "--mine-steps", "3", "--ndm",
                              "--ndm-steps", "3", "--msssim", "--msssim-epochs", "1", "--tsne"])
    with open(run.path("eval.json")) as f:
        saved = json.load(f)
    assert saved["measures"] == result["measures"]
    m = saved["measures"]
    assert m["mine"]["steps"] == 3 and m["ndm"]["steps"] == 3 and m["msssim"]["epochs"] == 1
    assert all(math.isfinite(m[k]["test"]) for k in ("mine", "ndm", "msssim"))
    assert 0 < m["msssim"]["test"] < 1 and m["mine"]["tap"] == "y"
    from PIL import Image
    png = Image.open(m["tsne"]["png"]).convert("RGB")
    assert os.path.dirname(m["tsne"]["png"]) == run.dir
    assert len(png.getcolors(1 << 16)) > 10  # dots of several colours, not a blank canvas
    with pytest.raises(common.UserError):
        eval_probe.main([run.path("checkpoint.pt"), "--probes", "", "--taps", "y", "--ndm",
                         "--measure-tap", "nope", "--device", "cpu"])


def test_ndm_early_stopping_keeps_a_memorising_discriminator_near_zero():
    # 64 independent factors, 1437 samples: trained to the end the discriminator memorises the
    # training rows and its test bound drops below -2; the held-out choice keeps it near 0
    g = torch.Generator().manual_seed(1)
    est = eval_probe.ndm_estimate(torch.randn(1437, 64, generator=g), torch.randn(360, 64, generator=g),
                                  steps=300, lr=1e-3, hidden=128)
    assert abs(est["test"]) < 0.1 and est["best_step"] < 300
