"""Tensor parallelism: one model sharded over worker processes (torch.distributed)."""
