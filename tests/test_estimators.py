"""MI bounds and critics on data whose mutual information is known."""
import math

import pytest
import torch
import torch.nn as nn

import common
import dim_local


def gaussian_pairs(n, dim, rho, generator):
    """x, y with corr(x_i, y_i) = rho per dimension: I(x; y) = -dim/2 * log(1 - rho^2)."""
    x = torch.randn(n, dim, generator=generator)
    y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, dim, generator=generator)
    return x, y


def true_mi(dim, rho):
    return -0.5 * dim * math.log(1 - rho ** 2)


def optimal_scores(x, y, rho):
    """log p(x, y) / p(x) p(y) for every pair: scores[n, m] = T(y_n, x_m), positives n == m."""
    xm, yn = x[None, :, :], y[:, None, :]
    quad = (2 * rho * xm * yn - rho ** 2 * (xm ** 2 + yn ** 2)) / (2 * (1 - rho ** 2))
    return (quad - 0.5 * math.log(1 - rho ** 2)).sum(-1)


def test_dv_with_the_optimal_critic_recovers_the_true_mi():
    g = torch.Generator().manual_seed(0)
    x, y = gaussian_pairs(2000, 2, 0.5, g)
    est = common.dv_bound(optimal_scores(x, y, 0.5)).item()
    assert est == pytest.approx(true_mi(2, 0.5), abs=0.05)


@pytest.mark.parametrize("rho", [0.5, 0.9, 0.999])
def test_infonce_never_exceeds_log_n(rho):
    g = torch.Generator().manual_seed(1)
    n = 128
    x, y = gaussian_pairs(n, 10, rho, g)
    est = common.infonce_bound(optimal_scores(x, y, rho)).item()
    assert est <= math.log(n) + 1e-6
    assert est == pytest.approx(min(true_mi(10, rho), math.log(n)), rel=0.25)


def test_infonce_bound_counts_local_candidates():
    # perfect local scores: the bound saturates at log((N-1)*K + 1), never above
    n, k = 8, 5
    s = torch.full((n, n, k), -30.0)
    s[range(n), range(n)] = 30.0
    assert common.infonce_bound(s).item() == pytest.approx(math.log((n - 1) * k + 1), abs=1e-4)


def test_jsd_excludes_positives_from_negatives():
    n = 4
    s = torch.full((n, n), -10.0)
    s.fill_diagonal_(10.0)
    # perfectly separated: both terms ~0; counting positives as negatives would cost ~10/N
    assert common.jsd_bound(s).item() == pytest.approx(0.0, abs=1e-3)


class PairCritic(nn.Module):
    """T(x, y) = MLP([x, y]) scored for all N x N pairs."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 1))

    def forward(self, x, y):
        n = len(x)
        pairs = torch.cat([x[None].expand(n, n, -1), y[:, None].expand(n, n, -1)], -1)
        return self.net(pairs).squeeze(-1)  # (N, N): y_n against x_m


def train_critic(bound, rho, dim=1, steps=300, n=64, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    critic = PairCritic(dim)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = gaussian_pairs(n, dim, rho, g)
        loss = -bound(critic(x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, y = gaussian_pairs(512, dim, rho, g)
        return bound(critic(x, y)).item()


def test_trained_dv_critic_approaches_the_true_mi():
    est = train_critic(common.dv_bound, 0.8)
    assert 0.75 * true_mi(1, 0.8) < est < 1.15 * true_mi(1, 0.8)


@pytest.mark.parametrize("name", ["dv", "infonce", "jsd"])
def test_all_bounds_are_about_zero_on_independent_samples(name):
    est = train_critic(common.BOUNDS[name], 0.0, steps=150)
    if name == "jsd":  # f-GAN JSD form: 2*JSD - 2 log 2, so independence reads -2 log 2
        est += 2 * math.log(2)
    assert abs(est) < 0.05
    dependent = train_critic(common.BOUNDS[name], 0.8, steps=150)
    dependent += 2 * math.log(2) if name == "jsd" else 0
    assert dependent > est + 0.2  # the same critic and budget see the dependence


def naive_concat_scores(critic, y, local_map):
    """Concat-and-convolve literally: y broadcast at every location, concatenated, 1x1 convs."""
    n, c, h, w = local_map.shape
    conv1 = nn.Conv2d(y.shape[1] + c, critic.w_global.out_features, 1)
    conv1.weight.data = torch.cat([critic.w_global.weight, critic.w_local.weight], 1)[:, :, None, None]
    conv1.bias.data = critic.w_global.bias.data
    out = torch.empty(n, n, h * w)
    for i in range(n):
        for j in range(n):
            inp = torch.cat([y[i][:, None, None].expand(-1, h, w), local_map[j]], 0)[None]
            hidden = conv1(inp).flatten(2).transpose(1, 2)  # (1, HW, hidden)
            out[i, j] = critic.rest(hidden)[0, :, 0]
    return out


def test_all_pairs_scores_equal_a_naive_loop():
    torch.manual_seed(0)
    y, local_map = torch.randn(5, 16), torch.randn(5, 8, 3, 3)
    dot = common.DotCritic(16, 8, embed_dim=32)
    g, l = dot.embed_global(y), dot.embed_local(local_map)
    naive = torch.stack([torch.stack([l[m] @ g[n] for m in range(5)]) for n in range(5)])
    assert torch.allclose(dot(y, local_map), naive, atol=1e-5)

    concat = common.ConcatCritic(16, 8, hidden=32)
    assert torch.allclose(concat(y, local_map), naive_concat_scores(concat, y, local_map), atol=1e-5)

    glob = common.GlobalCritic(8 * 9, 16, hidden=32)
    naive_g = torch.stack([torch.stack([glob.rest(glob.w_conv(local_map[m].flatten()) + glob.w_global(y[n]))[0]
                                        for m in range(5)]) for n in range(5)])
    assert torch.allclose(glob(y, local_map), naive_g, atol=1e-5)

    gdot = common.GlobalDotCritic(8 * 9, 16, embed_dim=32, scale=0.5)
    g = gdot.embed_global(y)
    c = gdot.l_norm(gdot.l_mlp[2](torch.relu(gdot.l_mlp[0](local_map.flatten(1)[:, :, None, None])))
                    .flatten(1) + gdot.l_skip(local_map.flatten(1)[:, :, None, None]).flatten(1))
    naive_d = torch.stack([torch.stack([0.5 * (c[m] @ g[n]) for m in range(5)]) for n in range(5)])
    assert gdot(y, local_map).shape == (5, 5)
    assert torch.allclose(gdot(y, local_map), naive_d, atol=1e-5)


@pytest.mark.parametrize("critic", ["dot", "concat", "global", "global-dot"])
def test_gradients_reach_every_encoder_layer(critic):
    torch.manual_seed(0)
    enc = common.DCGANEncoder(in_channels=1, y_dim=16)
    out = enc(torch.randn(6, 1, 32, 32))
    if critic == "dot":
        scores = common.DotCritic(16, 128, 32)(out["y"], out["c2"])
    elif critic == "concat":
        scores = common.ConcatCritic(16, 128, 32)(out["y"], out["c2"])
    elif critic == "global":
        scores = common.GlobalCritic(256 * 16, 16, 32)(out["y"], out["conv"])
    else:
        scores = common.GlobalDotCritic(256 * 16, 16, 32)(out["y"], out["conv"])
    (-common.infonce_bound(scores)).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_prior_losses_pull_in_opposite_directions():
    torch.manual_seed(0)
    disc = dim_local.PriorDiscriminator(8)
    y = torch.randn(32, 8, requires_grad=True)
    dim_local.prior_encoder_loss(disc, y).backward()
    enc_grad = y.grad.clone()
    y.grad = None
    # the discriminator loss on detached y gives y no gradient at all
    dim_local.prior_disc_loss(disc, y).backward()
    assert y.grad is None and enc_grad.abs().sum() > 0
    # a discriminator that scores everything "real" leaves the encoder loss low, "fake" high
    with torch.no_grad():
        disc.net[-1].bias.fill_(10.0)
    low = dim_local.prior_encoder_loss(disc, y).item()
    with torch.no_grad():
        disc.net[-1].bias.fill_(-10.0)
    assert dim_local.prior_encoder_loss(disc, y).item() > low + 5


def test_dot_critic_scale_keeps_infonce_out_of_saturation_at_initialisation():
    """Raw dot products of 2048-d embeddings have a spread of about 10 at initialisation, so the
    softmax over 4,000 candidates puts its mass on the largest negative and the estimate starts
    far below 0 (the paper's setting); scaled by 1/sqrt(E), it starts near 0 at every width."""
    torch.manual_seed(0)
    y, local_map = torch.randn(32, 64), torch.relu(torch.randn(32, 128, 8, 8))
    for e in (128, 2048):
        torch.manual_seed(0)
        raw = common.DotCritic(64, 128, e)
        torch.manual_seed(0)
        scaled = common.DotCritic(64, 128, e, scale=e ** -0.5)
        with torch.no_grad():
            s_raw, s_scaled = raw(y, local_map), scaled(y, local_map)
        assert torch.allclose(s_scaled, s_raw * e ** -0.5)
        assert abs(common.infonce_bound(s_scaled).item()) < 0.3
        if e == 2048:
            assert common.infonce_bound(s_raw).item() < -5
