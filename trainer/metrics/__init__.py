"""Evaluation metrics: summable accumulators (see trainer.metrics.base.Metric)."""
