"""ARCA's joint request / output coordinate ascent on the real stories260K."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrisk.search import RunConfig


@pytest.fixture(scope="module")
def lm(stories_lm):
    return stories_lm


@pytest.mark.slow
@pytest.mark.assets
def test_arca_joint_search_climbs_and_finds_consistent_request_output_pairs(lm):
    from jaxrisk.scorers.lm import SequenceScorer
    from jaxrisk.search import engine
    from jaxrisk.redteam import ARCAConfig
    from jaxrisk.redteam.arca import ARCAProblem
    from jaxrisk.redteam.problem import allowed_tokens

    cfg = ARCAConfig(request_len=5, output_len=3, candidates=64, plausibility_weight=1.0)
    plausibility = SequenceScorer(params=lm.params, bos=jnp.asarray([1]), graphdef=lm.graphdef)
    problem = ARCAProblem(params=lm.params, allowed=jnp.asarray(allowed_tokens(lm.tokenizer, lm.cfg.vocab_size)),
                          graphdef=lm.graphdef, cfg=cfg, plausibility=plausibility)
    prefix = lm.encode("Tom said:")
    lanes = {"prefix": np.stack([prefix] * 4), "x0": np.full((4, 5), -1, np.int32), "o0": np.full((4, 3), -1, np.int32)}
    res = engine.run(problem, lanes, RunConfig(max_steps=80, chunk_steps=8, progress=False))
    objective = res.metrics["objective"]                       # [steps, lanes]
    assert np.all(np.diff(objective, axis=0) >= -1e-4)         # coordinate ascent never goes down
    assert np.all(objective[-1] > objective[0] + 10)
    assert len({tuple(x) for x in res.state.x.tolist()}) == 4  # random restarts differ
    consistent = np.flatnonzero(res.state.consistent)
    assert len(consistent) >= 1
    for r in consistent:  # o really is the model's greedy output for x
        x, o = res.state.x[r], res.state.o[r]
        assert lm.generate([list(prefix) + list(x)], max_new_tokens=3)[0] == o.tolist()
