"""Which circuit carries the behaviour? Differentiable masks over heads and neurons, learned on the engine.

    from jaxrisk import circuits
    data = circuits.load_circuit_data("circuit.jsonl", lm.tokenizer)
    result = circuits.run(lm, data, circuits.CircuitsConfig(penalties=(3.0, 6.0)))
    result.write("runs/circuits")
"""

from jaxrisk.circuits.config import CircuitConfig, CircuitsConfig
from jaxrisk.circuits.data import load_circuit_data
from jaxrisk.circuits.problem import CircuitProblem, CircuitState, ablation_masks, circuit_from_logits, sparsity
from jaxrisk.circuits.report import CircuitsResult
from jaxrisk.circuits.run import run

__all__ = ["CircuitConfig", "CircuitProblem", "CircuitState", "CircuitsConfig", "CircuitsResult", "ablation_masks",
           "circuit_from_logits", "load_circuit_data", "run", "sparsity"]
