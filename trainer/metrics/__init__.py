"""Evaluation metrics: summable accumulators (see trainer.tasks.base.Metric)."""
