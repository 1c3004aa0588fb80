"""A small ResNet with BatchNorm and flip/crop augmentation.

On Fashion-MNIST it is the feature network of the sample-quality metrics (FID,
classifier score); `genimg export-features` turns any trained one into a
feature network for its data set.

  genimg train --config experiments/resnet.py --workdir workdirs/resnet
  genimg train --config experiments/resnet.py:fashion_mnist,full --workdir workdirs/resnet_full
  genimg train --config experiments/resnet.py:mnist --workdir workdirs/resnet_mnist
  genimg train --config experiments/resnet.py:cifar10,full --workdir workdirs/resnet_cifar10

local: width 16, 15 epochs; full: 40 epochs (width 32 on CIFAR-10).
"""

from experiments import cnn


def get_config(arg=""):
  config = cnn.get_config(arg)
  dataset, variant = cnn.common.parse_arg(arg, cnn.common.LABELLED)
  config.model.name = "resnet"
  # YNNPACK's reductions did not speed up its step (372-374 ms without,
  # 378-416 ms with; docs/performance.md): XLA's own, as before.
  config.xla_cpu_ynn_fusions_kept = ""
  config.model.width = 32 if (dataset, variant) == ("cifar10", "full") else 16
  config.model.blocks_per_stage = (2, 2, 2)
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_steps = 500
  config.augment = True
  config.num_epochs = 15 if variant == "local" else 40
  if variant == "full":
    config.eval_every = 4680  # About every 10 epochs.
  return config
