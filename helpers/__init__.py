"""SD LoRA helpers: from a folder of images to a Stable Diffusion LoRA that works."""

__version__ = "0.1.0"

from .sd.notices import quiet_known_noise  # noqa: E402

quiet_known_noise()
