"""Notebooks 01-02: preparing a folder of images (decode, crop, dedupe, report), the training set with
buckets and cached latents, captions and their editing, captioners."""
