"""The mesh's shape from config.mesh."""
import pytest

from hvla import sharding


def test_mesh_shape():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "model": 1}, 8) == {
      "data": 4, "fsdp": 2, "model": 1}
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "model": 1}, 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "model": 1}, 8)
