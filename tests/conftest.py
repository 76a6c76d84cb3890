"""Suite-wide fixtures: no process group outlives a test."""

from collections.abc import Iterator

import pytest
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _destroy_process_group() -> Iterator[None]:
    """Destroy any default process group a test left behind, so the next one starts clean."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
