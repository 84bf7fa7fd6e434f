"""Which GPU a tensor lives on, for the launchers' per-architecture tile choices."""
import torch


def arch(x: torch.Tensor) -> int:
    """Compute capability as 80, 86, 89, 90...; CPU tensors (the interpreter) take Hopper's configuration."""
    if not x.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor
