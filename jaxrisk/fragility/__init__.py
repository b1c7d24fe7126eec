"""Post-update fragility: is this model a few benign update steps away from a behaviour?"""

from jaxrisk.fragility.config import DEFAULT_LEARNING_RATES, FragilityConfig
from jaxrisk.fragility.data import FragilityData, fragility_data, load_fragility_data
from jaxrisk.fragility.report import FragilityResult
from jaxrisk.fragility.run import run

__all__ = ["DEFAULT_LEARNING_RATES", "FragilityConfig", "FragilityData", "FragilityResult", "fragility_data",
           "load_fragility_data", "run"]
