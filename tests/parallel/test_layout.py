"""ParallelLayout: parsing, validation, rank coordinates and the mesh it builds."""

import pytest

from lightning_dl.parallel.layout import MESH_DIMS, ParallelLayout
from tests.helpers.distributed import run_distributed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dp2,tp2,pp2", ParallelLayout(2, 2, 2)),
        ("pp2,dp2", ParallelLayout(dp=2, pp=2)),
        ("TP4", ParallelLayout(tp=4)),
        (" dp1 , tp1 ", ParallelLayout()),
    ],
)
def test_parse_reads_any_order_and_defaults_to_one(text, expected) -> None:
    assert ParallelLayout.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must be a string such as 'dp2,tp2,pp2'"),
        ("dp2,xp2", "cannot read 'xp2'"),
        ("dp2;tp2", "cannot read 'dp2;tp2'"),
        ("dp2,dp2", "gives dp twice"),
        ("dp0", "`dp=0` must be a positive integer"),
    ],
)
def test_parse_rejects_bad_strings(text, message) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelLayout.parse(text)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_degrees_must_be_positive_integers(bad) -> None:
    with pytest.raises(ValueError, match=r"`tp=.*` must be a positive integer"):
        ParallelLayout(tp=bad)


def test_world_size_check_names_the_devices() -> None:
    with pytest.raises(ValueError, match=r"needs dp·tp·pp = 2·2·1 = 4 processes, but `devices=3`"):
        ParallelLayout(dp=2, tp=2).check_world_size(3)


def test_coordinates_put_tp_innermost_and_pp_outermost() -> None:
    layout = ParallelLayout(dp=2, tp=2, pp=2)
    coords = [layout.coordinates(rank) for rank in range(8)]
    assert [c["tp"] for c in coords] == [0, 1] * 4
    assert [c["dp"] for c in coords] == [0, 0, 1, 1] * 2
    assert [c["pp"] for c in coords] == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match=r"`rank=8` must lie in \[0, 8\)"):
        layout.coordinates(8)


def _mesh_groups(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    layout = ParallelLayout(dp=2, pp=2)
    mesh = layout.build_mesh()
    assert layout.build_mesh() is mesh  # built once
    return {
        "names": mesh.mesh_dim_names,
        "coords": list(mesh.get_coordinate() or ()),
        **{name: dist.get_process_group_ranks(mesh.get_group(name)) for name in ("pp", "dp")},
    }


@pytest.mark.distributed
def test_mesh_matches_the_coordinates() -> None:
    layout = ParallelLayout(dp=2, pp=2)
    results = run_distributed(_mesh_groups, 4)
    for rank, result in enumerate(results):
        coords = layout.coordinates(rank)
        assert result["names"] == MESH_DIMS
        assert result["coords"] == [coords["pp"], coords["dp"], coords["tp"]]
        assert result["dp"] == [r for r in range(4) if layout.coordinates(r)["pp"] == coords["pp"]]
        assert result["pp"] == [r for r in range(4) if layout.coordinates(r)["dp"] == coords["dp"]]
