"""jaxrisk: find hidden risks in neural networks by gradient descent, in JAX."""

__version__ = "0.1.0"
