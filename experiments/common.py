"""What the experiment configs share: data sets, variants, optimizers.

Every experiment file's `get_config(arg)` takes `arg = "DATASET[,VARIANT]"`,
given on the command line after a colon:

  genimg train --config experiments/dcgan.py:cifar10,full --workdir ...

DATASET is one of DATASETS (default fashion_mnist); VARIANT is "local" (the
default: sized for a 2-core CPU machine) or "full" (for a GPU or TPU).
"""

import ml_collections

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
VARIANTS = ("local", "full")

# name -> (TFDS name, offline IDX directory, image shape, classes, centre crop)
DATASETS = {
    "fashion_mnist": ("fashion_mnist", DEBIAN_FASHION_MNIST, (28, 28, 1), 10, 0),
    "mnist": ("mnist", "", (28, 28, 1), 10, 0),
    "cifar10": ("cifar10", "", (32, 32, 3), 10, 0),
    # CelebA's 218 x 178 faces: the central 140 x 140 resized to 64 x 64.
    "celeb_a64": ("celeb_a", "", (64, 64, 3), 0, 140),
}
LABELLED = tuple(name for name, spec in DATASETS.items() if spec[3])
GRAYSCALE = tuple(name for name, spec in DATASETS.items()
                  if spec[2][2] == 1)
# Data sets whose left-right mirror images are images of the same kind
# (objects, faces), flipped at random in the full variants' training
# (data.random_flip); not MNIST-like digits and clothing.
MIRRORABLE = ("cifar10", "celeb_a64")
# The sample-quality feature network shipped for each data set.
FEATURE_NETWORKS = {"fashion_mnist": "fashion_mnist_resnet"}


def set_sample_quality(config, dataset: str) -> None:
  """FID, score, KID and precision/recall at evaluation: the shipped
  feature network where there is one (10,000 samples), else none (0
  samples). Elsewhere: --config.feature_network=inception:FILE (`genimg
  convert-inception`; the Inception Score instead of the score)
  --config.eval_samples=50000, and optionally --config.fid_stats=FILE.npz
  (mu, sigma: `genimg fid-stats` or pytorch-fid's --save-stats) for FID
  against published statistics. eval_reference_split: the real split
  FID, KID and precision/recall compare with, "train", "test" or "eval"
  (data.eval_split); "test" by default (published CIFAR-10 FIDs use
  "train")."""
  config.feature_network = FEATURE_NETWORKS.get(dataset, "")
  config.fid_stats = ""
  config.eval_samples = 10000 if config.feature_network else 0
  config.eval_reference_split = "test"


def parse_arg(arg: str, datasets=tuple(DATASETS)) -> tuple[str, str]:
  """"DATASET[,VARIANT]" -> (dataset, variant), checked against `datasets`."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  dataset = parts[0] if parts else "fashion_mnist"
  variant = parts[1] if len(parts) > 1 else "local"
  if dataset not in datasets or variant not in VARIANTS or len(parts) > 2:
    raise ValueError(
        f"Config argument {arg!r} must be DATASET[,VARIANT] with DATASET in "
        f"{list(datasets)} and VARIANT in {list(VARIANTS)}, e.g. "
        "experiments/dcgan.py:cifar10,full.")
  return dataset, variant


def get_data_config(dataset: str = "fashion_mnist", variant: str = "local"):
  """Where the images come from and how training sees them. idx_dir wins over
  the TFDS name when set."""
  name, idx_dir, image_shape, num_classes, center_crop = DATASETS[dataset]
  data = ml_collections.ConfigDict()
  data.name = name
  data.idx_dir = idx_dir
  data.tfds_data_dir = ""
  data.download = False
  data.in_memory = dataset != "celeb_a64"  # 162,770 faces: read on demand.
  data.eval_split = "test"
  data.image_shape = image_shape
  data.num_classes = num_classes
  data.center_crop = center_crop  # 0: none.
  # Threads that read, decode and resize TFDS data on demand; 0: min(8, CPUs).
  data.num_workers = 0
  # Training images mirrored left-right at random (probability 1/2 each,
  # drawn in the train step) by the diffusion, GAN and VAE families; the
  # classifiers augment through config.augment / augment_flip instead.
  # True in the full variants of MIRRORABLE data sets (as DDPM on CIFAR-10).
  data.random_flip = variant == "full" and dataset in MIRRORABLE
  # Your own images: --config.data.name=folder:PATH (or arrayrecord:PATH from
  # `genimg prepare`) with --config.data.image_shape=H,W,C. Without train/
  # and test/ sub-folders, this fraction of the files is held out as "test".
  data.eval_fraction = 0.05
  # Each image is scaled to cover image_shape with this PIL filter ("area" is
  # PIL's BOX; all antialias when they shrink), then cropped: "center" or
  # "random" (training only; evaluation crops the centre).
  data.resize_filter = "bicubic"
  data.crop = "center"
  # An image that does not decode: an error naming it, or (True) skipped and
  # counted in the log.
  data.skip_corrupt = False
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


def adam(learning_rate=2e-4, b1=0.5, b2=0.999):
  """Adam at a constant learning rate, as GANs use it."""
  return get_optimizer_config("adam", learning_rate, "constant", 0, b1, b2)


def get_run_config(config, family: str, seed: int = 0):
  """Fills the fields every experiment has: family, seed, mesh, logging."""
  config.family = family
  config.seed = seed
  config.mesh = ml_collections.ConfigDict()
  config.mesh.num_devices = 0  # 0: all devices.
  # k > 0: on CPU, k devices where genimg chose the device count (one per
  # core; train.mesh_devices); 0: as num_devices.
  config.mesh.cpu_devices = 0
  # k > 1: the train state (parameters, EMA, optimizer state) split over k
  # devices of a ("data", "fsdp") mesh, FSDP style; see genimg_jax/parallel.py.
  config.mesh.fsdp = 1
  config.log_every = 100
  config.keep_checkpoints = 3
  # JAX's persistent compilation cache: "" = $JAX_COMPILATION_CACHE_DIR or
  # WORKDIR/compilation_cache; "off"; or a directory.
  config.compilation_cache_dir = ""
  # On CPU: XLA:CPU's YNNPACK convolution, dot and reduction fusions
  # (jaxlib 0.10's default) or, False, XLA's own emitters, per compiled program
  # (`parallel.compiler_options`); ignored on GPU and TPU. Which is faster
  # depends on the model and the processor: `genimg bench --model M
  # --config.xla_cpu_ynn_fusions=false` tells (README, docs/performance.md);
  # every experiment config sets False.
  config.xla_cpu_ynn_fusions = True
  # With it False, the YNNPACK fusion types still made (comma-separated:
  # reduce, eltwise, dot, individual_dot, individual_convolution; "": none).
  config.xla_cpu_ynn_fusions_kept = ""
  return config
