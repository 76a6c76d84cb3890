"""``ParallelLayout``: the degrees of data, tensor and pipeline parallelism of one run, validated, and the one
DeviceMesh they build (dims ``("pp", "dp", "tp")``: pp outermost, tp innermost, as torchtitan's ``ParallelDims``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp", "tp")
"""Names of the mesh dimensions, outermost first: ranks of one tensor-parallel group are neighbours."""

_TOKEN = re.compile(r"^(dp|tp|pp)(\d+)$")


@dataclass(frozen=True)
class ParallelLayout:
    """How ``world_size = dp · tp · pp`` processes share one model.

    Rank ``r`` sits at mesh coordinate ``(pp, dp, tp)`` with ``r = (pp · dp_size + dp) · tp_size + tp``.

    Example:
        >>> layout = ParallelLayout.parse("dp2,pp2")
        >>> layout
        ParallelLayout(dp=2, tp=1, pp=2)
        >>> layout.world_size, layout.pp_enabled, layout.tp_enabled
        (4, True, False)
        >>> str(layout)
        'dp2,tp1,pp2'
        >>> layout.coordinates(3)
        {'pp': 1, 'dp': 1, 'tp': 0}
    """

    dp: int = 1
    """Data-parallel degree: replicas of the (possibly split) model, each reading its own share of the batch."""
    tp: int = 1
    """Tensor-parallel degree: processes that hold one shard each of every sharded layer."""
    pp: int = 1
    """Pipeline-parallel degree: stages the model's blocks are split into, in order."""
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}={value!r}` must be a positive integer (the degree of that dimension).")

    @classmethod
    def parse(cls, text: str) -> ParallelLayout:
        """Read a layout written as ``"dp2,tp2,pp2"``: any order, a dimension left out has degree 1."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"`layout={text!r}` must be a string such as 'dp2,tp2,pp2' (dimensions dp, tp, pp).")
        degrees: dict[str, int] = {}
        for token in text.replace(" ", "").lower().split(","):
            match = _TOKEN.match(token)
            if match is None:
                raise ValueError(
                    f"`layout={text!r}`: cannot read {token!r}; write each dimension as dp<N>, tp<N> or pp<N>, "
                    "separated by commas, for example 'dp2,tp2,pp2'."
                )
            name, degree = match.group(1), int(match.group(2))
            if name in degrees:
                raise ValueError(f"`layout={text!r}` gives {name} twice; give each of dp, tp, pp at most once.")
            degrees[name] = degree
        return cls(**degrees)

    def __str__(self) -> str:
        return f"dp{self.dp},tp{self.tp},pp{self.pp}"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """Mesh shape in ``MESH_DIMS`` order."""
        return (self.pp, self.dp, self.tp)

    def check_world_size(self, world_size: int, name: str = "devices") -> None:
        """Raise when ``world_size`` processes cannot hold this layout."""
        if world_size != self.world_size:
            raise ValueError(
                f"The layout {self} needs dp·tp·pp = {self.dp}·{self.tp}·{self.pp} = {self.world_size} processes, "
                f"but `{name}={world_size}`: set {name} to {self.world_size} or change the layout."
            )

    def coordinates(self, rank: int) -> dict[str, int]:
        """Mesh coordinate of ``rank`` as ``{"pp": i, "dp": j, "tp": k}``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"`rank={rank}` must lie in [0, {self.world_size}) for the layout {self}.")
        tp, rest = rank % self.tp, rank // self.tp
        return {"pp": rest // self.dp, "dp": rest % self.dp, "tp": tp}

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The DeviceMesh over the default process group (initialised first), built once and kept."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            if not dist.is_initialized():
                raise RuntimeError("ParallelLayout.build_mesh needs an initialised default process group.")
            self.check_world_size(dist.get_world_size(), name="world_size")
            object.__setattr__(self, "_mesh", init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS))
        assert self._mesh is not None
        return self._mesh
