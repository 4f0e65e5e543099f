"""The entry point's multi-process arguments."""
import pytest

from hvla import main


def test_no_distributed_arguments_means_single_process():
  assert main.distributed_arguments(None, None, None, {}) is None


def test_flags_win_over_environment():
  env = {"HVLA_COORDINATOR": "a:1", "HVLA_NUM_PROCESSES": "4", "HVLA_PROCESS_ID": "3"}
  assert main.distributed_arguments("b:2", 2, 1, env) == dict(
      coordinator_address="b:2", num_processes=2, process_id=1)
  assert main.distributed_arguments(None, None, None, env) == dict(
      coordinator_address="a:1", num_processes=4, process_id=3)


def test_partial_arguments_fail():
  with pytest.raises(ValueError, match="coordinator_address"):
    main.distributed_arguments("a:1", None, None, {})


def test_cluster_detection():
  assert main.cluster_detected({"SLURM_NTASKS": "8"})
  assert not main.cluster_detected({"SLURM_NTASKS": "1"})
  assert main.cluster_detected({"TPU_WORKER_HOSTNAMES": "w0,w1"})
  assert not main.cluster_detected({})
