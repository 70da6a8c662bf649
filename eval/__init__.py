"""Official metrics of every dataset, post-processing + NMS, prediction files, plots (no model)."""
