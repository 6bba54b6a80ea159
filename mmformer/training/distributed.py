"""Scale-out training: FSDP2 sharding of an :class:`~mmformer.model.MMFormer` and the Lightning strategy.

- :func:`apply_fsdp` shards the model with FSDP2 (``torch.distributed.fsdp.fully_shard``): every
  multiway block is one unit (its shared attention weights live inside it, so they are gathered
  once per block and used by both modalities), then the root takes the embeddings, final norms,
  projections and the logit scale.
- :class:`ShardedStrategy` is Lightning's ``ModelParallelStrategy`` with data-parallel defaults
  (``tensor_parallel_size=1``, ``data_parallel_size`` = every process), and sharded checkpoints
  written atomically (into a temporary folder that is renamed once every rank has finished) and
  checked before loading (:func:`mmformer.training.checkpoint.check_checkpoint`).

- :func:`apply_tensor_parallel` splits every block by heads over a tensor-parallel mesh (DTensor):
  each rank holds whole heads of q, k and v, its rows of the output projection's input, and its
  slice of the FFN; composed with FSDP2 over the data-parallel mesh of a 2-D (data x tensor) mesh.

Works on CPU (gloo) and GPU (NCCL) alike.

Tensor parallelism and the fused qkv weight. ``attn.qkv.weight`` stores q, k and v one after the
other (rows ``[q; k; v]``, (3D, D_in): the layout of timm checkpoints and of ``model.safetensors``).
A plain row split (``Shard(0)``) would give rank 0 all of q and half of k. The weight is instead
placed with DTensor's strided shard ``_StridedShard(0, split_factor=3)``: the rows are first split
into the 3 blocks q, k, v and each block is then split over the ranks, so rank r holds
``[q_r; k_r; v_r]`` (whole heads; the local matmul gives its heads' q, k and v side by side, which
:func:`~mmformer.layers.attention.attend` reads with ``heads / tp`` heads). The parameter keeps its
name and global shape. Distributed checkpoints cannot store a strided shard (a rank's rows are
three separate boxes), so :class:`ShardedStrategy` hands the checkpoint writer these tensors
redistributed to plain row shards and converts them back when loading: the sharded checkpoint
holds exactly what a run without tensor parallelism holds, and exports the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from mmformer.model import MMFormer
from mmformer.training.checkpoint import CheckpointError, check_checkpoint, is_sharded_checkpoint

log = logging.getLogger(__name__)

PRECISION_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "bf16": torch.bfloat16,
    "16": torch.float16,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
}


TP_DIM = "tensor_parallel"  # the name of the tensor-parallel dimension of every mesh used here
HEADS_PLACEMENT = _StridedShard(0, split_factor=3)  # rows [q; k; v]: rank r holds [q_r; k_r; v_r]


def _parts(module: nn.Module) -> list[nn.Module]:
    """The modules of a shared-or-per-modality part (one module, or a ModuleDict's values)."""
    return list(module.values()) if isinstance(module, nn.ModuleDict) else [module]


class HeadsParallelLinear(nn.Linear):
    """A fused qkv ``nn.Linear`` split by heads over a tensor-parallel mesh (made by
    :func:`apply_tensor_parallel`, which sets this class on the module; the parameters keep their
    names and global shapes).

    The weight (3D, D_in) is placed as :data:`HEADS_PLACEMENT`. The bias (3D,) is kept whole
    (``Replicate``) and taken as this rank's ``[q_r; k_r; v_r]`` slice in forward (a local slice;
    in backward the slices' gradients are all-gathered), so that FSDP2 can shard it over the
    data-parallel ranks like any other parameter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None:
            bias = bias.redistribute(bias.device_mesh, [HEADS_PLACEMENT])
        return F.linear(x, self.weight, bias)


def _shard_heads(name: str, module: nn.Module, mesh: Any) -> None:
    """``distribute_module`` partition of a fused qkv Linear (see :class:`HeadsParallelLinear`)."""
    if name:  # a Linear has no children; nothing below it to place
        return
    for pname, p in list(module.named_parameters(recurse=False)):
        placement = HEADS_PLACEMENT if pname == "weight" else Replicate()
        module.register_parameter(
            pname, nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]), requires_grad=p.requires_grad)
        )


def _replicated_input(module: nn.Module, inputs: tuple, mesh: Any) -> tuple:
    """(B, T, D) local input, the same on every rank -> a Replicate DTensor; in backward its
    gradient (a partial sum over the ranks' heads) is all-reduced."""
    x = inputs[0]
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    return (x, *inputs[1:])


def _local_output(module: nn.Module, output: Any, mesh: Any) -> torch.Tensor:
    """This rank's (B, T, 3 D / tp) q, k, v of its heads, as a plain tensor."""
    return output.to_local()


def apply_tensor_parallel(model: MMFormer, mesh: Any) -> MMFormer:
    """Split every block of ``model`` by heads over the 1-D tensor-parallel ``mesh``, in place.

    Per block, for every modality's part (shared or not, see ``ModelConfig.share``):

    - ``attn.qkv`` (column-parallel by heads): weight and bias placed as :data:`HEADS_PLACEMENT`,
      so rank r computes q, k and v of heads ``r*H/tp .. (r+1)*H/tp`` from the replicated input;
    - ``attn.proj`` (row-parallel): its input columns of those heads, outputs summed over ranks;
    - ``mlp.fc1`` column-parallel, ``mlp.fc2`` row-parallel (Megatron's FFN split);
    - norms, embeddings, the final norms, projections and the logit scale stay replicated: every
      rank computes them identically (their gradients agree because the column-parallel inputs'
      gradients are all-reduced).

    ``attn.heads`` becomes ``heads / tp`` (the heads this rank computes). Parameter names and
    global shapes do not change. Needs ``heads`` and the FFN width divisible by the mesh size.
    """
    tp = mesh.size()
    c = model.config
    if c.block_heads is not None:
        raise ValueError(
            f"tensor parallelism splits every block's {c.heads} heads evenly; this model's blocks were "
            f"pruned to {c.block_heads} heads: train or fine-tune it without tensor_parallel_size"
        )
    problems = [f"heads={c.heads}" for _ in [0] if c.heads % tp] + [
        f"FFN width={c.mlp_hidden}" for _ in [0] if c.mlp_hidden % tp
    ]
    if problems:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide {' and '.join(problems)} "
            "(each rank holds whole heads and an equal slice of the FFN)"
        )
    if mesh.mesh_dim_names != (TP_DIM,):
        raise ValueError(f"apply_tensor_parallel needs a 1-D mesh named ({TP_DIM!r},), got {mesh.mesh_dim_names}")
    for block in model.blocks:
        attn = block.attn
        for qkv in _parts(attn.qkv):
            if type(qkv) is not nn.Linear:
                raise TypeError(
                    f"tensor parallelism expects the fused qkv to be an nn.Linear, got {type(qkv).__name__}"
                )
            qkv.__class__ = HeadsParallelLinear
            distribute_module(qkv, mesh, _shard_heads, _replicated_input, _local_output)
        for proj in _parts(attn.proj):
            parallelize_module(proj, mesh, RowwiseParallel())
        for mlp in _parts(block.mlp):
            parallelize_module(mlp, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        attn.heads = c.heads // tp
    return model


def is_heads_sharded(t: Any) -> bool:
    """True for a DTensor placed by heads (a strided shard on the tensor-parallel mesh dimension)."""
    if not isinstance(t, DTensor):
        return False
    names = t.device_mesh.mesh_dim_names or ()
    return any(
        isinstance(p, _StridedShard) and i < len(names) and names[i] == TP_DIM for i, p in enumerate(t.placements)
    )


def _as_row_shards(t: Any) -> Any:
    """A heads-sharded DTensor redistributed so that each rank holds one box of rows (what a
    distributed checkpoint can store); anything else unchanged."""
    if not is_heads_sharded(t):
        return t
    names = t.device_mesh.mesh_dim_names
    placements = [
        Shard(p.dim) if isinstance(p, _StridedShard) and names[i] == TP_DIM else p for i, p in enumerate(t.placements)
    ]
    return t.redistribute(t.device_mesh, placements)


def _fsdp_placement(p: nn.Parameter) -> Any:
    """FSDP2 ``shard_placement_fn``: a heads-sharded qkv weight is sharded over the data-parallel
    ranks along its input dimension (its rows are already split by heads); others along dim 0."""
    return Shard(1) if is_heads_sharded(p) else None


def apply_fsdp(
    model: nn.Module, mesh: Any, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> nn.Module:
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

    kwargs: dict[str, Any] = {"mesh": mesh, "shard_placement_fn": _fsdp_placement}
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
    - loading checks the checkpoint first and names the file and what is wrong with it;
    - with ``tensor_parallel_size`` > 1 (the module applies :func:`apply_tensor_parallel`), the
      heads-sharded qkv weights and their AdamW moments go to the checkpoint as plain row shards
      and are placed back by heads on load: the folder holds what a run without tensor
      parallelism holds (``attn.qkv.weight`` (3D, D)).
    """

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int | Literal["auto"] = 1,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        tp = self._tensor_parallel_size
        if tp == "auto":
            tp = self._tensor_parallel_size = self.num_processes
        if world % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide the {world} processes "
                f"(num_nodes={self.num_nodes} x devices={self.num_processes})"
            )
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
        path = check_checkpoint(self.broadcast(str(checkpoint_path)))  # also proves it loads with weights_only=True
        if weights_only is False:
            raise CheckpointError(f"{checkpoint_path}: mmformer loads checkpoints with weights_only=True only")
        if not (_heads_sharded(self.model) and is_sharded_checkpoint(path)):
            return super().load_checkpoint(checkpoint_path, weights_only=True)
        return self._load_heads_sharded(path)

    # ---- tensor parallelism: heads-sharded tensors go to and from checkpoints as row shards -----
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not (self._save_distributed_checkpoint and _heads_sharded(self.model)):
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {k: _as_row_shards(v) for k, v in get_model_state_dict(self.model).items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not (self._save_distributed_checkpoint and _heads_sharded(self.model)):
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return _map_optimizer_state(
            get_optimizer_state_dict(self.model, getattr(optimizer, "_optimizer", optimizer)),
            lambda k, n, v: _as_row_shards(v),
        )

    def _load_heads_sharded(self, path: Path) -> dict[str, Any]:
        """Lightning's sharded load, with heads-sharded tensors read as row shards and placed back."""
        from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_load
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        own = get_model_state_dict(self.model)
        rows = {"state_dict": {k: _as_row_shards(v) for k, v in own.items()}}
        _distributed_checkpoint_load(rows, path)
        self.model.load_state_dict(
            {k: _placed_like(v, own[k]) for k, v in rows["state_dict"].items()},
            strict=self.lightning_module.strict_loading,
        )
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            own_opt = get_optimizer_state_dict(self.model, optimizer)
            rows = {key: _map_optimizer_state(own_opt, lambda k, n, v: _as_row_shards(v))}
            _distributed_checkpoint_load(rows, path)
            placed = _map_optimizer_state(rows[key], lambda k, n, v, own=own_opt: _placed_like(v, own["state"][k][n]))
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=placed, options=StateDictOptions(cpu_offload=True)
            )
        return torch.load(path / _METADATA_FILENAME, weights_only=True)


def _heads_sharded(model: nn.Module | None) -> bool:
    return model is not None and any(is_heads_sharded(p) for p in model.parameters())


def _placed_like(t: Any, like: Any) -> Any:
    """``t`` redistributed to the placements of ``like`` (a DTensor), or ``t`` unchanged."""
    if isinstance(like, DTensor) and isinstance(t, DTensor) and t.placements != like.placements:
        return t.redistribute(like.device_mesh, like.placements)
    return t


def _map_optimizer_state(state: dict[str, Any], fn: Any) -> dict[str, Any]:
    """A ``get_optimizer_state_dict`` result with ``fn(param_key, name, value)`` applied to every
    per-parameter state value (moments, step)."""
    return {**state, "state": {k: {n: fn(k, n, v) for n, v in per.items()} for k, per in state["state"].items()}}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final`` (replacing a file or folder there)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
