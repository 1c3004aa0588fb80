"""DiT: a transformer (Peebles & Xie 2023; genimg_jax/nets/dit.py) in place
of the UNet, in pixel space; otherwise experiments/ddpm.py (eps, linear
schedule, T = 1000, DDIM samples and FID from the EMA parameters).

  genimg train --config experiments/dit.py --workdir workdirs/dit
  genimg train --config experiments/dit.py:cifar10,full --workdir workdirs/dit_cifar10
  genimg sample --workdir workdirs/dit --num 64 --sampler ddim --steps 20 --output dit.png

SiT (the same network trained by flow matching; Ma et al. 2024; with full
also --config.model.learn_sigma=false):
  genimg train --config experiments/dit.py --workdir workdirs/sit \
      --config.diffusion.objective=flow --config.diffusion.sampler=euler
Class-conditional (classifier-free guidance, the null class is the class
table's last row): --config.diffusion.conditional=true.

local: a 0.33M-parameter DiT (hidden 64, depth 4, 4 heads, patches of 4:
7 x 7 tokens on 28 x 28, 8 x 8 on 32 x 32, 16 x 16 on 64 x 64), batch 64,
2,000 steps, Adam 1e-3 (cosine, 200 warm-up steps), gradients clipped at
norm 1, EMA 0.999 with warm-up; DDIM with 10 steps.
full: DiT-B (hidden 768, depth 12, 12 heads; 129.5M parameters) with patches
of 2 (28 x 28, 32 x 32) or 4 (64 x 64), DiT's training: batch 256, Adam
1e-4 constant without warm-up or clipping, EMA 0.9999 from the first step,
random flips on CIFAR-10 and CelebA; 400,000 steps (DiT's ablations); the
variance learned as DiT's (model.learn_sigma: 2C outputs, L_simple + 0.001
L_vlb; docs/diffusion.md).
"""

import ml_collections

from experiments import common, ddpm


def get_config(arg=""):
  dataset, variant = common.parse_arg(arg)
  local = variant == "local"
  config = ddpm.get_config(arg)  # Data, diffusion, sampling, evaluation.
  side = config.data.image_shape[0]

  config.model = ml_collections.ConfigDict()
  config.model.name = "dit"
  config.model.dtype = "float32"
  if local:
    config.model.hidden_size = 64
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.patch_size = 4
  else:  # DiT-B/2 (DiT-B/4 on 64 x 64): nets.dit.dit_config.
    config.model.hidden_size = 768
    config.model.depth = 12
    config.model.num_heads = 12
    config.model.patch_size = 4 if side == 64 else 2
  config.model.mlp_ratio = 4.0
  config.model.remat = "none"  # Or "blocks", "full": see experiments/ddpm.py.
  # DiT's learned variance (eps objective only): 2C outputs, the hybrid loss.
  config.model.learn_sigma = not local

  if not local:  # DiT's optimizer and run length.
    config.optimizer = common.get_optimizer_config("adam", 1e-4, "constant", 0)
    config.optimizer.grad_clip = 0.0
    config.batch_size = 256
    config.num_steps = 400000
  del dataset
  return config
