"""A small ResNet with BatchNorm and flip/crop augmentation on Fashion-MNIST.

The feature network of the sample-quality metrics (FID, classifier score).

  genimg train --config experiments/resnet_fashion_mnist.py --workdir workdirs/resnet
"""

from experiments import cnn_fashion_mnist


def get_config():
  config = cnn_fashion_mnist.get_config()
  config.model.name = "resnet"
  config.model.width = 16
  config.model.blocks_per_stage = (2, 2, 2)
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_steps = 500
  config.augment = True
  config.num_epochs = 15
  return config
