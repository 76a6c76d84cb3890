"""``diloco`` on 2 gloo ranks (the fits run once, in test_local_sgd's spawned run): parameters after every step
equal a transcription of the local trajectories with DiLoCo's outer Nesterov step; resume mid-period is exact and
restores the outer state; bad outer arguments are errors."""

import pytest
import torch

from lightning_dl.strategies import DiLoCoStrategy
from tests.strategies.test_local_sgd import OUTER, H, assert_trajectory, comm_runs, local_reference, per_rank_batches

pytestmark = pytest.mark.distributed


def test_diloco_equals_transcription_with_outer_step() -> None:
    ranks = comm_runs()
    reference = local_reference(per_rank_batches(2), H, **OUTER)
    assert_trajectory(ranks, "diloco_h3", reference)
    # the outer step moved the parameters away from the plain average
    plain = local_reference(per_rank_batches(2), H)
    assert not torch.allclose(reference[H - 1][0][0], plain[H - 1][0][0])


def test_diloco_resumes_exactly_with_outer_state() -> None:
    ranks = comm_runs()
    for result in ranks:
        for got, want in zip(result["diloco_resumed"]["final"], result["diloco_h3"]["final"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    saved = ranks[0]["checkpoint"]
    assert saved["strategy"] == "DiLoCoStrategy" and saved["world_size"] == 2 and len(saved["ranks"]) == 2
    # after 5 steps (one outer step at 3) the outer momentum is not zero and θ_start is the post-step parameters
    assert any(m.abs().sum() > 0 for m in saved["shared"]["momentum"].values())
    assert set(saved["shared"]["start"]) == set(saved["ranks"][0]["module"]) - set()  # one entry per parameter
    reference = local_reference(per_rank_batches(1), H, **OUTER)
    for name, value in zip(saved["shared"]["start"], reference[H - 1][0], strict=True):
        torch.testing.assert_close(saved["shared"]["start"][name], value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"outer_lr": 0.0}, r"`outer_lr` must be > 0, got 0.0"),
        ({"outer_momentum": 1.0}, r"`outer_momentum` must be in \[0, 1\), got 1.0"),
        ({"outer_momentum": -0.5}, r"`outer_momentum` must be in \[0, 1\), got -0.5"),
        ({"sync_every": 0}, r"`sync_every` must be an integer >= 1 .*got 0"),
    ],
)
def test_bad_outer_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DiLoCoStrategy(**kwargs)
