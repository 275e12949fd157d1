"""The diffusion objectives (epsilon / v / x0 prediction, rectified flow, min-SNR weighting) and the
diffusers-driven samplers: hand values, exact inverses, diffusers as the reference, and a Gaussian
toy whose exact denoiser (and flow velocity) is known in closed form."""

import math

import numpy as np
import pytest
import torch

from pipeline.diffusion import (
    FLOW_SAMPLERS,
    PREDICTIONS,
    SCHEDULER_SAMPLERS,
    GaussianDiffusion,
    flow_sample_loop,
    make_betas,
    scheduler_sample_loop,
)

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_and_split_output_are_inverse(prediction):
    d = GaussianDiffusion("cosine", 1000, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64).float(),
        torch.randn(6, 3, 5, 5, generator=g).float(),
    )
    t = torch.tensor([0, 1, 100, 500, 900, 998])
    x_t = d.q_sample(x0, t, eps)
    x0_hat, eps_hat = d.split_output(x_t, t, d.target(x0, eps, t))
    assert torch.allclose(x0_hat, x0, atol=2e-4) and torch.allclose(eps_hat, eps, atol=2e-4)


def test_v_target_by_hand():
    d = GaussianDiffusion("linear", 1000, prediction="v")
    abar = np.cumprod(1 - make_betas("linear", 1000))
    t = 250
    v = d.target(torch.full((1, 1), 2.0), torch.full((1, 1), -1.0), torch.tensor([t]))
    assert float(v) == pytest.approx(math.sqrt(abar[t]) * -1.0 - math.sqrt(1 - abar[t]) * 2.0, rel=1e-5)


def test_v_target_matches_diffusers_get_velocity():
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    d = GaussianDiffusion("linear", 1000, prediction="v")
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(d.target(x0, eps, t), ref.get_velocity(x0, eps, t), atol=1e-5)


@pytest.mark.parametrize(
    "prediction,divide", [("epsilon", lambda snr: snr), ("v", lambda snr: snr + 1), ("x0", lambda snr: 1.0)]
)
def test_min_snr_weights_by_hand_and_against_diffusers(prediction, divide):
    d = GaussianDiffusion("linear", 1000, prediction=prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
    abar = np.cumprod(1 - make_betas("linear", 1000))
    t = torch.tensor([0, 50, 200, 400, 999])
    snr = abar[t.numpy()] / (1 - abar[t.numpy()])
    expect = np.minimum(snr, 5.0) / np.array([divide(s) for s in snr])
    assert np.allclose(d.loss_weights(t).numpy(), expect, rtol=1e-4)
    # diffusers' compute_snr (the min-SNR recipe of train_text_to_image.py) gives the same SNR
    from diffusers.training_utils import compute_snr

    ref = compute_snr(diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"), t)
    # diffusers forms 1 - abar in float32 (SNR_0 = 9997.3 there, 9999.0 exactly); ours is float64-derived
    assert np.allclose(d.snr[t].numpy(), ref.numpy(), rtol=3e-4)
    # high-noise steps (SNR < gamma) keep weight 1 on the implied x0 error: eps-weight = 1 / ... = 1
    if prediction == "epsilon":
        assert float(d.loss_weights(torch.tensor([999]))) == pytest.approx(1.0)


def test_no_weighting_is_one_and_bad_names_are_refused():
    d = GaussianDiffusion("linear", 100)
    assert torch.equal(d.loss_weights(torch.tensor([0, 99])), torch.ones(2))
    with pytest.raises(
        ValueError, match=r"unknown prediction 'score'; expected one of \['epsilon', 'v', 'x0', 'flow'\]"
    ):
        GaussianDiffusion("linear", 100, prediction="score")
    with pytest.raises(ValueError, match=r"unknown loss weighting 'p2'"):
        GaussianDiffusion("linear", 100, loss_weighting="p2")
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        GaussianDiffusion("linear", 100, loss_weighting="min_snr", min_snr_gamma=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_loss_of_the_exact_target_is_zero_and_weighted(prediction):
    d = GaussianDiffusion("linear", 1000, prediction=prediction, loss_weighting="min_snr")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 300, 700, 999])
    perfect = lambda x_t, tt: d.target(x0, noise, tt)  # noqa: E731
    assert torch.allclose(d.training_losses(perfect, x0, t, noise), torch.zeros(5), atol=1e-8)
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    expect = d.target(x0, noise, t).pow(2).flatten(1).mean(1) * d.loss_weights(t)
    assert torch.allclose(d.training_losses(zero, x0, t, noise), expect, rtol=1e-5)
    # the comparable test loss is the implied epsilon error, 0 for the exact target
    assert torch.allclose(d.eps_mse(perfect, x0, t, noise), torch.zeros(5), atol=1e-6)


def test_scheduler_uses_our_schedule():
    for schedule in ("linear", "cosine"):
        d = GaussianDiffusion(schedule, 1000)
        for name in SCHEDULER_SAMPLERS:
            sched = d.diffusers_scheduler(name)
            assert torch.allclose(sched.alphas_cumprod.float(), d.alphas_cumprod, rtol=1e-5, atol=1e-7), (
                schedule,
                name,
            )
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        d.diffusers_scheduler("plms")


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_epsilon_predictor_at_integer_and_fractional_timesteps(prediction):
    d = GaussianDiffusion("linear", 1000, prediction=prediction)
    g = torch.Generator().manual_seed(4)
    x_t, out = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    net = lambda x, t: out  # noqa: E731
    t = torch.tensor([5, 400, 999])
    _, eps = d.split_output(x_t, t, out)
    assert torch.allclose(d.epsilon_predictor(net)(x_t, t.float()), eps, atol=1e-4)
    # halfway between two steps, abar is the log-SNR midpoint: the eps of that abar
    mid = d.epsilon_predictor(net)(x_t, torch.full((3,), 400.5))
    lam = 0.5 * (math.log(float(d.snr[400])) + math.log(float(d.snr[401])))
    abar = 1 / (1 + math.exp(-lam))
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    expect = {"epsilon": out, "x0": (x_t - a * out) / s, "v": s * x_t + a * out}[prediction]
    assert torch.allclose(mid, expect, atol=1e-4)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data x0 ~ N(mu, s2) per channel (its posterior mean in closed form):
    E[x0 | x_t] = mu + sqrt(abar) s2 / (abar s2 + 1 - abar) (x_t - sqrt(abar) mu)."""

    def __init__(self, d: GaussianDiffusion, mu, s2):
        super().__init__()
        self.d, self.mu, self.s2 = d, torch.tensor(mu).view(1, -1, 1, 1), torch.tensor(s2).view(1, -1, 1, 1)

    def forward(self, x, t):
        t = torch.as_tensor(t).float().reshape(-1).expand(x.shape[0])
        lo = t.floor().long().clamp(0, self.d.num_timesteps - 1)
        hi = (lo + 1).clamp(max=self.d.num_timesteps - 1)
        f = (t - lo.float()).double()
        ls = torch.log(self.d.snr.double())
        abar = torch.sigmoid(ls[lo] * (1 - f) + ls[hi] * f).float().view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = self.mu + a * self.s2 / (abar * self.s2 + 1 - abar) * (x - a * self.mu)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "x0": x0, "v": a * eps - s * x0}[self.d.prediction]


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize(
    "sampler,steps,tol", [("dpmpp", 25, 0.06), ("heun", 25, 0.06), ("dpmsde", 50, 0.08), ("euler", 100, 0.08)]
)
def test_samplers_draw_the_gaussian_toy(prediction, sampler, steps, tol):
    """With the exact denoiser of N(mu, s2), a correct sampler returns samples of that law."""
    d = GaussianDiffusion("linear", 1000, prediction=prediction)
    mu, s2 = [1.0, -0.5, 0.0], [0.25, 1.0, 4.0]
    x = scheduler_sample_loop(
        d,
        GaussianDenoiser(d, mu, s2),
        (20000, 3, 1, 1),
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    assert np.allclose(x.mean((0, 2, 3)).numpy(), mu, atol=0.05)
    assert np.allclose(x.var((0, 2, 3)).numpy() / np.array(s2), 1.0, atol=tol), x.var((0, 2, 3))


def test_ddpm_and_ddim_draw_the_gaussian_toy():
    d = GaussianDiffusion("linear", 1000, prediction="v")
    toy = GaussianDenoiser(d, [0.5], [2.0])
    x = d.p_sample_loop(toy, (20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert float(x.mean()) == pytest.approx(0.5, abs=0.05) and float(x.var()) / 2.0 == pytest.approx(1.0, abs=0.05)
    x = d.ddim_sample_loop(toy, (20000, 1, 1, 1), steps=200, generator=torch.Generator().manual_seed(0))
    assert float(x.var()) / 2.0 == pytest.approx(1.0, abs=0.05)


def test_clip_bounds_the_predicted_x0():
    """A denoiser that predicts x0 = 10 everywhere, clipped to [-1, 1], lands inside [-1, 1]."""
    d = GaussianDiffusion("linear", 1000, prediction="x0")
    far = lambda x, t: torch.full_like(x, 10.0)  # noqa: E731
    clip = (torch.tensor(-1.0), torch.tensor(1.0))
    x = scheduler_sample_loop(
        d, far, (8, 1, 2, 2), sampler="dpmpp", steps=10, generator=torch.Generator().manual_seed(0), clip=clip
    )
    assert x.max() <= 1.0 + 1e-4 and x.max() > 0.9
    unclipped = scheduler_sample_loop(
        d, far, (8, 1, 2, 2), sampler="dpmpp", steps=10, generator=torch.Generator().manual_seed(0)
    )
    assert unclipped.min() > 9.0


# --- rectified flow ---------------------------------------------------------------------------
class FlowGaussianVelocity(torch.nn.Module):
    """The exact velocity of rectified flow for data x0 ~ N(mu, s2) per channel: on the path
    x = (1 - sigma) x0 + sigma eps, E[x0 | x] = mu + (1 - sigma) s2 / ((1 - sigma)^2 s2 + sigma^2)
    (x - (1 - sigma) mu), E[eps | x] = (x - (1 - sigma) E[x0 | x]) / sigma, v = E[eps] - E[x0]."""

    def __init__(self, mu, s2, timesteps: int = 1000):
        super().__init__()
        self.mu, self.s2, self.T = torch.tensor(mu).view(1, -1, 1, 1), torch.tensor(s2).view(1, -1, 1, 1), timesteps

    def forward(self, x, t):
        sigma = (torch.as_tensor(t).float().reshape(-1).expand(x.shape[0]) / self.T).clamp(min=1e-6).view(-1, 1, 1, 1)
        a = 1 - sigma
        x0 = self.mu + a * self.s2 / (a**2 * self.s2 + sigma**2) * (x - a * self.mu)
        return (x - a * x0) / sigma - x0


def test_flow_path_target_and_inverse_by_hand():
    d = GaussianDiffusion("cosine", 1000, prediction="flow")
    x0, eps, t = torch.full((1, 1), 2.0), torch.full((1, 1), -1.0), torch.tensor([250.0])
    assert float(d.q_sample(x0, t, eps)) == pytest.approx(0.75 * 2.0 + 0.25 * -1.0)
    assert float(d.target(x0, eps, t)) == pytest.approx(-3.0)  # v = eps - x0
    x0_hat, eps_hat = d.split_output(d.q_sample(x0, t, eps), t, d.target(x0, eps, t))
    assert float(x0_hat) == pytest.approx(2.0) and float(eps_hat) == pytest.approx(-1.0)


def test_flow_time_sampling_and_weights():
    g = torch.Generator().manual_seed(0)
    t = GaussianDiffusion("cosine", 1000, prediction="flow").sample_timesteps(200_000, "cpu", generator=g)
    assert t.dtype == torch.float32 and 0 < float(t.min()) and float(t.max()) < 1000
    logit = torch.logit(t / 1000)  # logit-normal: the logit of sigma is N(0, 1)
    assert float(logit.mean()) == pytest.approx(0.0, abs=0.01) and float(logit.std()) == pytest.approx(1.0, abs=0.01)
    u = GaussianDiffusion("cosine", 1000, prediction="flow", flow_time="uniform").sample_timesteps(200_000, "cpu", g)
    assert float((u / 1000).mean()) == pytest.approx(0.5, abs=0.005) and float((u / 1000).var()) == pytest.approx(
        1 / 12, abs=0.002
    )
    # VP timesteps are unchanged: the integers randint gave before
    vp = GaussianDiffusion("cosine", 1000).sample_timesteps(5, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(vp, torch.randint(0, 1000, (5,), generator=torch.Generator().manual_seed(3)))
    w = GaussianDiffusion("cosine", 1000, prediction="flow", loss_weighting="min_snr", min_snr_gamma=5.0)
    sigma = np.array([0.1, 0.3, 0.5, 0.9])
    expect = sigma**2 * np.minimum(((1 - sigma) / sigma) ** 2, 5.0)
    assert np.allclose(w.loss_weights(torch.tensor(sigma * 1000, dtype=torch.float32)).numpy(), expect, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown flow time sampling 'beta'"):
        GaussianDiffusion("cosine", 1000, prediction="flow", flow_time="beta")


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 100, 0.06), ("heun", 25, 0.05)])
def test_flow_samplers_draw_the_gaussian_toy(sampler, steps, tol):
    """diffusers' flow-matching schedulers with the exact velocity of N(mu, s2) draw that law."""
    d = GaussianDiffusion("cosine", 1000, prediction="flow")
    mu, s2 = [1.0, -0.5, 0.0], [0.25, 1.0, 4.0]
    x = flow_sample_loop(
        d, FlowGaussianVelocity(mu, s2), (20000, 3, 1, 1), sampler, steps, generator=torch.Generator().manual_seed(0)
    )
    assert np.allclose(x.mean((0, 2, 3)).numpy(), mu, atol=0.05)
    assert np.allclose(x.var((0, 2, 3)).numpy() / np.array(s2), 1.0, atol=tol), x.var((0, 2, 3))
    with pytest.raises(ValueError, match="unknown flow sampler 'dpmpp'"):
        flow_sample_loop(d, FlowGaussianVelocity(mu, s2), (2, 3, 1, 1), "dpmpp", 5)
    with pytest.raises(ValueError, match="flow samplers need prediction 'flow'"):
        flow_sample_loop(GaussianDiffusion("cosine", 1000), FlowGaussianVelocity(mu, s2), (2, 3, 1, 1), "euler", 5)
    assert set(FLOW_SAMPLERS) == {"euler", "heun"}


def test_a_flow_model_through_the_vp_samplers_draws_the_gaussian_toy():
    """The flow velocity seen as a VP epsilon-network at the point of equal SNR is the exact VP
    denoiser of the same law: DPM-Solver++ and DDIM draw N(mu, s2) from it."""
    d = GaussianDiffusion("linear", 1000, prediction="flow")
    mu, s2 = [0.5, -1.0], [2.0, 0.5]
    flow = FlowGaussianVelocity(mu, s2)
    exact = GaussianDenoiser(GaussianDiffusion("linear", 1000), mu, s2)
    x = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    for t in (torch.tensor([10.0] * 4), torch.tensor([500.0] * 4), torch.tensor([990.5] * 4)):
        assert torch.allclose(d.vp_epsilon_network(flow)(x, t), exact(x, t), atol=1e-4)
    got = scheduler_sample_loop(d, flow, (20000, 2, 1, 1), "dpmpp", 25, generator=torch.Generator().manual_seed(0))
    assert np.allclose(got.var((0, 2, 3)).numpy() / np.array(s2), 1.0, atol=0.06)
    got = d.ddim_sample_loop(flow, (20000, 2, 1, 1), steps=100, generator=torch.Generator().manual_seed(0))
    assert np.allclose(got.mean((0, 2, 3)).numpy(), mu, atol=0.05)
    with pytest.raises(ValueError, match="vp_epsilon_network needs prediction 'flow'"):
        GaussianDiffusion("linear", 1000).vp_epsilon_network(flow)
