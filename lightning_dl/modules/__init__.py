"""LightningModules that package a network, its loss, optimizer and metrics."""

from lightning_dl.modules.classifier import ClassifierModule

__all__ = ["ClassifierModule"]
