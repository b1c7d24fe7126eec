"""Planting trojans in small models, with their ground truth."""

from jaxrisk.zoo.train import TrainConfig, evaluate, load_zoo_info, poison, save_zoo_model, train_classifier
from jaxrisk.zoo.triggers import KINDS, STAMP_KINDS, Trigger, load_trigger, make_trigger, save_trigger

__all__ = ["KINDS", "STAMP_KINDS", "TrainConfig", "Trigger", "evaluate", "load_trigger", "load_zoo_info",
           "make_trigger", "poison", "save_trigger", "save_zoo_model", "train_classifier"]
