"""Scale-out training: FSDP2 sharding of an :class:`~mmformer.model.MMFormer` and the Lightning strategy.

- :func:`apply_fsdp` shards the model with FSDP2 (``torch.distributed.fsdp.fully_shard``): every
  multiway block is one unit (its shared attention weights live inside it, so they are gathered
  once per block and used by both modalities), then the root takes the embeddings, final norms,
  projections and the logit scale.
- :class:`ShardedStrategy` is Lightning's ``ModelParallelStrategy`` with data-parallel defaults
  (``tensor_parallel_size=1``, ``data_parallel_size`` = every process), and sharded checkpoints
  written atomically (into a temporary folder that is renamed once every rank has finished) and
  checked before loading (:func:`mmformer.training.checkpoint.check_checkpoint`).

Works on CPU (gloo) and GPU (NCCL) alike.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from mmformer.training.checkpoint import CheckpointError, check_checkpoint

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16": torch.bfloat16,
                    "16": torch.float16, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def apply_fsdp(model: nn.Module, mesh: Any, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` (an MMFormer) in place with FSDP2: one unit per block, then the root.

    Args:
        model: has a ``blocks`` ModuleList.
        mesh: 1-D data-parallel ``DeviceMesh`` over which parameters are sharded.
        param_dtype: None = compute in the parameters' dtype (fp32). ``torch.bfloat16`` /
            ``torch.float16`` = FSDP2 ``MixedPrecisionPolicy``: the all-gathered parameters are
            cast to this dtype for forward/backward, gradients are reduced in fp32 and the
            sharded master parameters (what the optimizer updates) stay fp32.
        reshard_after_forward: free the gathered block weights after each forward (ZeRO-3);
            False keeps them until backward (ZeRO-2 like: more memory, less communication).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # FSDP2 cannot shard 0-d parameters (the logit scale): keep them replicated, with their
    # gradient averaged over the data-parallel ranks like FSDP's reduce-scatter does
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for p in scalars:
        p.register_post_accumulate_grad_hook(_AverageGrad(mesh.get_group()))
    # the root's parameters are gathered for the whole step anyway (embeddings at the start,
    # projections at the end): no point in resharding them between forward and backward
    fully_shard(model, reshard_after_forward=False, ignored_params=scalars or None, **kwargs)
    return model


class _AverageGrad:
    """Post-accumulate-grad hook: all-reduce (mean) a replicated parameter's gradient."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, p: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group)
        p.grad.div_(dist.get_world_size(self.group))


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` was sharded by :func:`apply_fsdp` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for parameters (its shards under FSDP) and optimizer state."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    opt += local(v).numel() * local(v).element_size()
    return {"params": params, "optimizer": opt}


class ShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2 data parallelism (optionally x tensor parallelism).

    Differences from the parent:

    - ``tensor_parallel_size`` defaults to 1 and ``data_parallel_size`` to "auto" = every process
      (``num_nodes * devices / tensor_parallel_size``), so ``--trainer.devices N`` and
      ``--trainer.num_nodes M`` shard over all N*M processes. (The parent's "auto" puts the
      devices of a node into the tensor-parallel group.)
    - sharded checkpoints are written into ``.NAME.tmp-*`` beside the target and renamed once
      every rank has written its shard, so a killed run never leaves a half-written checkpoint
      under the final name;
    - loading checks the checkpoint first and names the file and what is wrong with it.
    """

    def __init__(self, data_parallel_size: int | Literal["auto"] = "auto",
                 tensor_parallel_size: int | Literal["auto"] = 1,
                 save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        tp = self._tensor_parallel_size
        if tp == "auto":
            tp = self._tensor_parallel_size = self.num_processes
        if world % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the {world} processes "
                             f"(num_nodes={self.num_nodes} x devices={self.num_processes})")
        if self._data_parallel_size == "auto":
            self._data_parallel_size = world // tp
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        tmp = final.parent / f".{final.name}.tmp-{os.getpid() if self.global_rank == 0 else 0}"
        tmp = Path(self.broadcast(str(tmp)))
        if self.global_rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        self.barrier("mmformer_ckpt_tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("mmformer_ckpt_written")
        if self.global_rank == 0:
            _replace_dir(tmp, final)
        self.barrier("mmformer_ckpt_renamed")

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint(self.broadcast(str(checkpoint_path)))  # also proves it loads with weights_only=True
        if weights_only is False:
            raise CheckpointError(f"{checkpoint_path}: mmformer loads checkpoints with weights_only=True only")
        return super().load_checkpoint(checkpoint_path, weights_only=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final`` (replacing a file or folder there)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
