"""Is there a plausible request with a dangerous plan? Gradient-guided token search (GCG, ARCA).

    from jaxrisk import redteam
    result = redteam.run(lm, behaviors, redteam.RedteamConfig(), out_dir="runs/redteam")
"""

from jaxrisk.redteam.config import PLAIN_GCG, ARCAConfig, GCGConfig, RedteamConfig
from jaxrisk.redteam.report import RedteamResult
from jaxrisk.redteam.run import run

__all__ = ["PLAIN_GCG", "ARCAConfig", "GCGConfig", "RedteamConfig", "RedteamResult", "run"]
