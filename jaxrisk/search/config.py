"""The run configuration every search shares; each capability's config composes one as `config.run`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxrisk.errors import require_int, require_seed


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Seed, restarts, budget, mesh, checkpoints and progress: the same meaning in every capability."""
    seed: int = 0
    restarts: int = 1                     # independent lanes per search target (class, behaviour, penalty)
    max_steps: int = 500                  # step budget per lane (lanes may stop earlier)
    chunk_steps: int = 50                 # steps per compiled call; checkpoints and progress between chunks
    devices: int | None = None            # devices of the mesh; None: every device of the job (all hosts)
    fsdp: int = 1                         # mesh axis sharding the weights' model dimension (see models/sharding)
    tensor: int = 1                       # mesh axis sharding heads / hidden units; restarts get the rest
    lanes: int | None = None              # items searched at once; fewer than the items: a work queue
    shrink_lanes: bool = True             # once no item waits, run the last items on fewer lanes when that
    #                                       saves more time than compiling the smaller chunk costs
    checkpoint_dir: str | Path | None = None   # resume from / save to here between chunks
    progress: bool = True

    def __post_init__(self):
        for name in ("restarts", "max_steps", "chunk_steps"):
            require_int(f"RunConfig.{name}", getattr(self, name), 1)
        require_seed("RunConfig.seed", self.seed)
        for name in ("devices", "lanes"):
            if getattr(self, name) is not None:
                require_int(f"RunConfig.{name}", getattr(self, name), 1)
        for name in ("fsdp", "tensor"):
            require_int(f"RunConfig.{name}", getattr(self, name), 1)

    def mesh(self):
        """The one (restarts, fsdp, tensor) mesh of this run (equal meshes for equal configs: compiled once)."""
        from jaxrisk.mesh import make_mesh

        return make_mesh(self.devices, fsdp=self.fsdp, tensor=self.tensor)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)
