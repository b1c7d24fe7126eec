"""Behaviour measures shared by every capability (greedy continuations, starts-with rates, utility)."""

from jaxrisk.evals.behaviour import clean_loss, greedy_continuations, next_token_accuracy, starts_with, utility

__all__ = ["clean_loss", "greedy_continuations", "next_token_accuracy", "starts_with", "utility"]
