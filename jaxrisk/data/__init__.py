"""Dataset readers and batching."""

from jaxrisk.data.batch import answer_rows, pad_batch
from jaxrisk.data.images import ImageSet, load_digits, load_mnist, read_idx, stamp

__all__ = ["ImageSet", "answer_rows", "load_digits", "load_mnist", "pad_batch", "read_idx", "stamp"]
