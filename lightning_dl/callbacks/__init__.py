"""Lightning callbacks a user adds to an existing model with one line each (thin wrappers over
``lightning_dl.schedules``, ``lightning_dl.scaling`` and ``lightning_dl.parallel.grad_norm``)."""
