"""Notebook 03: the training loop for LoRA, DreamBooth and Textual Inversion, its saved state for resuming,
error advice, optimizers and class images."""
