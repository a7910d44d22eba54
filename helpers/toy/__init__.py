"""The toy world: a renderer of small scenes with true captions, its pretrained base model and judge, the demo,
the toy evaluation, and tiny pipelines for tests. The library never imports it; it imports the library."""
