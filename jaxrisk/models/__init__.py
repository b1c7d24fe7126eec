"""Model ports and torch-free loaders."""

from jaxrisk.models.classifiers import ARCHS, MLP, MnistCNN, build, logits_fn, pure_apply
from jaxrisk.models.lm import LanguageModel, load_pretrained
from jaxrisk.models.lm_config import LMConfig
from jaxrisk.models.weights import load_classifier, read_safetensors, save_classifier, torch_state_dict

__all__ = ["ARCHS", "MLP", "MnistCNN", "build", "logits_fn", "pure_apply", "load_classifier",
           "read_safetensors", "save_classifier", "torch_state_dict", "LanguageModel", "LMConfig",
           "load_pretrained"]
