"""The seed CNN classifier (688,138 parameters on 28 x 28 x 1).

  genimg train --config experiments/cnn.py --workdir workdirs/cnn
  genimg train --config experiments/cnn.py:mnist --workdir workdirs/cnn_mnist
  genimg train --config experiments/cnn.py:cifar10 --workdir workdirs/cnn_cifar10
  genimg train --config experiments/cnn.py:cifar10,full --workdir workdirs/cnn_cifar10

The default (fashion_mnist,local) reads Debian's dataset-fashion-mnist; the
other data sets come through TFDS (add --config.data.download=True on a
machine with internet). local: 15 epochs; full: 30 epochs.
"""

import ml_collections

from experiments import common


def get_config(arg=""):
  dataset, variant = common.parse_arg(arg, common.LABELLED)
  config = common.get_run_config(ml_collections.ConfigDict(), "classifier")
  # XLA's own CPU convolutions, not YNNPACK fusions: faster steps on
  # CPU (seed CNN 1.3x, ResNet 1.1-1.3x; docs/performance.md), with
  # YNNPACK's reductions (the bias gradients; seed CNN another 1.16-1.42x).
  # No effect on GPU or TPU.
  config.xla_cpu_ynn_fusions = False
  config.xla_cpu_ynn_fusions_kept = "reduce"
  # data.random_flip stays False: classifiers flip through augment_flip.
  config.data = common.get_data_config(dataset)

  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn"
  config.model.dtype = "float32"
  config.model.width = 0  # Unused by the CNN; the ResNet's base width.
  config.model.blocks_per_stage = (0,)

  config.optimizer = common.get_optimizer_config(momentum=0.9)  # sgd only.
  config.augment = False  # Random crops (the ResNet's), and flips:
  config.augment_flip = dataset != "mnist"  # mirrored digits are not digits.

  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 15 if variant == "local" else 30
  config.num_steps = 0  # If > 0, overrides num_epochs.
  config.eval_every = 0  # 0: only at the end.
  config.checkpoint_every = 1000
  return config
