"""The LoRA toolbox: look inside a LoRA file, resize it by SVD (and, in the same place, merge, extract and
convert). Each tool is a function here and a verb of `python -m helpers`."""
