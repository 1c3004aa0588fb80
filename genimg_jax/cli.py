r"""The `genimg` command: train, eval (and bench) from experiment configs.

  genimg configs                       # the packaged configs
  genimg train --config experiments/cnn.py --workdir DIR \
      [--config.batch_size=256 ...] [--print-config]
  genimg eval --workdir DIR [--checkpoint latest|best|STEP] \
      [--config.eval_samples=2000 ...]
  genimg sample --workdir DIR --num 64 --output FILE.png|FILE.npz \
      [--checkpoint best --sampler ddim --steps 50 --eta 0 --guidance 1 \
      --seed 0]
  genimg export-features --workdir DIR --output FILE
  genimg export-autoencoder --workdir DIR --output FILE
  genimg encode-latents --config C --autoencoder FILE --output DIR
  genimg convert-inception --pth pt_inception-2015-12-05-6726825d.pth \
      --output inception.msgpack [--any-weights]
  genimg convert-autoencoder --input sd-vae-ft-mse/ --output sd_vae.msgpack
  genimg fid-stats --config experiments/dcgan.py:cifar10 --output s.npz \
      [--config.feature_network=inception:inception.msgpack]
  genimg prepare --input FOLDER --output DIR \
      [--eval-fraction 0.05 --shards 0 --workers 0]   # ArrayRecord shards
  genimg export-images --config dcgan --output FOLDER [--limit N]
  genimg compile --config experiments/ddpm.py [--topology v5e:4x4]
  genimg bench --model cnn --batch 32,128,512 [--devices 1,2,4,8] \
      [--config.xla_cpu_ynn_fusions=false]
  genimg bench --model dit_xl2_latent,ddpm:cifar10,full --batch 0 \
      --dtype bfloat16,float32 --remat none,blocks   # the configs' batches
  genimg bench --sweep --model all [--dtype float32,bfloat16 --batch 128 \
      --max-batch 8192 --time-budget 420 --matmul-precision highest]

`--config.KEY=VALUE` (or `--config.KEY VALUE`) overrides a config field,
typed by the value it replaces (e.g. --config.batch_size=256); train, eval,
sample, compile, fid-stats, export-images, encode-latents and bench take
them (eval and sample: over the workdir's config.json). Every config value
is checked before anything compiles or is written: each bad one is named on
a line of its own (`genimg train --help` lists the fields
whose values have a special meaning, such as 0 = off).

Exit codes: 0 done (or stopped by SIGTERM / Ctrl-C after saving a
checkpoint: run the same command to resume); 2 bad input (a config value,
path, data set or checkpoint) or a refused resume; 1 a failure during the run
(the loss diverged, an unexpected error: a traceback follows); 143 or 130 a
second SIGTERM or Ctrl-C ended the run without a final checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys


def _split_overrides(argv):
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the rest."""
  rest, overrides = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:
        body += "=" + next(it, "")
      overrides.append(body)
    else:
      rest.append(arg)
  return rest, overrides


# The subcommands that take `--config.KEY=VALUE` overrides, with an example.
OVERRIDE_EXAMPLES = {
    "train": "--config.batch_size=256 --config.num_steps=300",
    "eval": "--config.eval_samples=2000",
    "sample": "--config.model.dtype=bfloat16",
    "compile": "--config.batch_size=1024",
    "fid-stats": "--config.feature_network=inception:inception.msgpack",
    "export-images": "--config.data.idx_dir=/path/to/mnist",
    "encode-latents": "--config.eval_batch_size=64",
    "bench": "--config.xla_cpu_ynn_fusions=false",
}


def _overrides_help(command: str) -> str:
  """The --help epilog on `--config.KEY=VALUE` of a subcommand."""
  where = ("the workdir's config.json" if command in ("eval", "sample")
           else "the config")
  text = (f"config overrides: --config.KEY=VALUE (or --config.KEY VALUE) sets "
          f"a field of {where},\ntyped by the value it replaces, e.g.\n"
          f"  genimg {command} ... {OVERRIDE_EXAMPLES[command]}\n"
          "`genimg train --config NAME --print-config` lists the fields.")
  if command == "bench":
    text += "\nNot with --sweep, which times the configs as they are."
  return text


def _special_values() -> str:
  """The config fields whose rules note a special value, for --help."""
  from genimg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  lines = [f"  {key:<30} {rule.allowed()}"
           for key, rule in config_lib.FIELD_RULES.items() if rule.note]
  return "config fields with special values:\n" + "\n".join(lines)


def _version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    version = metadata.version("genimg-jax")
  except metadata.PackageNotFoundError:
    version = "(not installed)"
  versions = []
  for package in ("jax", "flax", "optax", "orbax-checkpoint", "grain"):
    try:
      versions.append(f"{package} {metadata.version(package)}")
    except metadata.PackageNotFoundError:
      pass
  return f"genimg-jax {version} ({', '.join(versions)})"


def _list_configs() -> str:
  """One line per packaged config: name, data sets, variants, description."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from genimg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  directory = config_lib.packaged_experiments_dir()
  lines = []
  for name in sorted(os.listdir(directory)):
    if not name.endswith(".py") or name in ("__init__.py", "common.py"):
      continue
    path = os.path.join(directory, name)
    config_lib._make_experiments_importable(directory)  # pylint: disable=protected-access
    spec = importlib.util.spec_from_file_location(f"genimg_list_{name[:-3]}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      continue
    doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    lines.append(f"{name[:-3]:<14} {doc}")
  from experiments import common  # pylint: disable=g-import-not-at-top
  lines.append("")
  lines.append(f"data sets (--config NAME:DATASET[,VARIANT]): "
               f"{', '.join(common.DATASETS)}; variants: "
               f"{', '.join(common.VARIANTS)} (default local); your own "
               "images: --config.data.name=folder:PATH (docs/data.md)")
  return "\n".join(lines)


def _parser():
  parser = argparse.ArgumentParser(prog="genimg", description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--version", action="version", version=_version())
  sub = parser.add_subparsers(dest="command", required=True)
  raw = argparse.RawDescriptionHelpFormatter  # Epilogs as written.
  takes_config = lambda name, **kw: sub.add_parser(
      name, epilog=_overrides_help(name), formatter_class=raw, **kw)
  sub.add_parser("configs", help="list the packaged configs: name, data "
                                 "sets, variants and what each trains")
  train = sub.add_parser("train", help="train (or resume) a run in a workdir",
                         epilog=_overrides_help("train") + "\n\n" +
                         _special_values(), formatter_class=raw)
  train.add_argument("--config", required=True,
                     help="an experiments/*.py file with get_config() or a "
                          "config name, optionally :DATASET[,VARIANT]")
  train.add_argument("--workdir", default=None,
                     help="checkpoints, logs and samples go here (required "
                          "unless --print-config)")
  train.add_argument("--print-config", action="store_true",
                     help="print the config after the overrides, then exit")
  evaluate = takes_config("eval", help="evaluate a checkpoint of a "
                                        "workdir (prints its metrics)")
  evaluate.add_argument("--workdir", required=True,
                        help="the workdir of a `genimg train` run")
  evaluate.add_argument("--checkpoint", default="latest",
                        help="latest, best (lowest FID so far) or a step")
  sample = takes_config(
      "sample", help="write samples of a checkpoint (--checkpoint; GAN, VAE, "
                     "diffusion) as a PNG grid or an .npz of uint8 images")
  sample.add_argument("--workdir", required=True,
                      help="the workdir of a `genimg train` run")
  sample.add_argument("--num", type=int, default=64,
                      help="number of images (default 64)")
  sample.add_argument("--output", required=True,
                      help="FILE.png: a grid (<= 1,024 images); FILE.npz: "
                           "uint8 NHWC arr_0 (and labels if conditional)")
  sample.add_argument("--seed", type=int, default=0,
                      help="random seed of the samples (default 0)")
  sample.add_argument("--checkpoint", default="latest",
                      help="latest, best (lowest FID so far) or a step")
  sample.add_argument("--sampler", default=None,
                      help="diffusion: ddpm or ddim; flow: euler or heun "
                           "(default: the run's)")
  sample.add_argument("--steps", type=int, default=None,
                      help="ddim, euler, heun: sampler steps (default: the "
                           "run's; ddpm always takes all T)")
  sample.add_argument("--eta", type=float, default=None,
                      help="ddim's noise (0: deterministic)")
  sample.add_argument("--guidance", type=float, default=None,
                      help="classifier-free guidance scale s (conditional "
                           "diffusion): out_u + s (out_c - out_u); s = 1 + w "
                           "for Ho & Salimans' weight w; 1: none (the "
                           "conditional model), 0: unconditional")
  export = sub.add_parser(
      "export-features",
      help="write a trained ResNet classifier as an FID feature network")
  export.add_argument("--workdir", required=True,
                      help="the workdir of a ResNet classifier run")
  export.add_argument("--output", required=True,
                      help="FILE (msgpack); FILE.json gets shapes and SHA-256;"
                           " use with --config.feature_network=FILE")
  export_ae = sub.add_parser(
      "export-autoencoder",
      help="write a trained KL autoencoder (experiments/autoencoder_kl.py) "
           "for genimg_jax.autoencoder.load and --config.diffusion."
           "autoencoder, with its scaling factor")
  export_ae.add_argument("--workdir", required=True,
                         help="the workdir of an autoencoder_kl run")
  export_ae.add_argument("--output", required=True,
                         help="FILE (msgpack); FILE.json gets the config "
                              "(scaling_factor too) and the SHA-256")
  encode = takes_config(
      "encode-latents",
      help="encode a config's train and eval splits with a KL autoencoder "
           "for --config.diffusion.latents=OUTPUT")
  encode.add_argument("--config", required=True,
                      help="an experiments/*.py file or a config name (its "
                           "data, eval_batch_size, mesh)")
  encode.add_argument("--autoencoder", required=True,
                      help="FILE from export-autoencoder or "
                           "convert-autoencoder")
  encode.add_argument("--output", required=True,
                      help="DIR: train.npz, SPLIT.npz (mean, logvar, label) "
                           "and latents.json")
  convert = sub.add_parser(
      "convert-inception",
      help="convert pytorch-fid's Inception weights (.pth, needs torch) for "
           "--config.feature_network=inception:OUTPUT")
  convert.add_argument("--pth", required=True,
                       help="pt_inception-2015-12-05-6726825d.pth")
  convert.add_argument("--output", required=True,
                       help="FILE (msgpack); FILE.json gets the SHA-256s")
  convert.add_argument("--any-weights", action="store_true",
                       help="convert a .pth that is not pytorch-fid's file")
  convert_ae = sub.add_parser(
      "convert-autoencoder",
      help="convert a diffusers AutoencoderKL (the Stable Diffusion VAE) for "
           "genimg_jax.autoencoder.load")
  convert_ae.add_argument("--input", required=True,
                          help="a diffusers directory (config.json + "
                               "diffusion_pytorch_model.safetensors or .bin)"
                               " or a single .safetensors file")
  convert_ae.add_argument("--output", required=True,
                          help="FILE (msgpack); FILE.json gets the config "
                               "and the SHA-256s")
  stats = takes_config(
      "fid-stats", help="write the reference split's "
                        "(config.eval_reference_split) feature mean and "
                        "covariance (pytorch-fid's .npz: mu, sigma)")
  stats.add_argument("--config", required=True,
                     help="an experiments/*.py file or a config name")
  stats.add_argument("--output", required=True, help="FILE.npz")
  prepare = sub.add_parser(
      "prepare", help="write an image folder as ArrayRecord shards for "
                      "--config.data.name=arrayrecord:OUTPUT")
  prepare.add_argument("--input", required=True,
                       help="an image folder (local or gs://), laid out as "
                            "for folder:PATH")
  prepare.add_argument("--output", required=True,
                       help="a directory (local or gs://): SPLIT-K-of-N"
                            ".array_record shards and classes.json")
  prepare.add_argument("--eval-fraction", type=float, default=0.05,
                       help="held out as the test split when the folder has "
                            "no train/ and test/ (as data.eval_fraction)")
  prepare.add_argument("--shards", type=int, default=0,
                       help="shards per split (0: one per 256 MiB)")
  prepare.add_argument("--workers", type=int, default=0,
                       help="threads writing shards (0: min(8, CPUs))")
  export_images = takes_config(
      "export-images", help="write a config's data set as an image folder "
                            "(OUTPUT/train|test/CLASS/N.png)")
  export_images.add_argument("--config", required=True,
                             help="an experiments/*.py file or a config name")
  export_images.add_argument("--output", required=True,
                             help="a folder: OUTPUT/train|test/CLASS/N.png")
  export_images.add_argument("--limit", type=int, default=0,
                             help="at most this many images a split (0: all)")
  aot = takes_config(
      "compile", help="compile the train step ahead of time (for a TPU "
                      "topology: needs libtpu, no TPU) and print per-device "
                      "memory and FLOPs")
  aot.add_argument("--config", required=True,
                   help="an experiments/*.py file or a config name")
  aot.add_argument("--topology", default="",
                   help="e.g. v5e:4x4, v4:2x2x2 (default: this machine's "
                        "devices)")
  bench = takes_config("bench", help="time compiled train steps")
  bench.add_argument("--model", default="cnn",
                     help="comma-separated model names, or all; a name "
                          "may end in :ARG, the config's argument (e.g. "
                          "ddpm:cifar10,full); dit_xl2_latent and "
                          "dit_b2_latent: DiT on 32x32x4 latents, 1,000 "
                          "classes (synthetic latents, no autoencoder)")
  bench.add_argument("--batch", default="128",
                     help="comma-separated global sizes, 0: the config's "
                          "batch_size (--sweep: the first)")
  bench.add_argument("--steps", type=int, default=None,
                     help="timed steps (default 20; --sweep: 10)")
  bench.add_argument("--dtype", default=None,
                     help="comma-separated: float32, bfloat16 (default "
                          "float32; --sweep: float32,bfloat16)")
  bench.add_argument("--remat", default="",
                     help="comma-separated model.remat values (none, "
                          "blocks, full) for the models that have it "
                          "(diffusion); default: the config's")
  bench.add_argument("--topology", default="",
                     help="e.g. v5e:2x2: compile each row for this TPU "
                          "topology instead of timing it, and print XLA's "
                          "memory per chip (needs libtpu, no TPU)")
  bench.add_argument("--time-budget", type=float, default=None,
                     help="seconds: rows not started by then are skipped "
                          "(--sweep: for the whole sweep, default 420)")
  bench.add_argument("--devices", default="0",
                     help="comma-separated device counts (0: all), e.g. "
                          "1,2,4,8 for data-parallel scaling")
  bench.add_argument("--input", default="synthetic",
                     choices=["synthetic", "real"],
                     help="real: include the input pipeline")
  bench.add_argument("--output", default="",
                     help="FILE: also append the records here as JSON lines")
  bench.add_argument("--profile", default="",
                     help="DIR: trace the timed steps with jax.profiler "
                          "(Perfetto/TensorBoard) and print the top XLA ops")
  bench.add_argument("--sweep", action="store_true",
                     help="on 1 device, grow each model's batch from --batch"
                          " for each --dtype: doubling, or on devices that "
                          "report their memory a jump to the largest power-"
                          "of-two multiple predicted to fit, then bisecting "
                          "back (in powers of two) after an out-of-memory "
                          "jump; stops at out of memory, --max-batch or "
                          "--time-budget")
  bench.add_argument("--max-batch", type=int, default=8192,
                     help="--sweep: the largest batch tried")
  bench.add_argument("--matmul-precision", default="",
                     help="sets jax_default_matmul_precision, e.g. highest: "
                          "true float32 matmuls on GPUs (default: TF32 on "
                          "Ampere and newer)")
  return parser


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  if overrides and (args.command not in OVERRIDE_EXAMPLES or
                    (args.command == "bench" and args.sweep)):
    takes = ("bench --sweep times the configs as they are"
             if args.command == "bench" else
             f"{args.command} reads no config")
    print(f"genimg {args.command}: error: --config.{overrides[0]}: {takes}; "
          f"overrides go to {', '.join(OVERRIDE_EXAMPLES)} (bench without "
          "--sweep).", file=sys.stderr)
    return 2
  # Imported late so that `genimg --help` is fast and XLA flags can be set.
  from genimg_jax import checkpoint, config as config_lib, data, distributed
  from genimg_jax import train
  known_errors = (config_lib.ConfigError, data.DataError,
                  checkpoint.CheckpointError, ValueError,
                  FileNotFoundError, ImportError)
  try:
    distributed.use_cpu_cores()
    distributed.maybe_initialize()
    if args.command == "configs":
      print(_list_configs())
      return 0
    if args.command == "train":
      config = config_lib.apply_overrides(
          config_lib.load_config_file(args.config), overrides)
      if args.print_config:
        print(config)
        return 0
      if not args.workdir:
        raise config_lib.ConfigError("genimg train needs --workdir DIR.")
      _, metrics = train.train_and_evaluate(config, args.workdir)
    elif args.command == "eval":
      metrics = train.evaluate_workdir(args.workdir, overrides,
                                       args.checkpoint)
    elif args.command == "sample":
      metrics = train.sample_workdir(
          args.workdir, args.num, args.output, args.seed, overrides,
          args.checkpoint, sampler=args.sampler, steps=args.steps, eta=args.eta,
          guidance_scale=args.guidance)
    elif args.command == "compile":
      from genimg_jax import aot  # pylint: disable=g-import-not-at-top
      config = config_lib.apply_overrides(
          config_lib.load_config_file(args.config), overrides)
      metrics = aot.run(config, args.topology or None)
    elif args.command == "convert-inception":
      from genimg_jax import inception  # pylint: disable=g-import-not-at-top
      metrics = inception.convert_pth(args.pth, args.output,
                                      check_hash=not args.any_weights)
    elif args.command == "convert-autoencoder":
      from genimg_jax import autoencoder  # pylint: disable=g-import-not-at-top
      metrics = autoencoder.convert_diffusers(args.input, args.output)
    elif args.command == "fid-stats":
      from genimg_jax import parallel, quality  # pylint: disable=g-import-not-at-top
      config = config_lib.apply_overrides(
          config_lib.load_config_file(args.config), overrides)
      metrics = quality.write_fid_stats(
          config, parallel.make_mesh(config.mesh.num_devices), args.output)
    elif args.command == "prepare":
      from genimg_jax import image_files  # pylint: disable=g-import-not-at-top
      metrics = image_files.prepare(args.input, args.output,
                                    args.eval_fraction, args.shards,
                                    args.workers)
    elif args.command == "export-images":
      from genimg_jax import image_files  # pylint: disable=g-import-not-at-top
      config = config_lib.apply_overrides(
          config_lib.load_config_file(args.config), overrides)
      metrics = image_files.export_images(config.data, args.output,
                                          args.limit)
    elif args.command == "export-features":
      metrics = train.export_feature_network(args.workdir, args.output)
    elif args.command == "encode-latents":
      from genimg_jax import latents  # pylint: disable=g-import-not-at-top
      config = config_lib.apply_overrides(
          config_lib.load_config_file(args.config), overrides)
      metrics = latents.encode_latents(config, args.autoencoder, args.output)
    elif args.command == "export-autoencoder":
      metrics = train.export_autoencoder(args.workdir, args.output)
    else:
      from genimg_jax import bench  # pylint: disable=g-import-not-at-top
      import jax  # pylint: disable=g-import-not-at-top
      ints = lambda text: [int(x) for x in text.split(",")]
      if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision",
                          args.matmul_precision)
      dtypes = bench.parse_dtypes(
          args.dtype or ("float32,bfloat16" if args.sweep else "float32"))
      if args.sweep:
        if args.remat or args.topology:
          raise ValueError("--remat and --topology are for runs without "
                           "--sweep (the sweep takes "
                           "--config.model.remat=VALUE)")
        records = bench.sweep(
            bench.split_models(args.model), dtypes,
            ints(args.batch)[0], args.max_batch,
            420 if args.time_budget is None else args.time_budget,
            args.steps or 10, output=args.output or None,
            overrides=overrides)
        failed = [f"{r['model']} {r['dtype']}" for r in records
                  if "error" in r]
      else:
        records = bench.run(
            bench.split_models(args.model), ints(args.batch),
            ints(args.devices), args.steps or 20, dtypes, args.input,
            args.output or None, args.profile or None, overrides,
            remats=args.remat.split(",") if args.remat else [""],
            time_budget_s=args.time_budget, topology=args.topology or None)
        failed = [f"{r['model']} {r['dtype']} {r['remat'] or ''}".strip()
                  for r in records if "error" in r]
      if failed:  # Their tracebacks are above; the table has the rest.
        print(f"genimg bench: error: failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
      metrics = None
  except FloatingPointError as e:  # A diverged run: a failure, not input.
    print(f"genimg {args.command}: error: {e}", file=sys.stderr)
    return 1
  except known_errors as e:
    print(f"genimg {args.command}: error: {e}", file=sys.stderr)
    return 2
  if metrics:
    print(json.dumps(metrics))
  return 0


if __name__ == "__main__":
  sys.exit(main())
