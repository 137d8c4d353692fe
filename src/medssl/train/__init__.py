"""The training loop, pretraining and fine-tuning entry points."""
