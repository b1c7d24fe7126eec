"""Mechanistic anomaly detection: flag the inputs on which a model runs an anomalous mechanism."""
