"""genimg-jax: image-generation models written the JAX way."""

__version__ = "0.1.0"
