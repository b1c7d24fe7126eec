"""The restart-parallel search engine: it knows no model, only problems, lanes and a RunConfig."""

from jaxrisk.search.config import RunConfig
from jaxrisk.search.engine import SearchProblem, SearchResult, remove_checkpoint, run
from jaxrisk.search.reduce import best_per_group, lane_groups

__all__ = ["RunConfig", "SearchProblem", "SearchResult", "best_per_group", "lane_groups", "remove_checkpoint",
           "run"]
