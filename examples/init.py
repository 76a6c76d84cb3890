"""How initialisation shapes activations: a 10-layer tanh network and a 10-layer ReLU network on digits, the
standard deviation of each layer's activations under N(0, 0.01²), N(0, 1), Xavier and He initialisation.
Small weights make the signal collapse, large ones saturate tanh, Xavier keeps tanh's scale, He keeps ReLU's.

    python examples/init.py                  # or: lightning-dl run init
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _report import write  # examples/ is on sys.path when a recipe runs
from torch import nn

from lightning_dl.data import DigitsDataModule
from lightning_dl.nn import init_weights, make_activation

SCHEMES = {
    "N(0, 0.01²)": dict(scheme="normal", std=0.01),
    "N(0, 1)": dict(scheme="normal", std=1.0),
    "Xavier (normal)": dict(scheme="xavier_normal"),
    "He (normal)": dict(scheme="he_normal"),
}


@torch.no_grad()
def activation_stds(activation: str, init: dict, inputs: torch.Tensor, depth: int, width: int) -> list[float]:
    torch.manual_seed(0)
    layers = [nn.Linear(inputs.shape[1] if i == 0 else width, width) for i in range(depth)]
    stds, x = [], inputs
    for layer in layers:
        init_weights(layer, **init)
        x = make_activation(activation)(layer(x))
        stds.append(x.std().item())
    return stds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/init"))
    args = parser.parse_args()
    for name in ("depth", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    data = DigitsDataModule(batch_size=512, seed=0)
    data.setup()
    inputs = data._splits["train"].tensors[0]
    results = {
        act: {name: activation_stds(act, init, inputs, args.depth, args.width) for name, init in SCHEMES.items()}
        for act in ("tanh", "relu")
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, (act, by_scheme) in zip(axes, results.items(), strict=True):
        for name, stds in by_scheme.items():
            ax.plot(range(1, args.depth + 1), stds, marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("std of activations")
        ax.set_title(f"{args.depth} layers of {args.width} {act} units, digits inputs")
        ax.grid(alpha=0.3)
        ax.legend()
    header = ["activation", "init", "std layer 1", f"std layer {args.depth // 2}", f"std layer {args.depth}"]
    rows = [
        [act, name, f"{s[0]:.3g}", f"{s[args.depth // 2 - 1]:.3g}", f"{s[-1]:.3g}"]
        for act, by_scheme in results.items()
        for name, s in by_scheme.items()
    ]
    write(args.out, "init", header, rows, {"args": vars(args) | {"out": str(args.out)}, "stds": results}, fig)
    plt.close(fig)


if __name__ == "__main__":
    main()
