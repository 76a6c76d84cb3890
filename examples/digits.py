"""Default recipe: an MLP classifier on scikit-learn's bundled 8x8 digits, trained on CPU.

    python examples/digits.py fit --config examples/configs/digits.yaml     # or: lightning-dl run digits

Any field can be overridden on the command line, e.g. ``--trainer.max_epochs=5 --data.batch_size=32``.
"""

from lightning_dl.cli import RecipeCLI
from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule


def main() -> None:
    RecipeCLI(ClassifierModule, DigitsDataModule)


if __name__ == "__main__":
    main()
