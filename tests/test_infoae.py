"""InfoAE: which networks each loss term trains, that each term moves them the right way,
and the script end to end (run folder, pictures, checkpoint, eval_probe's encoder, resume)."""
import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F

import common
import infoae

N = 16
NETS = ("encoder", "decoder", "generator", "classifier", "discriminator", "self_critic",
        "latent_critic")


def small_args(**kw):
    args = infoae.parse_args(["--width", "8", "--hidden", "64", "--latent-dim", "16", "--z-dim", "20"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.fixture(scope="module")
def digits():
    return common.load_data("digits")


def fresh(seed=0, **kw):
    torch.manual_seed(seed)
    args = small_args(**kw)
    _, nets = infoae.build_networks(args, (1, 32, 32))
    return args, nets


def batch(digits, args, seed=0, n_prior=N):
    """N real images and n_prior draws of (z, c)."""
    torch.manual_seed(seed)
    x = digits.preprocess(digits.train_x[:N], train=True)
    z, c = infoae.sample_prior(n_prior, args.z_dim, args.z_scale, args.categories, "cpu")
    return x, z, c


def all_terms(nets, x, z, c, sigma=0.0):
    terms, t = infoae.min_player_terms(nets, x, z, c, sigma)
    return {**terms, **infoae.critic_terms(nets, x, t, sigma)}


def grad_norms(nets):
    return {k: sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None)
            for k, m in nets.items()}


# ----------------------------------------------------------------------------------------
# Gradient boundaries: each term reaches exactly the networks it trains
# ----------------------------------------------------------------------------------------
# Which networks each loss term trains: the table in infoae.min_player_terms' and
# critic_terms' docstrings, written out here so that a change to the script fails until this
# spec is changed too.
TRAINS = {"rec": {"encoder", "decoder"},
            "dec_gen": {"decoder", "generator"},
            "dec_rec": {"decoder", "encoder"},
            "cls_gen": {"generator", "classifier"},
            "cls_enc": {"encoder", "decoder", "generator", "classifier"},
            "enc_sc": {"encoder", "decoder", "generator"},
            "enc_lat": {"encoder"},
            "gen_lat": {"generator"},
            "clu_mi": {"encoder", "classifier"},
            "dis": {"discriminator"},
            "sc": {"self_critic"},
            "lat": {"latent_critic"}}


@pytest.mark.parametrize("sigma", [0.0, 0.5])  # instance noise must not move the boundaries
@pytest.mark.parametrize("term", sorted(TRAINS))
def test_each_term_trains_only_its_networks(digits, term, sigma):
    args, nets = fresh()
    x, z, c = batch(digits, args)
    for m in nets.values():
        m.zero_grad(set_to_none=True)
    all_terms(nets, x, z, c, sigma)[term].backward()
    norms = grad_norms(nets)
    reached = {k for k, v in norms.items() if v > 0}
    assert reached == TRAINS[term], (term, norms)
    # untouched networks got no gradient tensor at all (not merely a zero one)
    for k in set(NETS) - TRAINS[term]:
        assert all(p.grad is None for p in nets[k].parameters()), (term, k)


def test_critics_frozen_only_while_min_player_terms_are_built(digits):
    args, nets = fresh()
    x, z, c = batch(digits, args)
    terms, t = infoae.min_player_terms(nets, x, z, c)
    # the graph of every min-player term leaves the critics Dis, SC and LC out ...
    loss = infoae.min_player_loss(terms, 1.0, 1.0, 0.4, 10.0)
    loss = loss + terms["enc_lat"] + terms["gen_lat"] + terms["clu_mi"]
    params = {id(p) for k in infoae.CRITICS for p in nets[k].parameters()}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            assert id(fn.variable) not in params
        stack.extend(f for f, _ in fn.next_functions)
    # ... and the critics train again afterwards
    assert all(p.requires_grad for k in NETS for p in nets[k].parameters())
    # the tensors handed to the critics carry the min-players' graph; critic_terms detaches them
    assert t["x_g"].requires_grad and t["l_ge"].requires_grad and t["l_e"].requires_grad


def test_instance_noise_reaches_only_the_images_dis_and_e_judge(digits):
    # noise on what Dis reads and on the generated images E reads; none on E's real images
    # (so rec, l_e and the latent terms are unchanged) nor on G's latents
    args, nets = fresh()
    x, z, c = batch(digits, args)
    with torch.no_grad():
        torch.manual_seed(5)
        clean = all_terms(nets, x, z, c, 0.0)
        torch.manual_seed(5)
        noisy = all_terms(nets, x, z, c, 1.0)
    for k in ("rec", "cls_gen", "enc_lat", "gen_lat", "clu_mi", "lat"):
        assert torch.allclose(clean[k], noisy[k]), k
    for k in ("dec_gen", "dec_rec", "cls_enc", "enc_sc", "dis", "sc"):
        assert not torch.allclose(clean[k], noisy[k]), k
    img = torch.zeros(2000)
    assert common.instance_noise(img, 0.0) is img and abs(float(common.instance_noise(img, 0.5).std()) - 0.5) < 0.05


def test_weights_scale_the_documented_terms(digits):
    args, nets = fresh()
    x, z, c = batch(digits, args)
    terms, _ = infoae.min_player_terms(nets, x, z, c)
    base = infoae.min_player_loss(terms, 0.0, 0.0, 0.0)
    assert torch.allclose(base, terms["rec"])
    a = infoae.min_player_loss(terms, 2.0, 0.0, 0.0) - base
    b = infoae.min_player_loss(terms, 0.0, 3.0, 0.0) - base
    g = infoae.min_player_loss(terms, 0.0, 0.0, 0.4) - base
    assert torch.allclose(a, 2 * (terms["dec_gen"] + terms["dec_rec"]))
    assert torch.allclose(b, 3 * (terms["cls_gen"] + terms["cls_enc"]))
    assert torch.allclose(g, 0.4 * terms["enc_sc"])
    r = infoae.min_player_loss(terms, 0.0, 0.0, 0.0, 10.0)
    assert torch.allclose(r, 10 * terms["rec"])
    le = infoae.min_player_loss(terms, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0) - base
    lg = infoae.min_player_loss(terms, 0.0, 0.0, 0.0, 1.0, 0.0, 0.25) - base
    assert torch.allclose(le, 0.5 * terms["enc_lat"])
    assert torch.allclose(lg, 0.25 * terms["gen_lat"])
    # clu_mi is ~0 for an untrained C at balance 1 (no information yet); at 2 it is not
    terms_2, _ = infoae.min_player_terms(nets, x, z, c, clustering=infoae.Clustering(2.0))
    assert float(terms_2["clu_mi"].detach()) < -1.0
    cm = (infoae.min_player_loss(terms_2, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0)
          - infoae.min_player_loss(terms_2, 0.0, 0.0, 0.0))
    assert torch.allclose(cm, 3 * terms_2["clu_mi"])
    # the paper's loss (the latent and clustering terms' weights default to 0) leaves them out
    assert torch.allclose(infoae.min_player_loss(terms, 1.0, 1.0, 0.4, 10.0),
                          infoae.min_player_loss(terms, 1.0, 1.0, 0.4, 10.0, 0.0, 0.0, 0.0))
    # at weight 0 the clustering term is not built at all (no warp, no third pass of E); every
    # other term, and the weighted sum, are what they are with it built
    bare, _ = infoae.min_player_terms(nets, x, z, c, clustering=None)
    full, _ = infoae.min_player_terms(nets, x, z, c)
    assert "clu_mi" not in bare and set(bare) | {"clu_mi"} == set(full)
    for k in bare:
        assert torch.allclose(bare[k], full[k]), k
    assert torch.allclose(infoae.min_player_loss(bare, 1.0, 1.0, 0.4, 10.0, 1.0, 1.0, 0.0),
                          infoae.min_player_loss(full, 1.0, 1.0, 0.4, 10.0, 1.0, 1.0, 0.0))


def test_cluster_views_pair_each_image_with_its_own_warps(digits):
    """--cluster-views V: clu_mi is IIC's term over V warps of every image, each paired with
    its own image: the joint P(y, y') is the mean of the V per-view joints."""
    args, nets = fresh()
    x, z, c = batch(digits, args)
    E, C = nets["encoder"], nets["classifier"]
    with torch.no_grad():  # confident categories, so that which pairs meet shows in the term
        C.net[-1].weight.mul_(30)
    views = 3
    torch.manual_seed(5)
    setting = infoae.Clustering(balance=2.0, views=views)
    terms, _ = infoae.min_player_terms(nets, x, z, c, clustering=setting)
    torch.manual_seed(5)  # the warps are drawn first, from the global generator
    warped = common.random_affine(x.repeat(views, 1, 1, 1))
    assert not torch.allclose(warped[:N], warped[N:2 * N])  # each view its own warp
    p = C(E(x)["y"]).softmax(1)
    q = C(E(warped)["y"]).softmax(1)  # E's BatchNorm sees the V * N warps as one batch, as there

    def iic(q):
        joint = sum(p.t() @ q[v * N:(v + 1) * N] for v in range(views)) / (views * N)
        joint = ((joint + joint.t()) / 2).clamp_min(1e-8)
        marg = joint.sum(1)
        return (joint * (joint.log() - 2 * marg[:, None].log() - 2 * marg[None, :].log())).sum()

    assert torch.allclose(terms["clu_mi"], -iic(q), atol=1e-4)
    # each warp met with another image's: the term would differ, by 100 times the tolerance
    crossed = q.view(views, N, -1).roll(1, 1).flatten(0, 1)
    assert abs(float((iic(crossed) - iic(q)).detach())) > 1e-2
    # --cluster-neighbours: each image meets warps of its partners (here the next image)
    partners = x.roll(1, 0).repeat(views, 1, 1, 1)
    torch.manual_seed(5)
    terms, _ = infoae.min_player_terms(nets, x, z, c, clustering=setting, partners=partners)
    torch.manual_seed(5)
    q_partners = C(E(common.random_affine(partners))["y"]).softmax(1)
    assert torch.allclose(terms["clu_mi"], -iic(q_partners), atol=1e-4)
    assert abs(float((iic(q_partners) - iic(q)).detach())) > 1e-2


# ----------------------------------------------------------------------------------------
# Each term moves its networks the right way (a few Adam steps on that term alone)
# ----------------------------------------------------------------------------------------
def steps_on(term, nets, make_batch, n_steps, lr=2e-3):
    opt = torch.optim.Adam([p for k in TRAINS[term] for p in nets[k].parameters()], lr=lr)
    for i in range(n_steps):
        x, z, c = make_batch(i)
        loss = all_terms(nets, x, z, c)[term]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_reconstruction_error_falls(digits):
    args, nets = fresh()
    x, z, c = batch(digits, args)
    measure = lambda: float(infoae.min_player_terms(nets, x, z, c)[0]["rec"].detach())
    before = measure()
    steps_on("rec", nets, lambda i: (x, z, c), 15)
    assert measure() < 0.5 * before


def test_classifier_recovers_c_from_generated_latents(digits):
    args, nets = fresh()
    z_eval, c_eval = infoae.sample_prior(256, args.z_dim, args.z_scale, args.categories, "cpu")
    acc = lambda: float((nets["classifier"](nets["generator"](
        z_eval, F.one_hot(c_eval, 10).float())).argmax(1) == c_eval).float().mean())
    before = acc()
    steps_on("cls_gen", nets, lambda i: batch(digits, args, seed=i, n_prior=64), 60)
    assert before < 0.3 and acc() > 0.7


def test_encoder_recovers_c_from_generated_images(digits):
    # C and G first learn c on latents; then cls_enc alone must teach E (and C) to read c back
    # from the decoded images E(Dec(G(z, c))).
    args, nets = fresh()
    steps_on("cls_gen", nets, lambda i: batch(digits, args, seed=i, n_prior=64), 60)
    x, z, c = batch(digits, args, seed=99, n_prior=64)

    def acc():
        with torch.no_grad():
            terms, t = infoae.min_player_terms(nets, x, z, c)
            return float((nets["classifier"](t["l_ge"]).argmax(1) == c).float().mean())
    before = acc()
    steps_on("cls_enc", nets, lambda i: batch(digits, args, seed=i, n_prior=64), 30)
    assert acc() > before + 0.3


def test_discriminator_learns_real_from_fake(digits):
    args, nets = fresh()
    x, z, c = batch(digits, args)
    before = float(all_terms(nets, x, z, c)["dis"].detach())
    steps_on("dis", nets, lambda i: (x, z, c), 10)
    after = float(all_terms(nets, x, z, c)["dis"].detach())
    assert after < 0.5 * before


def test_decoder_terms_fool_a_fixed_discriminator(digits):
    args, nets = fresh()
    x, z, c = batch(digits, args)
    steps_on("dis", nets, lambda i: (x, z, c), 10)  # a discriminator worth fooling
    for term, image in (("dec_gen", "x_g"), ("dec_rec", "x_r")):
        def score():
            with torch.no_grad():
                _, t = infoae.min_player_terms(nets, x, z, c)
                nets["discriminator"].eval()
                s = float(nets["discriminator"](t[image]).mean())
                nets["discriminator"].train()
                return s
        before = score()
        steps_on(term, nets, lambda i: (x, z, c), 10)
        assert score() > before + 1.0, term  # Dis's logit on these images rises towards "real"


def test_self_critic_and_encoder_play_their_sides(digits):
    args, nets = fresh()
    x, z, c = batch(digits, args)

    def fake_logit():  # SC's logit on (E(Dec(G(z,c))), c)
        with torch.no_grad():
            _, t = infoae.min_player_terms(nets, x, z, c)
            return float(nets["self_critic"](t["l_ge"], t["onehot"]).mean())
    before = float(all_terms(nets, x, z, c)["sc"].detach())
    steps_on("sc", nets, lambda i: (x, z, c), 30)
    assert float(all_terms(nets, x, z, c)["sc"].detach()) < 0.5 * before  # SC separates the two
    caught = fake_logit()
    steps_on("enc_sc", nets, lambda i: (x, z, c), 10)
    assert fake_logit() > caught + 1.0  # E moves l_ge to where SC says "real"


def test_latent_critic_and_encoder_and_generator_play_their_sides(digits):
    args, nets = fresh()
    x, z, c = batch(digits, args)
    LC = nets["latent_critic"]

    def logits():  # LC's mean logit on E(x) ("fake") and on G(z,c) ("real")
        with torch.no_grad():
            _, t = infoae.min_player_terms(nets, x, z, c)
            return float(LC(t["l_e"]).mean()), float(LC(t["l_g"]).mean())
    before = float(all_terms(nets, x, z, c)["lat"].detach())
    steps_on("lat", nets, lambda i: (x, z, c), 30)
    assert float(all_terms(nets, x, z, c)["lat"].detach()) < 0.5 * before  # LC separates them
    on_e, on_g = logits()
    assert on_g > on_e  # right way round: G(z,c) is "real"
    steps_on("enc_lat", nets, lambda i: (x, z, c), 10)
    assert logits()[0] > on_e + 1.0  # E moves E(x) to where LC says "real" ...
    assert logits()[1] == pytest.approx(on_g)  # ... and G's latents did not move
    on_e, on_g = logits()
    steps_on("gen_lat", nets, lambda i: (x, z, c), 10)
    assert logits()[1] < on_g - 1.0  # G moves G(z,c) to where LC says "fake", i.e. towards E(x)
    assert logits()[0] == pytest.approx(on_e)


def test_clustering_term_makes_warped_views_agree(digits):
    # clu_mi alone, into E and C: C(E(x)) and C(E(t(x))) come to agree and spread over the
    # categories (minus the IIC objective falls, so the objective itself rises)
    args, nets = fresh()
    x = digits.preprocess(digits.train_x[:64], train=True)
    z, c = infoae.sample_prior(64, args.z_dim, args.z_scale, args.categories, "cpu")

    def measure():  # on one fixed warp: agreement of the argmaxes, categories used, IIC
        torch.manual_seed(7)
        with torch.no_grad():
            C, E = nets["classifier"], nets["encoder"]
            logits, logits_w = C(E(x)["y"]), C(E(common.random_affine(x))["y"])
            p, q = logits.argmax(1), logits_w.argmax(1)
            return (float((p == q).float().mean()), len(p.unique()),
                    float(common.cluster_information(logits, logits_w)))
    _, _, info_before = measure()
    g = nets["generator"].net[0].weight.clone()
    steps_on("clu_mi", nets, lambda i: (x, z, c), 60)
    agree, used, info_after = measure()
    assert info_after > info_before + 0.5, (info_before, info_after)
    assert agree > 0.6 and used >= 3  # agreeing, and not by putting all in one category
    assert torch.equal(nets["generator"].net[0].weight, g)  # G is not this term's


def test_encoder_batchnorm_statistics_come_from_real_images(digits):
    args, nets = fresh()
    encoder = nets["encoder"]
    with torch.no_grad():  # skew the running statistics as generated batches would
        encoder(torch.rand(64, 1, 32, 32) * 2 - 1)
    common.recalibrate_batchnorm(encoder, digits, "cpu")
    assert encoder.training and encoder.c2[1].momentum == 0.1  # left as it was
    encoder.eval()
    with torch.no_grad():  # BN output (gamma 1, beta 0 at init) then has mean ~0 on real images
        h = encoder.c2[1](encoder.c2[0](encoder.c1(digits.preprocess(digits.train_x, False))))
    assert h.mean((0, 2, 3)).abs().max() < 0.05


# ----------------------------------------------------------------------------------------
# The script end to end
# ----------------------------------------------------------------------------------------
def test_script_runs_saves_and_resumes(tmp_path):
    flags = ["--width", "8", "--hidden", "64", "--batch-size", "32", "--no-progress",
             "--out-dir", str(tmp_path)]
    run = infoae.main(["--epochs", "1", "--max-steps", "3", *flags])
    for name in ("args.json", "metrics.jsonl", "checkpoint.pt", "samples.png",
                 "reconstructions.png", "interpolation.png"):
        assert os.path.isfile(run.path(name)), name
    lines = [json.loads(l) for l in open(run.path("metrics.jsonl"))]
    assert 0.0 < lines[-1]["test_cluster_acc"] <= 1.0
    assert sum(lines[-1]["cluster_sizes"]) == 360

    ckpt = common.load_checkpoint(run.path("checkpoint.pt"))
    assert ckpt["script"] == "infoae" and ckpt["step"] == 3
    assert set(ckpt["modules"]) == set(NETS) - {"encoder"}
    encoder = common.encoder_from_checkpoint(ckpt, infoae.ENCODERS)  # what eval_probe.py does
    out = encoder.eval()(torch.zeros(2, 1, 32, 32))
    assert {"conv", "fc", "y"} <= set(out) and out["y"].shape == (2, 16)  # y is l_e (--latent-dim)

    ckpt_path = run.path("checkpoint.pt")
    resumed = infoae.main(["--epochs", "2", "--max-steps", "5", "--resume", ckpt_path, *flags])
    assert resumed.dir == run.dir
    assert common.load_checkpoint(ckpt_path)["step"] == 5
    with pytest.raises(common.UserError):  # other flags than the original run
        infoae.main(["--epochs", "3", "--width", "16", "--resume", ckpt_path, "--no-progress",
                     "--out-dir", str(tmp_path)])


def ddp_worker(rank, port, out_dir):
    """One rank of a two-process gloo run of infoae.main; afterwards every rank saves the
    parameters of the networks it trained."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    built, build = [], infoae.build_networks
    infoae.build_networks = lambda *a: built.append(build(*a)) or built[-1]
    infoae.main(["--device", "cpu", "--max-steps", "2", "--epochs", "1", "--width", "8",
                 "--hidden", "64", "--no-progress", "--out-dir", os.path.join(out_dir, "runs")])
    _, nets = built[0]
    torch.save({f"{name}.{k}": p.detach() for name, m in nets.items() for k, p in m.named_parameters()},
               os.path.join(out_dir, f"params_rank{rank}.pt"))
    os._exit(0)  # gloo's teardown at interpreter exit has aborted ranks on a loaded CI machine


def test_runs_under_ddp_with_two_processes_ranks_agree_and_only_rank_0_writes(tmp_path):
    """Two gloo processes, a couple of steps: both ranks end with identical weights (DDP
    averaged every gradient; BatchNorm statistics are per rank and not compared), one run
    folder, and a checkpoint of the plain modules (no DDP "module." prefix)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert p0.keys() == p1.keys()
    differ = [k for k in p0 if not torch.equal(p0[k], p1[k])]
    assert not differ, f"ranks' weights differ: {differ[:3]}"
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    ckpt = common.load_checkpoint(runs[0] / "checkpoint.pt")
    assert ckpt["step"] == 2
    common.encoder_from_checkpoint(ckpt, infoae.ENCODERS)  # strict: a DDP "module." prefix would fail here
    _, nets = infoae.build_networks(argparse.Namespace(**ckpt["args"]), (1, 32, 32))
    for name, state in ckpt["modules"].items():
        nets[name].load_state_dict(state)  # strict, likewise
    assert all(torch.equal(p0[f"encoder.{k}"], v) for k, v in ckpt["encoder"].items()
               if f"encoder.{k}" in p0)  # the checkpoint holds the trained weights


def test_recipe_by_default_paper_one_flag_away():
    recipe, paper = infoae.parse_args([]), infoae.parse_args(["--paper"])
    assert {k: getattr(recipe, k) for k in infoae.RECIPE} == infoae.RECIPE
    assert (paper.latent_adv, paper.latent_adv_gen, paper.instance_noise, paper.beta,
            paper.cluster_mi, paper.width, paper.hidden, paper.epochs) == (0, 0, 0, 1, 0, 64, 512, 50)
    assert recipe.epochs is None  # RECIPE_STEPS steps, set once the data's size is known
    assert infoae.RECIPE_STEPS == 80 * (2000 // 32)
    assert infoae.parse_args(["--latent-adv", "0"]).latent_adv == 0  # a flag given wins
    assert infoae.parse_args(["--paper", "--cluster-mi", "4"]).cluster_mi == 4
    assert (recipe.cluster_neighbours, paper.cluster_neighbours) == (1, 0)


def test_bad_flags_exit_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        infoae.parse_args(["--categories", "1"])
    assert e.value.code == 2
    assert "categories" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# MNIST-shaped images: a black border every image shares
# ----------------------------------------------------------------------------------------
def mnist_shaped(n_train=64, n_test=64, seed=0):
    """A common.Data shaped like --dataset mnist's: 28x28 uint8 digit-like strokes (a bar per
    class, jittered, in MNIST's central 20x20 box) on black, padded to 32x32 as load_data
    pads MNIST. Every image is -1 in its border after preprocessing, so the batch's variance
    there is exactly 0 (bundled digits under instance noise never are)."""
    g = torch.Generator().manual_seed(seed)

    def images(n):
        x, y = torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.arange(n) % 10
        for i, k in enumerate(y.tolist()):
            r, c = 6 + k % 5 * 3 + int(torch.randint(-1, 2, (1,), generator=g)), 6 + k // 5 * 8
            x[i, 0, r:r + 3, c:c + 10] = 255
            x[i, 0, 6:22, 4 + k:6 + k] = torch.randint(128, 256, (16, 2), generator=g).to(torch.uint8)
        return F.pad(x, (2, 2, 2, 2)), y
    (tx, ty), (vx, vy) = images(n_train), images(n_test)
    return common.Data("mnist", tx, ty, vx, vy, 10)


def test_dis_gradient_is_finite_where_every_image_is_background():
    # ImageDiscriminator's spread took sqrt of a batch variance that is exactly 0 at MNIST's
    # border; sqrt's infinite gradient there times 0 made Dis's first update NaN
    data = mnist_shaped()
    torch.manual_seed(0)
    dis = infoae.ImageDiscriminator(1, 32, 8)
    x = data.preprocess(data.train_x[:N], train=True)
    assert (x[:, :, :2] == -1).all()
    F.softplus(-dis(x)).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in dis.parameters())


def test_trains_on_mnist_shaped_images_with_finite_losses(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "load_data", lambda *a, **kw: mnist_shaped())
    run = infoae.main(["--dataset", "mnist", "--width", "8", "--hidden", "64", "--batch-size", "16",
                       "--epochs", "1", "--max-steps", "4", "--eval-every", "0", "--no-progress",
                       "--out-dir", str(tmp_path)])
    epoch = json.loads(open(run.path("metrics.jsonl")).readline())
    assert epoch["step"] == 4
    for k in ("rec", "dec_gen", "dec_rec", "cls_gen", "cls_enc", "enc_sc", "dis", "sc", "lat", "loss"):
        assert torch.isfinite(torch.tensor(epoch[k])), (k, epoch[k])


def test_nan_names_the_terms_and_the_network_and_this_scripts_flags(tmp_path, monkeypatch):
    build = infoae.build_networks

    def broken_dis(*a):
        cfg, nets = build(*a)
        with torch.no_grad():
            nets["discriminator"].out.weight.fill_(float("nan"))
        return cfg, nets
    monkeypatch.setattr(infoae, "build_networks", broken_dis)
    with pytest.raises(common.UserError) as e:
        infoae.main(["--width", "8", "--hidden", "64", "--max-steps", "2", "--eval-every", "0",
                     "--no-progress", "--out-dir", str(tmp_path)])
    msg = str(e.value)
    assert "at step 0" in msg and "dec_gen, dec_rec" in msg and "discriminator" in msg
    assert "--lr" in msg and "--alpha" in msg and "--loss" not in msg
