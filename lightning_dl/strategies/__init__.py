"""Lightning ``Strategy`` subclasses, registered by name in Lightning's ``StrategyRegistry`` when
``lightning_dl`` is imported (glue over the torch-only machinery in ``lightning_dl.parallel``)."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dl.strategies.async_sgd import AsyncSGDStrategy
from lightning_dl.strategies.hogwild import HogwildStrategy

__all__ = ["AsyncSGDStrategy", "HogwildStrategy"]

for _strategy in (AsyncSGDStrategy, HogwildStrategy):
    _strategy.register_strategies(StrategyRegistry)
