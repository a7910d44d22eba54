"""Notebook 05: the evaluation protocol and its metrics (CLIP-T, CLIP-I, DINO, KID/FID), tables, plots and
reports."""
