"""Training: the one pure update step and the loops built on it."""

from jaxrisk.optim.update import finetune, masked_updates, train_host, train_scan, update_step, with_mask

__all__ = ["finetune", "masked_updates", "train_host", "train_scan", "update_step", "with_mask"]
