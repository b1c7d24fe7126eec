"""The restart-parallel search engine and the problems it runs."""

from jaxrisk.search.engine import EngineConfig, SearchProblem, SearchResult, run
from jaxrisk.search.mesh import initialize_distributed, restart_mesh

__all__ = ["EngineConfig", "SearchProblem", "SearchResult", "run", "initialize_distributed", "restart_mesh"]
