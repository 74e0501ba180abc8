"""The diffusers adapters against diffusers' own calls, with tiny randomly initialised models
saved to temporary folders: the SD-VAE behind the autoencoder interface, and a pixel
UNet2DModel + scheduler as a score model on its DiscreteVPSDE (score and deterministic DDIM)."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import safetensors.torch
import torch

diffusers = pytest.importorskip(
    "diffusers", reason='diffusers is an optional extra (pip install -e ".[latent]")')

from models.autoencoders import create_autoencoder  # noqa: E402
from models.autoencoders.diffusers_vae import load_sd_vae  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from models.diffusers_unet import (  # noqa: E402
    ddim_time_grid,
    load_diffusers_unet,
    scheduler_timesteps,
)
from models.utils import get_score_fn  # noqa: E402
from samplers.base import sample  # noqa: E402

# -- the SD-VAE adapter ------------------------------------------------------------------------


def _tiny_vae(scaling_factor=0.3, shift_factor=0.1):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
        shift_factor=shift_factor).eval()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae = _tiny_vae()
    vae.save_pretrained(folder, safe_serialization=True)
    return folder, vae


def _images(n=2, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_vae_encode_decode_equal_diffusers_with_the_scale_applied_once(vae_folder):
    folder, vae = vae_folder
    ae = load_sd_vae(folder)
    assert (ae.scale_factor, ae.shift) == (0.3, 0.1)
    assert ae.latent_shape((3, 16, 16)) == (4, 8, 8)
    x = _images()
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mean, log_std = ae.encode(x)
        torch.testing.assert_close(mean, (posterior.mean - 0.1) * 0.3, rtol=0, atol=1e-6)
        torch.testing.assert_close(log_std, 0.5 * posterior.logvar + math.log(0.3),
                                   rtol=0, atol=1e-6)
        z_model = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(ae.decode(z_model), vae.decode(z_model / 0.3 + 0.1).sample,
                                   rtol=0, atol=1e-6)
        # the round trip through model space is diffusers' decode of its own posterior mean
        torch.testing.assert_close(ae.decode(mean), vae.decode(posterior.mean).sample,
                                   rtol=0, atol=1e-5)
        entropy = ae.posterior_entropy(x)
    D = mean[0].numel()
    per_dim = 0.5 * math.log(2 * math.pi * math.e) + math.log(0.3)
    expected = (0.5 * posterior.logvar).flatten(1).sum(1) + D * per_dim
    torch.testing.assert_close(entropy, expected, rtol=1e-6, atol=1e-4)


def test_vae_single_file_bin_and_config_section_agree_with_the_folder(vae_folder, tmp_path):
    folder, vae = vae_folder
    single = tmp_path / "sd-vae.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", single)
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(folder / "config.json", bin_folder / "config.json")
    torch.save(vae.state_dict(), bin_folder / "diffusion_pytorch_model.bin")
    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder, pipeline / "vae")
    x = _images()
    reference = load_sd_vae(folder)
    others = [load_sd_vae(single, folder / "config.json"), load_sd_vae(single, folder),
              load_sd_vae(bin_folder), load_sd_vae(pipeline),
              create_autoencoder({"name": "sd_vae", "path": str(folder), "config": "",
                                  "scale_factor": None, "shift": None})]
    with torch.no_grad():
        mean, log_std = reference.encode(x)
        for ae in others:
            m, s = ae.encode(x)
            assert torch.equal(m, mean) and torch.equal(s, log_std)
            assert torch.equal(ae.decode(mean), reference.decode(mean))


def test_vae_scale_override_and_old_attention_names(vae_folder, tmp_path):
    folder, vae = vae_folder
    ae = create_autoencoder({"name": "sd_vae", "path": str(folder), "scale_factor": 0.18215,
                             "shift": 0.0})
    assert (ae.scale_factor, ae.shift) == (0.18215, 0.0)
    assert ae.describe()["vae_scaling_factor"] == 0.3
    # a file saved before diffusers 0.14 names the attention projections query/key/value
    renamed = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
               .replace("to_out.0.", "proj_attn."): v for k, v in vae.state_dict().items()}
    assert any(".query." in k for k in renamed)
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file(renamed, old)
    x = _images()
    with torch.no_grad():
        assert torch.equal(load_sd_vae(old, folder).encode(x)[0], load_sd_vae(folder).encode(x)[0])


def _ldm_name(key: str, n_up: int) -> str:
    """diffusers' AutoencoderKL key -> the original latent-diffusion (CompVis) name."""
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"up.{n_up - 1 - int(m[1])}."
                           f"{'block' if m[2] == 'resnets' else 'upsample'}.", key)
    key = key.replace("mid_block.resnets.0.", "mid.block_1.")
    key = key.replace("mid_block.resnets.1.", "mid.block_2.")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                     ("to_out.0", "proj_out")):
        key = key.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def test_vae_single_file_in_the_latent_diffusion_layout(vae_folder, tmp_path):
    """A single file with the original latent-diffusion names (as in a full SD checkpoint,
    under ``first_stage_model.``; attention as 1x1 convs) loads through diffusers' key map."""
    folder, vae = vae_folder
    state = {}
    for k, v in vae.state_dict().items():
        name = _ldm_name(k, n_up=2)
        if ".attn_1." in name and name.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]
        state[f"first_stage_model.{name}"] = v.contiguous()
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in state
    safetensors.torch.save_file(state, tmp_path / "ldm.safetensors")
    x = _images()
    with torch.no_grad():
        ours = load_sd_vae(tmp_path / "ldm.safetensors", folder)
        reference = load_sd_vae(folder)
        assert torch.equal(ours.encode(x)[0], reference.encode(x)[0])
        z = reference.encode(x)[0]
        assert torch.equal(ours.decode(z), reference.decode(z))


def test_vae_refuses_bad_weights_and_names_what_to_download(vae_folder, tmp_path):
    folder, vae = vae_folder
    state = vae.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    bad_values = dict(state)
    bad_values[name] = state[name].clone()
    bad_values[name].view(-1)[0] = float("nan")
    safetensors.torch.save_file(bad_values, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_sd_vae(tmp_path / "nan.safetensors", folder)
    bad_dtype = dict(state)
    bad_dtype[name] = state[name].to(torch.int32)
    safetensors.torch.save_file(bad_dtype, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match="int32"):
        load_sd_vae(tmp_path / "int.safetensors", folder)
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-ema"):
        load_sd_vae(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folder / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_sd_vae(empty)
    with pytest.raises(ValueError, match="config.json too"):
        load_sd_vae(folder / "diffusion_pytorch_model.safetensors")


# -- the pixel UNet2DModel adapter ---------------------------------------------------------------


def _save_pixel_model(folder, prediction_type="epsilon", beta_schedule="linear",
                      scheduler_class="DDPMScheduler", **scheduler):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=4).eval()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    linear = beta_schedule == "linear"
    ddpm = getattr(diffusers, scheduler_class)(
        num_train_timesteps=1000, beta_schedule=beta_schedule,
        beta_start=1e-4 if linear else 8.5e-4, beta_end=0.02 if linear else 0.012,
        clip_sample=False, prediction_type=prediction_type, **scheduler)
    ddpm.save_pretrained(folder / "scheduler")
    return unet, ddpm


@pytest.mark.parametrize("prediction_type,beta_schedule", [
    ("epsilon", "linear"), ("epsilon", "scaled_linear"), ("epsilon", "squaredcos_cap_v2"),
    ("v_prediction", "scaled_linear")])
def test_pixel_score_is_minus_eps_over_sigma(tmp_path, prediction_type, beta_schedule):
    unet, ddpm = _save_pixel_model(tmp_path, prediction_type, beta_schedule)
    model, scheduler_config = load_diffusers_unet(tmp_path)
    sde = model.sde
    torch.testing.assert_close(sde.alphas_cumprod.float(), ddpm.alphas_cumprod, rtol=1e-5,
                               atol=1e-7)
    score_fn = get_score_fn(sde, model)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = torch.tensor([0, 17, 500, 999])
    with torch.no_grad():
        out = unet(x, steps).sample
        # the table in float64 from diffusers' betas (its float32 1 - alpha_bar loses ~1e-3
        # relative precision at step 0 of the cosine schedule)
        alpha_bar = torch.cumprod(1 - ddpm.betas.double(), 0)[steps][:, None, None, None]
        m, s = alpha_bar.sqrt().float(), (1 - alpha_bar).sqrt().float()
        eps = out if prediction_type == "epsilon" else m * out + s * x  # DDIMScheduler.step's
        expected = -eps / s
        score = score_fn(x, sde.index_to_time(steps.double()).float())
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    # a wrong sign or std (alpha instead of sqrt(1 - alpha_bar)) would be far off
    assert float((score - expected).abs().max()) < 1e-3 * float(expected.abs().max())


@pytest.mark.parametrize("spacing,offset,alpha_to_one,prediction_type", [
    ("leading", 0, True, "epsilon"), ("leading", 1, False, "epsilon"),
    ("trailing", 0, False, "v_prediction"), ("leading", 0, False, "epsilon")])
def test_toolkit_ddim_reproduces_diffusers_ddim(tmp_path, spacing, offset, alpha_to_one,
                                                prediction_type):
    """The toolkit's DDIM (eta = 0) on ddim_time_grid of the scheduler's 50 steps gives the
    samples of diffusers' DDIMScheduler from the same x_T within 1e-5."""
    unet, _ = _save_pixel_model(tmp_path, prediction_type, scheduler_class="DDIMScheduler",
                                timestep_spacing=spacing,
                                steps_offset=offset, set_alpha_to_one=alpha_to_one)
    model, config = load_diffusers_unet(tmp_path)
    ddim = diffusers.DDIMScheduler.from_config(config)
    assert (ddim.config.clip_sample, ddim.config.set_alpha_to_one) == (False, alpha_to_one)
    ddim.set_timesteps(50)
    # its alpha_bar table in float64, from its own betas: in float32, 1 - alpha_bar near t = 0
    # (1e-4 at step 0) keeps only ~1e-3 of its relative precision, which moves the last steps
    # by ~4e-4; with the float64 table diffusers' float32 sampling agrees with ours to 1e-5
    ddim.alphas_cumprod = torch.cumprod(1 - ddim.betas.double(), 0)
    ddim.final_alpha_cumprod = ddim.alphas_cumprod.new_tensor(1.0) if alpha_to_one \
        else ddim.alphas_cumprod[0]
    assert scheduler_timesteps(config, 50) == ddim.timesteps.tolist()
    sde_k, options = ddim_time_grid(config, 50, model.sde)
    assert options["nfe"] == (49 if (spacing, offset, alpha_to_one) == ("leading", 0, False)
                              else 50)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    # The untrained network's eps^ drives the samples to |x| ~ 400: in float64 both agree to
    # ~1e-10; in float32 (one case, for time) both round at ~1e-7 of |x| per step
    runs = [(torch.float64, 1e-5)] + ([(torch.float32, None)] if spacing == "trailing" else [])
    for dtype, atol in runs:
        unet.to(dtype), model.to(dtype)
        with torch.no_grad():
            x = x_T.to(dtype)
            for k in ddim.timesteps:
                x = ddim.step(unet(x, k).sample, k, x, eta=0.0).prev_sample
            ours, _ = sample(sde_k, get_score_fn(sde_k, model), x_T.to(dtype), "ddim", **options)
        assert ours.dtype == x.dtype == dtype
        scale = float(x.abs().max())
        torch.testing.assert_close(ours, x, rtol=0, atol=atol or 1e-5 * scale)


def test_scheduler_spacings_match_diffusers_and_unchained_ones_are_refused(tmp_path):
    for spacing in ("leading", "trailing", "linspace"):
        for n in (7, 50, 333):
            config = {"num_train_timesteps": 1000, "timestep_spacing": spacing, "steps_offset": 1}
            ddim = diffusers.DDIMScheduler.from_config(config)
            ddim.set_timesteps(n)
            assert scheduler_timesteps(config, n) == ddim.timesteps.tolist(), (spacing, n)
    _save_pixel_model(tmp_path, scheduler_class="DDIMScheduler", timestep_spacing="linspace")
    model, config = load_diffusers_unet(tmp_path)
    with pytest.raises(ValueError, match="not a chain of times"):
        ddim_time_grid(config, 50, model.sde)


def test_pixel_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="google/ddpm-cifar10-32"):
        load_diffusers_unet(tmp_path / "nowhere")
    _save_pixel_model(tmp_path, beta_schedule="linear")
    (tmp_path / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_diffusers_unet(tmp_path)


def test_sample_mode_on_a_diffusers_pixel_folder(tmp_path):
    """``--mode sample --checkpoint <pipeline folder>`` (``run_sample``, what main.py calls):
    PNG grid and record, on the scheduler's SDE; a config of another SDE or shape is refused
    naming the keys to set."""
    from configs import digits
    from score_sde.training.diffusers_pixel import load_diffusers_pixel
    from score_sde.training.inference import run_sample

    folder = tmp_path / "ddpm-digits"
    torch.manual_seed(0)
    diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4).save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    # digits with the DDPM table that DDPMScheduler's defaults describe (linear 1e-4 .. 0.02)
    config = digits.get_config()
    config.device = "cpu"
    config.training.sde = "discrete_vpsde"
    config.sampling.method, config.sampling.nfe, config.eval.batch_size = "ddim", 4, 4
    out = run_sample(config, tmp_path / "run", checkpoint=str(folder), num_samples=4,
                     progress=False)
    assert out == tmp_path / "run" / "eval" / "samples_ddpm-digits"
    record = json.loads((out / "info.json").read_text())
    assert (out / "sample.png").is_file() and record["nfe"] == 4
    assert record["checkpoint_layout"].startswith("diffusers UNet2DModel")
    config.model.num_scales = 500
    config.data.image_size = 16
    with pytest.raises(ValueError, match=r"image_size=8 .*--config.model.num_scales=1000"):
        load_diffusers_pixel(config, folder)
