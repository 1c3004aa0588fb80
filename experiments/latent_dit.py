"""Latent DiT: a DiT (genimg_jax/nets/dit.py) trained on the latents of a KL
autoencoder, as Peebles & Xie 2023 on Stable Diffusion's VAE; samples are
decoded to images for grids, FID and `genimg sample` (docs/latent.md).

local (Fashion-MNIST, CPU): the small autoencoder of
experiments/autoencoder_kl.py (28 x 28 x 1 -> 7 x 7 x 4), then
  genimg train --config experiments/autoencoder_kl.py --workdir workdirs/autoencoder_kl
  genimg export-autoencoder --workdir workdirs/autoencoder_kl --output workdirs/autoencoder_kl.msgpack
  genimg encode-latents --config experiments/latent_dit.py \
      --autoencoder workdirs/autoencoder_kl.msgpack --output workdirs/latents_fashion_mnist
  genimg train --config experiments/latent_dit.py --workdir workdirs/latent_dit
  genimg sample --workdir workdirs/latent_dit --num 64 --output latent_dit.png
SiT (flow matching on the same latents; with full also
--config.model.learn_sigma=false):
  genimg train --config experiments/latent_dit.py --workdir workdirs/latent_sit \
      --config.diffusion.objective=flow --config.diffusion.sampler=euler

local: DiT with hidden 64, depth 4, 4 heads, patches of 1 (0.33M
parameters, 49 tokens on
7 x 7 latents), class-conditional (labels dropped with probability 0.1),
batch 64, 2,000 steps, Adam 1e-3 (cosine, 200 warm-up steps), gradients
clipped at norm 1, EMA 0.999 with warm-up; DDIM with 10 steps. On other
data sets (DATASET: autoencoder_kl.py:DATASET) the autoencoder is
workdirs/autoencoder_kl_DATASET.msgpack and the latents
workdirs/latents_DATASET.
full: the DiT paper's set-up: the SD VAE converted by `genimg
convert-autoencoder` (config.diffusion.autoencoder = sd_vae.msgpack; 8x
down, 256 x 256 x 3 images -> 32 x 32 x 4 latents), DiT-XL/2 (hidden
1152, depth 28, 16 heads, patches of 2; 674.8M parameters), batch 256, Adam
1e-4 constant, no weight decay, warm-up or clipping, EMA 0.9999 from the
first step, class dropout 0.1, random flips (with data.random_flip;
encode-latents then stores the mirrored images' moments too), eps
prediction with DDPM's linear schedule (T = 1000) and the learned variance
(model.learn_sigma: L_simple + 0.001 L_vlb, the t = 0 term on the latents
as DiT computes it; docs/latent.md), DDIM with 50 steps; 400,000 steps
(DiT's ablations). For ImageNet 256 x 256:
  genimg convert-autoencoder --input sd-vae-ft-ema --output sd_vae.msgpack
  genimg encode-latents --config experiments/latent_dit.py:fashion_mnist,full \
      --config.data.name=folder:/data/imagenet --config.data.image_shape='(256, 256, 3)' \
      --config.data.num_classes=1000 --config.data.random_flip=true \
      --autoencoder sd_vae.msgpack --output workdirs/latents_imagenet
  genimg train --config experiments/latent_dit.py:fashion_mnist,full ... (the same data
      overrides) --config.diffusion.latents=workdirs/latents_imagenet
Both: latents are not clipped (clip_denoised false); the FID compares the
decoded samples with the split's real images.
"""

import ml_collections

from experiments import common, dit


def get_config(arg=""):
  dataset, variant = common.parse_arg(arg)
  local = variant == "local"
  config = dit.get_config(arg)
  m, d = config.model, config.diffusion
  if local:
    m.patch_size = 1  # 7 x 7 latents on 28 x 28 images.
    d.autoencoder = ("workdirs/autoencoder_kl.msgpack"
                     if dataset == "fashion_mnist"
                     else f"workdirs/autoencoder_kl_{dataset}.msgpack")
    d.latents = f"workdirs/latents_{dataset}"
  else:  # DiT-XL/2 (nets.dit.dit_config) on the SD VAE's latents.
    m.hidden_size = 1152
    m.depth = 28
    m.num_heads = 16
    m.patch_size = 2
    m.learn_sigma = True  # DiT's learned variance (as dit.py's full).
    d.autoencoder = "sd_vae.msgpack"
    d.latents = f"workdirs/latents_sd_vae_{dataset}"
    d.ema_decay = 0.9999
    d.ema_warmup = False
    d.sample_steps = 50
    config.optimizer = common.get_optimizer_config("adam", 1e-4, "constant",
                                                   0)
    config.optimizer.grad_clip = 0.0
    config.batch_size = 256
    config.num_steps = 400000
  d.conditional = config.data.num_classes > 0
  d.label_dropout = 0.1
  d.clip_denoised = False  # Latents are not in [-1, 1].
  return config
