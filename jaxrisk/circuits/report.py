"""The circuits result: report.json, the learned mask logits (safetensors) and a figure (PNG)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxrisk.io import atomic_write, write_json


@dataclasses.dataclass(frozen=True)
class CircuitsResult:
    report: dict   # base rates; per penalty and per front member: sparsity, faithfulness, utility, mask logits
    means: dict | None = None   # what mean ablation put in place of a unit (`masks.unit_means` of the clean rows)

    @property
    def circuits(self) -> list[dict]:
        return self.report["circuits"]

    @property
    def front(self) -> list[dict]:
        """The Pareto set over every lane (penalty x restart), fewest units first."""
        return self.report["front"]

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write the report, figure and masks atomically; returns (report.json, circuits.png)."""
        return write_circuit_report(self.report, out_dir)


def learned_measures(entry: dict, ablation: str) -> dict:
    """A circuit's behaviour rates, utility and task accuracy under the ablation its masks were learned with
    (zero-ablation fields at the entry's top level; mean ablation under "mean_ablation")."""
    return entry["mean_ablation"] if ablation == "mean" else entry


def write_circuit_report(result: dict, out: str | Path) -> tuple[Path, Path]:
    """OUT/report.json, OUT/circuits.png (layer x head map of the sparsest faithful circuit; the front),
    OUT/circuits.safetensors (mask logits: `penalty{i}.heads` / `.neurons` per penalty, `front{j}.*` per
    front member)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.numpy import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"penalty{i}.{k}": v for i, c in enumerate(result["circuits"]) for k, v in c["logits"].items()}
    tensors.update({f"front{j}.{k}": v for j, c in enumerate(result["front"]) for k, v in c["logits"].items()})
    blob = save(tensors)
    atomic_write(out / "circuits.safetensors", lambda f: f.write(blob), mode="wb")
    strip = lambda entries: [{k: v for k, v in c.items() if k != "logits"} for c in entries]  # noqa: E731
    report = dict(result, circuits=strip(result["circuits"]), front=strip(result["front"]))
    json_path = write_json(out / "report.json", report)

    ablation = result["config"]["ablation"]
    rates = [learned_measures(c, ablation)["rate_ablated"] for c in result["circuits"]]
    faithful = [c for c, rate in zip(result["circuits"], rates) if rate is not None and rate <= 0.05]
    chosen = min(faithful, key=lambda c: c["units"]) if faithful else result["circuits"][0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    heads = (chosen["logits"]["heads"] > 0).astype(float) if "heads" in chosen["logits"] else np.zeros((1, 1))
    ax1.imshow(heads, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax1.set_xlabel("head")
    ax1.set_ylabel("layer")
    ax1.set_title(f"circuit heads (penalty {chosen['penalty']}; {chosen['n_heads']} heads, "
                  f"{chosen['n_neurons']} neurons)", fontsize=9)
    xs = [100 * c["units"] for c in result["front"]]
    front = [learned_measures(c, ablation) for c in result["front"]]
    ax2.plot(xs, [c["utility"] for c in front], "o-", label="utility (clean-loss ratio)")
    ax2.plot(xs, [c["task_accuracy"] for c in front], "^-",
             label=f"task accuracy (intact {result['base_task_accuracy']:.3f})")
    if all(c["rate_ablated"] is not None for c in front):
        ax2.plot(xs, [c["rate_ablated"] for c in front], "s-", label="behaviour rate, ablated")
    ax2.set_xlabel(f"% of heads + neurons ablated ({ablation} ablation)")
    ax2.legend(fontsize=8)
    ax2.set_title("Pareto front over every penalty x restart", fontsize=9)
    fig.tight_layout()
    png = out / "circuits.png"
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return json_path, png
