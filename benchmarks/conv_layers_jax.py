"""Forward + backward time of each of the DCGAN's convolutions in genimg-jax.

  python benchmarks/conv_layers_jax.py

genimg-jax's CPU layers (nets/layers.py) with the DCGAN's shapes at batch 128,
1 CPU device, YNNPACK reductions kept (as experiments/dcgan.py); per layer the
median ms of the gradient of sum(y^2) w.r.t. the input and the parameters.
conv_layers_keras.py times the same layers in Keras.
"""
import json
import os
import statistics
import time

from genimg_jax import distributed

os.environ["GENIMG_CPU_DEVICES"] = "1"
distributed.use_cpu_cores()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from genimg_jax.nets import layers
LAYERS = {
  "G ConvT 256->128 4x4 s1 (7x7)": ((7, 7, 256), layers.ConvTranspose1x(128, 4, use_bias=False)),
  "G ConvT 128->64 4x4 s2 (7->14)": ((7, 7, 128), layers.ConvTranspose2x(64, 4, use_bias=False)),
  "G ConvT 64->1 4x4 s2 (14->28)": ((14, 14, 64), layers.ConvTranspose2x(1, 4, use_bias=False)),
  "D Conv 1->64 4x4 s2 (28->14)": ((28, 28, 1), layers.ConvStride2(64, 4)),
  "D Conv 64->128 4x4 s2 (14->7)": ((14, 14, 64), layers.ConvStride2(128, 4)),
}
opts = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
out = {}
for name, (shape, layer) in LAYERS.items():
  x = jax.random.normal(jax.random.key(0), (128, *shape))
  params = layer.init(jax.random.key(1), x)
  def loss(p, x): y = layer.apply(p, x); return jnp.sum(y * y)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=opts)
  for _ in range(5): jax.block_until_ready(step(params, x))
  ts = []
  for _ in range(30):
    t = time.perf_counter(); jax.block_until_ready(step(params, x)); ts.append(1e3 * (time.perf_counter() - t))
  out[name] = round(statistics.median(ts), 2)
print(json.dumps({"framework": "genimg-jax", "jax": jax.__version__, "ms": out}))
