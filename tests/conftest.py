import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` run only where a GPU is present (pytest -m cuda on the GPU machine).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
