"""Pure, batched log-scorers for language-model searches (sum of log-scores = product of probabilities)."""

from jaxrisk.scorers.lm import JudgeScorer, SequenceScorer, mellowmax, target_logprob, weighted_sum
from jaxrisk.scorers.probe import ProbeScorer, train_probe

__all__ = ["JudgeScorer", "SequenceScorer", "mellowmax", "target_logprob", "weighted_sum", "ProbeScorer",
           "train_probe"]
