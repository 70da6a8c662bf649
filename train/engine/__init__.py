"""The training engine: optimizer step, the one training loop, validation and the run's records."""
