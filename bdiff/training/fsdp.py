"""FSDP2 for train.py --fsdp: the model's parameters, gradients and optimizer state sharded over the ranks
(torch.distributed.fsdp.fully_shard, per transformer block and at the root, as torchtitan shards), its checkpoints
written and read by torch.distributed.checkpoint, which re-shards them for any number of processes.

Precision stays explicit: the parameters are fp32 shards; each block's are gathered in the run's dtype
(MixedPrecisionPolicy.param_dtype) for its forward and backward, and gradients are reduced in fp32.

torch.distributed's fsdp, tensor and checkpoint packages are imported by the functions that use them: together they
cost ~0.7 s at every start of every command (train, sample, eval, chat), and only a sharded run needs them.
"""
from __future__ import annotations

import sys

import torch

from bdiff.models.objective import BlockDiffusionModel


def layers(model: BlockDiffusionModel) -> list[torch.nn.Module]:
    """The transformer blocks each FSDP unit holds: the nano model's blocks, a transformers model's decoder layers."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return list(model.lm.base_model.layers)


def shard(model: BlockDiffusionModel, dtype: torch.dtype) -> BlockDiffusionModel:
    """fully_shard every block, then the root (the embedding, the head, the norms and scalars left over), in
    place. Blocks are gathered for their forward and again for their backward (reshard_after_forward): the memory of
    one block's full parameters at a time, at the price of a second all-gather."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in layers(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model) -> bool:
    """Whether `shard` made `model` an FSDP module, asked without importing FSDP: none exists before it is imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a DTensor (a sharded parameter, gradient or state), asked as `is_sharded` asks."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def full_state_dict(model: BlockDiffusionModel) -> dict:
    """The whole model's weights on rank 0's CPU (a collective: every rank calls it; the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_state(path: str, model, optimizers) -> None:
    """The model's and the optimizers' sharded states into `path` (every rank writes its shards; a collective). A
    rank's failed write (a full disk, permissions) raises OSError on every rank, as checkpoint.save's own writes do."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizers)
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    except dcp.CheckpointException as e:  # gathers every rank's exception, with tracebacks: its first line
        raise OSError(str(e).splitlines()[0][:200]) from e


def load_state(path: str, model, optimizers) -> None:
    """The states `save_state` wrote, re-sharded for this run's processes: any number of FSDP ranks, or one process
    with a plain model (torch.distributed.checkpoint reads without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
