"""LogicalMesh: row-major rank groups, the axis vocabulary, validation."""

from __future__ import annotations

import pytest

from autopar.errors import ConfigError
from autopar.topology.mesh import LogicalMesh, MeshAxis


def test_groups_row_major_last_axis_innermost():
    m = LogicalMesh((2, 2, 4), ("pp", "dp", "tp"))
    assert m.size == 16 and m.ndim == 3
    assert m.groups("tp") == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
    assert m.groups("dp") == ((0, 4), (1, 5), (2, 6), (3, 7), (8, 12), (9, 13), (10, 14), (11, 15))
    assert m.groups(MeshAxis.PP) == tuple((i, i + 8) for i in range(8))


def test_groups_partition_the_mesh():
    m = LogicalMesh((3, 4, 2), ("pp", "dp", "tp"), first_rank=0)
    for ax in m.dim_names:
        flat = sorted(r for g in m.groups(ax) for r in g)
        assert flat == list(range(24))
        assert all(len(g) == m.axis_size(ax) for g in m.groups(ax))


def test_first_rank_offsets_a_stage_submesh():
    m = LogicalMesh((2, 8), ("dp", "tp"), first_rank=16)
    assert m.groups("dp")[0] == (16, 24)
    assert m.coordinates(25) == {"dp": 1, "tp": 1}


def test_enum_names_accepted():
    m = LogicalMesh((4,), (MeshAxis.DP,))
    assert m.dim_names == ("dp",)


@pytest.mark.parametrize(
    "shape,names",
    [((2, 2), ("dp",)), ((2, 2), ("dp", "dp")), ((2, 2), ("dp", "xx")), ((0, 2), ("dp", "tp"))],
)
def test_bad_meshes(shape, names):
    with pytest.raises(ConfigError):
        LogicalMesh(shape, names)


def test_unknown_axis_lists_allowed():
    with pytest.raises(ConfigError) as exc:
        LogicalMesh((2, 2), ("dp", "tp")).groups("pp")
    assert exc.value.allowed == ("dp", "tp")
