"""Circuit discovery: differentiable masks over heads and neurons, learned with Optax on the engine."""
