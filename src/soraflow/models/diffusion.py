"""Gaussian diffusion as Open-Sora 1.0 trains and samples it (IDDPM, Nichol & Dhariwal 2021).

1000 linear betas, the model predicts eps plus a per-element interpolation between the
smallest and largest reasonable log-variance (LEARNED_RANGE), trained with the hybrid loss
MSE(eps) + VLB (the VLB only trains the variance: the mean is detached). Sampling uses a
respaced subset of the steps (Open-Sora: 100 of 1000) with classifier-free guidance.

Schedules are float64 tensors; `extract` gathers per-sample values in the input's dtype.
Shapes: x is [B, C, ...]; t is [B] long indices into this diffusion's own steps.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

ModelFn = Callable[..., torch.Tensor]  # model_fn(x_t, t, **model_kwargs) -> [B, 2C or C, ...]


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's 1e-4..0.02 over 1000 steps, rescaled so any step count spans the same noise."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def extract(schedule: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """schedule[t] as [B, 1, 1, ...] broadcastable against x."""
    values = schedule.to(t.device)[t].to(x.dtype)
    return values.reshape(-1, *([1] * (x.dim() - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log p(x) for data in [-1, 1] quantised to 256 bins (the VLB's t = 0 decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def space_timesteps(num_timesteps: int, section_counts: int | Sequence[int]) -> list[int]:
    """The steps to keep when respacing (IDDPM): the schedule is cut into len(section_counts)
    equal sections and each keeps that many evenly spaced steps, first and last included.
    E.g. space_timesteps(1000, 100) keeps 0, 10, ..., 999 (rounded)."""
    counts = [section_counts] if isinstance(section_counts, int) else list(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot keep {count} steps of a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


class GaussianDiffusion:
    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True, timestep_map: torch.Tensor | None = None):
        """`timestep_map[i]` is the original step a respaced step i stands for; the model is
        always called with original step numbers, since that is what it was trained on."""
        betas = betas.to(torch.float64)
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else timestep_map.long()

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance is 0 at t = 0, so its log there borrows t = 1's
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # ---- forward process -------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start)
        return mean, variance, extract(torch.log(1.0 - self.alphas_cumprod), t, x_start)

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x_start + extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = extract(self.posterior_variance, t, x_t)
        return mean, variance, extract(self.posterior_log_variance_clipped, t, x_t)

    # ---- reverse process -------------------------------------------------------------

    def p_mean_variance(self, model_fn: ModelFn, x, t, model_kwargs=None, clip_denoised=None) -> dict:
        """p(x_{t-1} | x_t) from the model: eps gives the mean via x_0, and the second half
        of the channels interpolates the log-variance between the posterior's (v = -1) and
        beta_t (v = +1). Without learned sigma the variance is fixed to the larger, beta_t."""
        C = x.shape[1]
        model_output = model_fn(x, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        if self.learn_sigma:
            eps, var_values = model_output[:, :C], model_output[:, C:]
            min_log = extract(self.posterior_log_variance_clipped, t, x)
            max_log = extract(torch.log(self.betas), t, x)
            frac = (var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output
            fixed_large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            model_log_variance = extract(torch.log(fixed_large), t, x).expand_as(x)
        pred_xstart = extract(self.sqrt_recip_alphas_cumprod, t, x) * x - extract(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        if clip_denoised is not None:  # data known to lie in [-clip_denoised, clip_denoised]
            pred_xstart = pred_xstart.clamp(-clip_denoised, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(
            mean=mean, log_variance=model_log_variance, pred_xstart=pred_xstart, eps=eps, model_output=model_output
        )

    def vb_terms_bpd(self, model_fn: ModelFn, x_start, x_t, t, model_kwargs=None) -> torch.Tensor:
        """[B] one VLB term in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or
        the decoder NLL of x_0 at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_fn, x_t, t, model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """A training sample's step, uniform over the steps."""
        return torch.randint(self.num_timesteps, (), generator=generator)

    def training_losses(self, model_fn: ModelFn, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses [B]: mse on eps, vb (learned variance only), loss = mse + vb."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        C = x_start.shape[1]
        mse = mean_flat((noise - model_output[:, :C]) ** 2)
        if not self.learn_sigma:
            return dict(loss=mse, mse=mse, vb=torch.zeros_like(mse))
        # The VLB sees the eps half detached, so it only trains the variance (IDDPM's
        # hybrid objective); the step is already mapped, hence the identity-map model.
        frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
        vb = self.vb_terms_bpd(lambda *_, **__: frozen, x_start, x_t, t)
        vb = vb * (self.num_timesteps / 1000.0)  # IDDPM's rescale: 1 at 1000 steps
        return dict(loss=mse + vb, mse=mse, vb=vb)

    def p_sample(self, model_fn: ModelFn, x, t, model_kwargs=None, generator=None, clip_denoised=None):
        """One ancestral step x_t -> x_{t-1} (no noise added at t = 0)."""
        out = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(self, model_fn: ModelFn, x, t, model_kwargs=None, generator=None, eta=0.0, clip_denoised=None):
        """One DDIM step (deterministic at eta = 0)."""
        out = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        eps = (extract(self.sqrt_recip_alphas_cumprod, t, x) * x - out["pred_xstart"]) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x
        )
        alpha_bar = extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        mean = out["pred_xstart"] * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return mean + nonzero * sigma * noise

    def p_sample_loop(self, model_fn: ModelFn, shape, model_kwargs=None, seed: int = 0, device="cpu",
                      progress=False, clip_denoised=None):
        """Ancestral sampling from pure noise through every step of this (respaced) diffusion."""
        return self._loop(self.p_sample, model_fn, shape, model_kwargs, seed, device, progress, clip_denoised=clip_denoised)

    def ddim_sample_loop(self, model_fn: ModelFn, shape, model_kwargs=None, seed: int = 0, device="cpu",
                         progress=False, eta=0.0, clip_denoised=None):
        return self._loop(self.ddim_sample, model_fn, shape, model_kwargs, seed, device, progress,
                          eta=eta, clip_denoised=clip_denoised)

    def _loop(self, step, model_fn, shape, model_kwargs, seed, device, progress, **step_kwargs):
        generator = torch.Generator(device).manual_seed(seed)
        x = torch.randn(shape, generator=generator, device=device)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="sampling"):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                x = step(model_fn, x, t, model_kwargs, generator=generator, **step_kwargs)
        return x

    def respaced(self, num_steps: int | Sequence[int]) -> GaussianDiffusion:
        """A diffusion over a subset of these steps with the same alphas_cumprod there:
        beta'_i = 1 - abar[k_i] / abar[k_{i-1}]."""
        kept = space_timesteps(self.num_timesteps, num_steps)
        alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / previous
        return GaussianDiffusion(betas, self.learn_sigma, self.timestep_map[kept])


class IDDPM(GaussianDiffusion):
    """Open-Sora 1.0's diffusion: IDDPM(num_timesteps=1000, 'linear', learn_sigma=True)."""

    def __init__(self, num_timesteps: int = 1000, beta_schedule: str = "linear", learn_sigma: bool = True):
        if beta_schedule != "linear":
            raise ValueError(f"only the linear beta schedule (Open-Sora 1.0's) is implemented, not {beta_schedule!r}")
        super().__init__(linear_betas(num_timesteps), learn_sigma)


def sample(model, shape, y, mask=None, cfg_scale: float = 7.0, num_steps: int = 100, seed: int = 0,
           num_timesteps: int = 1000, progress: bool = False, sampler: str = "iddpm",
           clip_denoised: float | None = None) -> torch.Tensor:
    """Latents [B, C, T, H, W] for captions y [B, L, Ccap] (mask [B, L]) with classifier-free
    guidance against the model's null caption, through `num_steps` respaced steps.
    `clip_denoised` (a bound) clamps each step's predicted x_0, as IDDPM does for pixel data;
    latent diffusion leaves it None (a VAE's latents have no fixed range)."""
    if sampler not in ("iddpm", "ddim"):
        raise ValueError(f"sampler must be 'iddpm' or 'ddim', not {sampler!r}")
    diffusion = IDDPM(num_timesteps).respaced(num_steps)

    def model_fn(x, t):
        return model.forward_with_cfg(x, t, y, mask, cfg_scale=cfg_scale)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loop = diffusion.p_sample_loop if sampler == "iddpm" else diffusion.ddim_sample_loop
    try:
        return loop(model_fn, shape, seed=seed, device=device, progress=progress, clip_denoised=clip_denoised)
    finally:
        model.train(was_training)
