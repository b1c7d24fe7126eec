"""The restart-parallel search engine and the problems it runs."""

from jaxrisk.search.engine import EngineConfig, SearchProblem, SearchResult, run
from jaxrisk.search.mesh import restart_mesh

__all__ = ["EngineConfig", "SearchProblem", "SearchResult", "run", "restart_mesh"]
