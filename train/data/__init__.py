"""Loading the training data: the streaming loader, batches -> model inputs, per-query targets."""
