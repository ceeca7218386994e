"""Training: the LightningModule, its losses, the learning-rate schedule, checkpointing and callbacks."""
