"""Launchers that start hvla on a TPU pod, a SLURM GPU cluster or several local processes."""
