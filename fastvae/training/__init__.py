"""Training: the trainer, its config, checkpoints, the learning-rate schedule, optimizer calls, callbacks,
metrics, data parallelism and importance-sampled evaluation."""
