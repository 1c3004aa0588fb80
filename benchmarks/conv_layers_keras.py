"""Forward + backward time of each of the DCGAN's convolutions in Keras.

  python benchmarks/conv_layers_keras.py [--xla]   # TF_ENABLE_ONEDNN_OPTS=0: no oneDNN

The layers of peer_keras.py's DCGAN at batch 128 on random inputs; per layer
the median ms of the gradient of sum(y^2) w.r.t. the input and the layer's
weights (2 threads). conv_layers_jax.py times genimg-jax's layers alike.
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(2)
import keras
L = keras.layers
xla = "--xla" in sys.argv
LAYERS = {
  "G ConvT 256->128 4x4 s1 (7x7)": ((7, 7, 256), L.Conv2DTranspose(128, 4, 1, "same", use_bias=False)),
  "G ConvT 128->64 4x4 s2 (7->14)": ((7, 7, 128), L.Conv2DTranspose(64, 4, 2, "same", use_bias=False)),
  "G ConvT 64->1 4x4 s2 (14->28)": ((14, 14, 64), L.Conv2DTranspose(1, 4, 2, "same", use_bias=False)),
  "D Conv 1->64 4x4 s2 (28->14)": ((28, 28, 1), L.Conv2D(64, 4, 2, "same")),
  "D Conv 64->128 4x4 s2 (14->7)": ((14, 14, 64), L.Conv2D(128, 4, 2, "same")),
}
out = {}
for name, (shape, layer) in LAYERS.items():
  x = tf.random.normal((128, *shape))
  layer.build((None, *shape))
  @tf.function(jit_compile=xla)
  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x)
      loss = tf.reduce_sum(y * y)
    return tape.gradient(loss, [x] + layer.trainable_variables)
  for _ in range(5): [g.numpy() for g in step(x)]
  ts = []
  for _ in range(30):
    t = time.perf_counter(); [g.numpy() for g in step(x)]; ts.append(1e3 * (time.perf_counter() - t))
  out[name] = round(statistics.median(ts), 2)
print(json.dumps({"framework": "tf-keras-xla" if xla else "tf-keras-graph", "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default(on)"), "ms": out}))
