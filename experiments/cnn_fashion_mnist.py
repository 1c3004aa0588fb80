"""The seed CNN on Fashion-MNIST (offline: Debian's dataset-fashion-mnist).

  genimg train --config experiments/cnn_fashion_mnist.py --workdir workdirs/cnn

Through TFDS instead of the IDX files (a machine with internet or a prepared
TFDS data_dir): add --config.data.idx_dir='' --config.data.download=True.
"""

import ml_collections


def get_data_config(name: str = "fashion_mnist",
                    idx_dir: str = "/usr/share/datasets/fashion-mnist",
                    image_shape=(28, 28, 1), num_classes: int = 10):
  """Where the images come from. idx_dir wins over the TFDS name when set."""
  data = ml_collections.ConfigDict()
  data.name = name
  data.idx_dir = idx_dir
  data.tfds_data_dir = ""
  data.download = False
  data.in_memory = True
  data.eval_split = "test"
  data.image_shape = image_shape
  data.num_classes = num_classes
  return data


def get_optimizer_config(name: str = "adam", learning_rate: float = 1e-3,
                         schedule: str = "cosine", warmup_steps: int = 200,
                         b1: float = 0.9, b2: float = 0.999,
                         momentum: float = 0.0, weight_decay: float = 0.0):
  """An optimizer (see genimg_jax/optim.py): adam(w) or sgd with Nesterov."""
  opt = ml_collections.ConfigDict()
  opt.name = name
  opt.learning_rate = learning_rate
  opt.schedule = schedule
  opt.warmup_steps = warmup_steps
  opt.b1 = b1
  opt.b2 = b2
  opt.momentum = momentum
  opt.weight_decay = weight_decay
  return opt


def get_config():
  config = ml_collections.ConfigDict()
  config.family = "classifier"
  config.seed = 0
  config.data = get_data_config()

  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn"
  config.model.dtype = "float32"
  config.model.width = 0  # Unused by the CNN; the ResNet's base width.
  config.model.blocks_per_stage = (0,)

  config.optimizer = get_optimizer_config(momentum=0.9)  # Momentum: sgd only.
  config.augment = False

  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 15
  config.num_steps = 0  # If > 0, overrides num_epochs.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.num_devices = 0  # 0: all devices.

  config.log_every = 100
  config.eval_every = 0  # 0: only at the end.
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  return config
