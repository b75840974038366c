"""jaxretina: retinal-image deep learning in JAX/Flax, numerically faithful to the upstream PyTorch systems."""

__version__ = "0.1.0"
