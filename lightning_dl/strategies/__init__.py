"""Lightning ``Strategy`` subclasses, registered by name in Lightning's ``StrategyRegistry`` when
``lightning_dl`` is imported (glue over the torch-only machinery in ``lightning_dl.parallel``)."""
