"""LightningModules that package a network, its loss, optimizer, norm and initialisation choices and metrics."""

from lightning_dl.modules.classifier import ClassifierModule
from lightning_dl.modules.language_model import LanguageModelModule

__all__ = ["ClassifierModule", "LanguageModelModule"]
