"""Training: model/optimizer setup, the TRACE step and loop (the loop lands with the trainer issue)."""
