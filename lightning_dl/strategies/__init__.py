"""Lightning ``Strategy`` subclasses, registered by name in Lightning's ``StrategyRegistry`` when
``lightning_dl`` is imported (glue over the torch-only machinery in ``lightning_dl.parallel``)."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dl.strategies.async_sgd import AsyncSGDStrategy
from lightning_dl.strategies.compressed import CompressedDDPStrategy
from lightning_dl.strategies.deepspeed_cpu import DeepSpeedCPUStrategy
from lightning_dl.strategies.diloco import DiLoCoStrategy
from lightning_dl.strategies.hogwild import HogwildStrategy
from lightning_dl.strategies.hybrid import HybridStrategy
from lightning_dl.strategies.local_sgd import LocalSGDStrategy
from lightning_dl.strategies.pipeline import PipelineStrategy
from lightning_dl.strategies.tensor_parallel import TensorParallelStrategy

__all__ = [
    "AsyncSGDStrategy",
    "CompressedDDPStrategy",
    "DeepSpeedCPUStrategy",
    "DiLoCoStrategy",
    "HogwildStrategy",
    "HybridStrategy",
    "LocalSGDStrategy",
    "PipelineStrategy",
    "TensorParallelStrategy",
]

for _strategy in (
    AsyncSGDStrategy,
    HogwildStrategy,
    LocalSGDStrategy,
    DiLoCoStrategy,
    CompressedDDPStrategy,
    DeepSpeedCPUStrategy,
    PipelineStrategy,
    TensorParallelStrategy,
    HybridStrategy,
):
    _strategy.register_strategies(StrategyRegistry)
