"""Dataset readers."""

from jaxrisk.data.images import ImageSet, load_digits, load_mnist, read_idx

__all__ = ["ImageSet", "load_digits", "load_mnist", "read_idx"]
