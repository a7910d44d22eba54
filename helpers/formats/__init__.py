"""What other tools read and write: LoRA files (kohya/A1111/ComfyUI and diffusers layouts), original-layout
checkpoints, A1111 PNG parameters and Textual Inversion files."""
