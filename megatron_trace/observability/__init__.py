"""Views of a run's metrics: plots (and, in train/, the JSONL/TensorBoard/W&B sinks)."""
