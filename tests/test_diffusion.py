"""IDDPM diffusion: closed forms, respacing, the hybrid loss and classifier-free guidance."""

import math

import pytest
import torch
from test_stdit import inputs, randomize_zero_init, tiny

from soraflow.models.diffusion import IDDPM, sample, space_timesteps


def closed_form_alphas_cumprod(num_timesteps=1000):
    betas = [1e-4 + (0.02 - 1e-4) * i / (num_timesteps - 1) for i in range(num_timesteps)]
    return torch.tensor([math.prod(1 - b for b in betas[: i + 1]) for i in range(num_timesteps)], dtype=torch.float64)


def test_linear_schedule():
    diffusion = IDDPM()
    assert diffusion.num_timesteps == 1000
    assert diffusion.betas[0].item() == pytest.approx(1e-4) and diffusion.betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(diffusion.alphas_cumprod, closed_form_alphas_cumprod())
    torch.testing.assert_close(IDDPM(100).betas[[0, -1]], torch.tensor([1e-3, 0.2], dtype=torch.float64))


def test_q_sample_matches_its_closed_form():
    diffusion, abar = IDDPM(), closed_form_alphas_cumprod()
    x_start = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).repeat(20000, 1)  # [N, 3]
    t = torch.full((20000,), 300)
    torch.manual_seed(0)
    x_t = diffusion.q_sample(x_start, t)
    torch.testing.assert_close(x_t.mean(0), abar[300].sqrt() * x_start[0], atol=0.03, rtol=0)
    torch.testing.assert_close(x_t.var(0), (1 - abar[300]).expand(3), atol=0.03, rtol=0)
    mean, variance, log_variance = diffusion.q_mean_variance(x_start[:2], t[:2])
    torch.testing.assert_close(mean, abar[300].sqrt() * x_start[:2])
    torch.testing.assert_close(log_variance, variance.log())


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the product of q(x_{t-1} | x_0) and q(x_t | x_{t-1})."""
    diffusion, abar = IDDPM(), closed_form_alphas_cumprod()
    t = torch.tensor([1, 10, 500, 999])
    x_start, x_t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    abar_t, abar_prev = abar[t][:, None], abar[t - 1][:, None]
    alpha = abar_t / abar_prev
    precision = 1 / (1 - abar_prev) + alpha / (1 - alpha)  # prior on x_{t-1}, then likelihood of x_t
    expected_variance = 1 / precision
    expected_mean = expected_variance * (abar_prev.sqrt() * x_start / (1 - abar_prev) + alpha.sqrt() * x_t / (1 - alpha))
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(variance.expand_as(mean), expected_variance.expand_as(mean))
    torch.testing.assert_close(log_variance, variance.log())
    # at t = 0 the posterior is a point: its log-variance is clipped to t = 1's
    _, variance0, log_variance0 = diffusion.q_posterior_mean_variance(x_start[:1], x_t[:1], torch.tensor([0]))
    assert variance0.item() == 0 and log_variance0.item() == pytest.approx(math.log(diffusion.posterior_variance[1]))


def test_learned_range_variance():
    diffusion = IDDPM()
    t = torch.tensor([5, 700])
    x = torch.randn(2, 4, 1, 2, 2, dtype=torch.float64)
    for v, expected in [(-1.0, diffusion.posterior_log_variance_clipped[t]), (1.0, diffusion.betas[t].log())]:
        out = diffusion.p_mean_variance(lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1), x, t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0, 0], expected)


def test_respacing_keeps_alphas_cumprod_at_the_kept_steps():
    base = IDDPM()
    kept = space_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    spaced = base.respaced(100)
    assert spaced.num_timesteps == 100 and spaced.timestep_map.tolist() == kept
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept])
    assert space_timesteps(1000, [10, 5]) == sorted(set(space_timesteps(500, 10) + [500 + k for k in space_timesteps(500, 5)]))
    twice = spaced.respaced(10)  # respacing a respaced diffusion still maps to original steps
    torch.testing.assert_close(twice.alphas_cumprod, base.alphas_cumprod[twice.timestep_map])


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_with_the_exact_eps_recovers_the_data_point(loop):
    """For data that is a single point x0 the optimal eps is known in closed form, in the
    ORIGINAL step numbering; respaced sampling with it must land on x0."""
    base = IDDPM()
    x0 = torch.tensor([0.8, -0.3, 0.1, -0.9]).reshape(1, 4, 1, 1, 1)

    def exact_eps(x_t, original_t):
        abar = base.alphas_cumprod[original_t].float().reshape(-1, 1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)  # smallest variance

    samples = getattr(base.respaced(50), loop)(exact_eps, (3, 4, 1, 1, 1), seed=0)
    torch.testing.assert_close(samples, x0.expand(3, -1, -1, -1, -1), atol=0.02, rtol=0)


def test_training_loss_is_finite_and_trains_the_variance_only_through_vb():
    diffusion = IDDPM()
    model = randomize_zero_init(tiny()).train()
    x, t, y, mask = inputs()
    x = x.clamp(-1, 1)
    t[0] = 0  # the decoder NLL term
    losses = diffusion.training_losses(model, x, t, model_kwargs={"y": y, "mask": mask})
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (2,)
    assert torch.isfinite(losses["loss"]).all()
    losses["loss"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.final_layer.linear.weight.grad.abs().sum() > 0

    # the VLB's gradient reaches the variance channels, never the eps channels
    output = torch.zeros(2, 8, *x.shape[2:], requires_grad=True)
    vb = diffusion.training_losses(lambda *_, **__: output, x, t)["vb"]
    (grad,) = torch.autograd.grad(vb.sum(), output)
    assert grad[:, :4].abs().sum() == 0 and grad[:, 4:].abs().sum() > 0


def test_classifier_free_guidance_math():
    model = randomize_zero_init(tiny())
    x, t, y, mask = inputs()
    with torch.no_grad():
        cond = model(x, t, y, mask)
        uncond = model(x, t, y, mask, force_drop_ids=torch.ones(2))
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, mask, cfg_scale=1.0), cond)
        guided = model.forward_with_cfg(x, t, y, mask, cfg_scale=5.0)
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 5.0 * (cond[:, :4] - uncond[:, :4]))  # all 4 channels
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:])  # variance from the conditional branch


def test_sample_is_seeded_and_cfg_1_is_conditional_sampling():
    model = randomize_zero_init(tiny())
    _, _, y, mask = inputs()
    shape = (2, 4, 2, 8, 8)
    first = sample(model, shape, y, mask, cfg_scale=3.0, num_steps=5, seed=7)
    assert first.shape == shape and torch.isfinite(first).all()
    torch.testing.assert_close(sample(model, shape, y, mask, cfg_scale=3.0, num_steps=5, seed=7), first)
    conditional = IDDPM().respaced(5).p_sample_loop(lambda x, t: model(x, t, y, mask), shape, seed=7)
    guided_at_1 = sample(model, shape, y, mask, cfg_scale=1.0, num_steps=5, seed=7)
    torch.testing.assert_close(guided_at_1, conditional, atol=1e-3, rtol=1e-3)  # batched with the null: float noise


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_clip_denoised_bounds_the_samples_of_a_model_that_blows_up(loop):
    """eps = 0 everywhere makes every step's x_0 estimate x_t / sqrt(abar), which grows to
    ~150x the noise; clamping x_0 to a bound (pixel_pack latents: [-scale, scale]) keeps
    the samples in range, as IDDPM clamps pixel data."""
    diffusion = IDDPM().respaced(20)

    def zero_eps(x_t, t):
        return torch.cat([torch.zeros_like(x_t), torch.zeros_like(x_t)], dim=1)

    shape = (2, 3, 1, 4, 4)
    assert getattr(diffusion, loop)(zero_eps, shape, seed=0).abs().max() > 10
    bounded = getattr(diffusion, loop)(zero_eps, shape, seed=0, clip_denoised=2.5)
    assert bounded.abs().max() <= 2.5 + 1e-5
