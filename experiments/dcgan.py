"""DCGAN: non-saturating loss, Adam(2e-4, 0.5), EMA generator.

The README's main job is the default, fashion_mnist,local: 3,000 steps of
batch 64, 7 min 12 s of training with its three evaluations on 2 idle Intel
Xeon cores (docs/results.md); prints its FID and score and writes sample
grids.

  genimg train --config experiments/dcgan.py --workdir workdirs/dcgan
  genimg train --config experiments/dcgan.py:fashion_mnist,full --workdir workdirs/dcgan_full
  genimg train --config experiments/dcgan.py:mnist --workdir workdirs/dcgan_mnist
  genimg train --config experiments/dcgan.py:cifar10,full --workdir workdirs/dcgan_cifar10
  genimg train --config experiments/dcgan.py:celeb_a64,full --workdir workdirs/dcgan_celeba

local: 3,000 steps of 64 (1,000 at 64 x 64); full: 30,000 steps of 128, real
images flipped left-right at random on CIFAR-10 and CelebA.
FID and score need a feature network for the data set: Fashion-MNIST's ships
with the package; for others train experiments/resnet.py on it, run
`genimg export-features`, and pass --config.feature_network=FILE
--config.eval_samples=10000.
"""

import ml_collections

from experiments import common

adam = common.adam


def get_config(arg=""):
  dataset, variant = common.parse_arg(arg)
  config = common.get_run_config(ml_collections.ConfigDict(), "gan")
  # XLA's own CPU convolutions, not YNNPACK fusions: D + G step 1.08-1.25x
  # faster on CPU (docs/performance.md), with YNNPACK's reductions. One CPU
  # device with every core where genimg picks the device count: the step
  # (BatchNorm statistics over the global batch) ran 1.12-1.17x faster than
  # split over one device per core. No effect on GPU or TPU.
  config.xla_cpu_ynn_fusions = False
  config.xla_cpu_ynn_fusions_kept = "reduce"
  config.mesh.cpu_devices = 1
  config.data = common.get_data_config(dataset, variant)

  config.model = ml_collections.ConfigDict()
  config.model.dtype = "float32"
  config.model.dropout_rate = 0.3
  config.model.spectral_norm = False

  config.gan = ml_collections.ConfigDict()
  config.gan.loss = "non_saturating"
  config.gan.n_critic = 1
  config.gan.gp_weight = 10.0
  config.gan.ema_decay = 0.999
  # The warm-up min(decay, (1 + t) / (10 + t)) (optim.ema_decay_at) in both
  # variants: the generator moves fastest early, and without it the EMA at
  # the local runs' first evaluation (step 1,000) would still hold
  # 0.999^1000 = 37% of the random initial weights.
  config.gan.ema_warmup = True
  config.gan.z_dim = 100
  config.gan.conditional = False
  config.gan.skip_nonfinite = False

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.generator = adam()
  config.optimizer.discriminator = adam()

  common.set_sample_quality(config, dataset)
  config.eval_batch_size = 512
  config.num_epochs = 0
  if variant == "local":
    config.batch_size = 64
    config.num_steps = 1000 if dataset == "celeb_a64" else 3000
    config.eval_every = config.num_steps // 3
    config.checkpoint_every = 500
  else:
    config.batch_size = 128
    config.num_steps = 30000
    config.eval_every = 5000
    config.checkpoint_every = 2000
  return config
