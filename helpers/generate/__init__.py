"""Notebook 04: generating images with LoRAs at chosen weights and embeddings, and comparison grids."""
