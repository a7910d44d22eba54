"""What Stable Diffusion is, for every stage: loading a base model and its family, precision, samplers, text
encoding and prompt weighting, LoRA targets and injection, new token vectors, trigger words."""
