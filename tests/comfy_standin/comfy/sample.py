"""Stand-in for comfy.sample: seeded noise and an Euler sampler with batched CFG (cond and uncond
in one forward, as ComfyUI does), calling ``model.apply_model`` like ComfyUI's samplers, after loading (patching) the model."""
import torch


def prepare_noise(latent_image, seed, noise_inds=None):
    g = torch.manual_seed(seed)
    return torch.randn(latent_image.size(), generator=g, dtype=torch.float32)


def fix_empty_latent_channels(model, latent_image):
    return latent_image


def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
           denoise=1.0, disable_pbar=False, seed=None, callback=None):
    if sampler_name != "euler" or scheduler != "normal":
        raise ValueError("stand-in sampler supports euler/normal only")
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])  # patches the model, as ComfyUI's prepare_sampling does
    base = model.model
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x = latent_image + noise * sigmas[0]
    cond = torch.cat([positive[0][0], negative[0][0]])
    for i in range(steps):
        xin = torch.cat([x, x])
        eps = base.apply_model(xin, sigmas[i].expand(2), c_crossattn=cond)
        e_pos, e_neg = eps.chunk(2)
        eps = e_neg + cfg * (e_pos - e_neg)
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
    return x
