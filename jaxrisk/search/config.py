"""The run configuration every search shares; each capability's config composes one as `config.run`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxrisk.errors import require_int, require_seed


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Seed, restarts, budget, devices, checkpoints and progress: the same meaning in every capability."""
    seed: int = 0
    restarts: int = 1                     # independent lanes per search target (class, behaviour, penalty)
    max_steps: int = 500                  # step budget per lane (lanes may stop earlier)
    chunk_steps: int = 50                 # steps per compiled call; checkpoints and progress between chunks
    devices: int | None = None            # devices to shard lanes over; None: every device this host sees
    checkpoint_dir: str | Path | None = None   # resume from / save to here between chunks
    progress: bool = True

    def __post_init__(self):
        for name in ("restarts", "max_steps", "chunk_steps"):
            require_int(f"RunConfig.{name}", getattr(self, name), 1)
        require_seed("RunConfig.seed", self.seed)
        if self.devices is not None:
            require_int("RunConfig.devices", self.devices, 1)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)
