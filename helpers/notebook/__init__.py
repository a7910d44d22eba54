"""What the notebooks need around the library: Colab setup, project folders, the GPU check, the training
monitor, settings forms and presets."""
