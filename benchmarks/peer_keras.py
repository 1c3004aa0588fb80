"""Peer benchmark: one training step of the seed models in TensorFlow/Keras 3 (CPU).

Usage: python peer_keras.py --model {cnn,dcgan,vae} --batch 128 --steps 30 --warmup 3 [--xla]
The step is a GradientTape train step inside tf.function(jit_compile=--xla). Prints one JSON line.
The layers are those of shapes.py (genimg-jax's nets).
"""
import argparse, json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np
import tensorflow as tf
import keras
from keras import layers as L
import harness
import shapes

p = argparse.ArgumentParser()
p.add_argument("--model", choices=["cnn", "dcgan", "vae"], required=True)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--threads", type=int, default=2, help="intra-op threads")
p.add_argument("--inter", type=int, default=2, help="inter-op threads")
p.add_argument("--xla", action="store_true", help="tf.function(jit_compile=True)")
a = p.parse_args()
tf.config.threading.set_intra_op_parallelism_threads(a.threads)
tf.config.threading.set_inter_op_parallelism_threads(a.inter)
keras.utils.set_random_seed(0)
B = a.batch


def n_params(*ms):
    return sum(int(np.prod(v.shape)) for m in ms for v in m.trainable_weights)


def cnn():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(),
        L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(),
        L.Conv2D(128, 3, activation="relu"), L.Flatten(),
        L.Dense(512, activation="relu"), L.Dense(10)])


def generator():
    return keras.Sequential([
        keras.Input((100,)),
        L.Dense(7 * 7 * 256, use_bias=False), L.BatchNormalization(), L.LeakyReLU(0.3),
        L.Reshape((7, 7, 256)),
        L.Conv2DTranspose(128, 4, 1, "same", use_bias=False), L.BatchNormalization(), L.LeakyReLU(0.3),
        L.Conv2DTranspose(64, 4, 2, "same", use_bias=False), L.BatchNormalization(), L.LeakyReLU(0.3),
        L.Conv2DTranspose(1, 4, 2, "same", use_bias=False, activation="tanh")])


def discriminator():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(64, 4, 2, "same"), L.LeakyReLU(0.2), L.Dropout(0.3),
        L.Conv2D(128, 4, 2, "same"), L.LeakyReLU(0.2), L.Dropout(0.3),
        L.Flatten(), L.Dense(1)])


def encoder(latent=32):
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(32, 3, 2, "same", activation="relu"), L.Conv2D(64, 3, 2, "same", activation="relu"),
        L.Flatten(), L.Dense(256, activation="relu"), L.Dense(2 * latent)])


def decoder(latent=32):
    return keras.Sequential([
        keras.Input((latent,)),
        L.Dense(7 * 7 * 64, activation="relu"), L.Reshape((7, 7, 64)),
        L.Conv2DTranspose(64, 3, 2, "same", activation="relu"),
        L.Conv2DTranspose(32, 3, 2, "same", activation="relu"),
        L.Conv2DTranspose(1, 3, 1, "same")])


def apply(opt, tape, loss, model):
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))


tf_fn = tf.function(jit_compile=a.xla)

if a.model == "cnn":
    net = cnn()
    opt = keras.optimizers.Adam(1e-3)
    opt.build(net.trainable_variables)
    params, detail = n_params(net), None
    xs = tf.random.normal((B, 28, 28, 1))
    ys = tf.random.uniform((B,), 0, 10, dtype=tf.int32)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf_fn
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = ce(y, net(x, training=True))
        apply(opt, tape, loss, net)
        return loss

    step = lambda: train_step(xs, ys).numpy()

elif a.model == "dcgan":
    G, D = generator(), discriminator()
    optG, optD = keras.optimizers.Adam(2e-4, beta_1=0.5), keras.optimizers.Adam(2e-4, beta_1=0.5)
    optG.build(G.trainable_variables)
    optD.build(D.trainable_variables)
    params, detail = n_params(G, D), {"G": n_params(G), "D": n_params(D)}
    reals = tf.random.uniform((B, 28, 28, 1), -1, 1)
    ones, zeros = tf.ones((B, 1)), tf.zeros((B, 1))
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    @tf_fn
    def train_step(real):
        # discriminator update: real batch + fake batch (generator not updated)
        fake = tf.stop_gradient(G(tf.random.normal((B, 100)), training=True))
        with tf.GradientTape() as tape:
            d_loss = bce(ones, D(real, training=True)) + bce(zeros, D(fake, training=True))
        apply(optD, tape, d_loss, D)
        # generator update with fresh noise, non-saturating loss
        with tf.GradientTape() as tape:
            g_loss = bce(ones, D(G(tf.random.normal((B, 100)), training=True), training=True))
        apply(optG, tape, g_loss, G)
        return d_loss + g_loss

    step = lambda: train_step(reals).numpy()

else:
    enc, dec = encoder(), decoder()
    opt = keras.optimizers.Adam(1e-3)
    variables = enc.trainable_variables + dec.trainable_variables
    opt.build(variables)
    params, detail = n_params(enc, dec), {"encoder": n_params(enc), "decoder": n_params(dec)}
    xs = tf.random.uniform((B, 28, 28, 1))

    @tf_fn
    def train_step(x):
        with tf.GradientTape() as tape:
            mean, logvar = tf.split(enc(x, training=True), 2, axis=1)
            z = mean + tf.exp(0.5 * logvar) * tf.random.normal(tf.shape(mean))
            logits = dec(z, training=True)
            rec = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits), axis=[1, 2, 3])
            kl = -0.5 * tf.reduce_sum(1 + logvar - tf.square(mean) - tf.exp(logvar), axis=1)
            loss = tf.reduce_mean(rec + kl)
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables))
        return loss

    step = lambda: train_step(xs).numpy()

res = harness.time_steps(step, B, a.steps, a.warmup)
out = {"framework": "tf-keras-xla" if a.xla else "tf-keras-graph", "model": a.model, "batch": B, "params": params,
       "params_match": params == shapes.param_count(a.model), **res,
       "threads": {"intra": tf.config.threading.get_intra_op_parallelism_threads(),
                   "inter": tf.config.threading.get_inter_op_parallelism_threads()},
       "version": f"tensorflow-cpu {tf.__version__}, keras {keras.__version__}",
       "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default(on)")}
if detail:
    out["params_detail"] = detail
print(json.dumps(out), flush=True)
