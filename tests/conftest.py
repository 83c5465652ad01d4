import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` run only where a GPU is present (pytest -m cuda on the GPU machine).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker itself, not item.keywords: keywords also hold every folder name on the
        # path, so a checkout under a folder named "cuda" would skip everything.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    # Tiny models and matmuls (in-process CLI runs included): threads only add synchronization,
    # and the test machine's cores are shared. Modules opt in with
    # `pytestmark = pytest.mark.usefixtures("one_thread")`, which sets it up before the module's
    # own module-scoped fixtures (tiny runs and models are built single-threaded too).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def export_runs(tmp_path_factory):
    # The two small trained runs that test_export and test_gguf export (helpers.train_runs),
    # trained once per session, single-threaded as in those modules.
    from helpers import train_runs

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_runs(tmp_path_factory, steps=200)
    finally:
        torch.set_num_threads(n)
