"""The interop suite: checkpoints we write loaded by the ecosystem's own loaders, and theirs by ours.

These tests need the outside loaders (scripts/setup_interop.sh; llama-cpp-python through
scripts/setup_llama_cpp.sh) and run only when the marker expression names them:
`pytest -m interop` (scripts/test_interop.sh), `pytest -m "interop and llama_cpp"`
(scripts/test_llama_cpp.sh). Plain `pytest`, `-m "not slow"` and scripts/test.sh leave them out.
"""
import os

import pytest

from .interop_common import Reference

# gptqmodel 7.7.0 sizes its CPU pool at (cores + 1) // 2 workers and then asks for a 2-worker loader
# pool inside it, which fails on a 2-core machine ("Virtual pool 'model_loader:cpu' requests 2 workers
# but parent 'cpu' only has 1"); its own override makes room for the loader pool. Set before gptqmodel
# builds its pool (lazily, on first use).
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def pytest_collection_modifyitems(config, items):
    if "interop" in (config.option.markexpr or ""):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("interop") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def reference():
    """SmolLM2 in fp32 with its tokenizer, the prompt batch, its logits on it and its perplexity."""
    return Reference.build("smollm2-135m")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Folder the suite writes its checkpoints into (one per session)."""
    return tmp_path_factory.mktemp("interop")
