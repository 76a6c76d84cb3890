"""Lightning callbacks a user adds to an existing model with one line each (thin wrappers over
``lightning_dl.schedules``, ``lightning_dl.scaling`` and ``lightning_dl.parallel.grad_norm``)."""

from lightning_dl.callbacks.batch_size_scaling import BatchSizeScaling
from lightning_dl.callbacks.gradient_clipping import GradientClipping
from lightning_dl.callbacks.lr_schedule import LRSchedule
from lightning_dl.callbacks.noise_scale import GradientNoiseScale
from lightning_dl.callbacks.scaling_efficiency import ScalingEfficiency

__all__ = ["BatchSizeScaling", "GradientClipping", "GradientNoiseScale", "LRSchedule", "ScalingEfficiency"]
