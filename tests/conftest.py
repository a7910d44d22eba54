"""Shared fixtures: tiny SD 1.5-like / SDXL-like models saved once per session, and a small concept set."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    from helpers.toy.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny_sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from helpers.toy.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny_sdxl", "sdxl")


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory):
    """12 images of a violet flower (32x32) with captions, in kohya's `<repeats>_<name>` layout."""
    from helpers.toy.world import write_concept_dataset

    return write_concept_dataset(tmp_path_factory.mktemp("data") / "concept", n=12, repeats=2)


def pytest_collection_modifyitems(config, items):
    """The slow tests first (stable otherwise): `make test` runs the suite on parallel workers, and a long test
    that starts last keeps one worker busy after the other has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
