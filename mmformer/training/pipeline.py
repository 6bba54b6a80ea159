"""Pipeline parallelism: the blocks split into stages over ranks (``torch.distributed.pipelining``),
hosted in Lightning by a strategy.

- :class:`PipelineStageModule`: one stage of an :class:`~mmformer.model.MMFormer`: blocks
  ``lo:hi`` for BOTH modalities (the image tokens and the text tokens with their padding mask
  pass through every stage); the first stage embeds, the last applies the final norms, pools and
  projects.
- :class:`PipelineStrategy`: a Lightning strategy (``ModelParallelStrategy`` family) over a
  (data x pipeline) mesh. It splits the module's model into this rank's stage (the other stages'
  weights are dropped on this rank), optionally shards the stage with FSDP2 over the
  data-parallel ranks, and runs each training step as a GPipe or 1F1B schedule over
  ``microbatches`` micro-batches.

Why a strategy. A pipeline schedule runs forward AND backward of every micro-batch itself
(interleaved across stages for 1F1B), so the module's ``training_step`` (forward, loss) followed
by ``loss.backward()`` cannot host it. The strategy owns both halves: its ``training_step`` runs
the forward-only pass and the loss (below), its ``backward`` runs the training schedule (after
Lightning has zeroed the gradients). The module keeps the optimizer, LR schedule, non-finite
policy, logging and checkpoint contents, and the YAML only names the strategy (``train/pp.yaml``),
so ``mmformer fit --config`` runs it like any other recipe with an unchanged ``MMFormerModule``.

The contrastive loss over all micro-batches. CLIP's loss of one micro-batch depends on the
embeddings of every other micro-batch (its negatives), but a schedule takes each micro-batch's
loss on the last stage as soon as that micro-batch leaves it. Each step therefore runs the
contrastive-accumulation scheme (:func:`mmformer.losses.contrastive_accumulation`) through the
pipeline: (1) a forward-only pass of the schedule (``eval``) gives the last stage every
micro-batch's embeddings (the cache) and the loss of the whole batch; (2) the training pass runs
the schedule with a loss function that puts micro-batch j's embeddings, with gradient, into the
cache and takes the loss of the whole batch, so only j's rows carry gradient and the
micro-batches' gradients sum to the gradient of one big batch (``scale_grads=False``). The logit
scale enters with gradient in micro-batch 0 only. Cost: one extra forward (as for
``contrastive_accum``). With data parallelism the last stages gather the embeddings of every
data-parallel rank, as :func:`~mmformer.losses.clip_loss` does under FSDP.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_load
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies.parallel import ParallelStrategy
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from mmformer.losses import clip_loss
from mmformer.model import MMFormer
from mmformer.training.checkpoint import CheckpointError, check_checkpoint, is_sharded_checkpoint
from mmformer.training.distributed import PRECISION_DTYPES, ShardedStrategy, apply_fsdp

log = logging.getLogger(__name__)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_bounds(depth: int, stages: int) -> list[tuple[int, int]]:
    """Blocks ``[lo, hi)`` of each of ``stages`` stages: as equal as possible, earlier stages one
    more when ``depth`` does not divide (the first and last stages also embed / project)."""
    if not 1 <= stages <= depth:
        raise ValueError(
            f"pipeline_parallel_size={stages} needs 1 <= stages <= depth={depth} (one block or more per stage)"
        )
    size, extra = divmod(depth, stages)
    bounds, lo = [], 0
    for s in range(stages):
        hi = lo + size + (s < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def keep_stage(model: MMFormer, lo: int, hi: int, first: bool, last: bool) -> None:
    """Drop, in place, every part of ``model`` that the stage [lo, hi) does not run: other blocks,
    the embeddings (unless ``first``), the final norms, projections and logit scale (unless
    ``last``). Parameter names of what is kept do not change (checkpoints of the stages merge
    into the whole model)."""
    c = model.config
    if c.document_expert or c.fusion_latents:
        raise ValueError(
            "pipeline parallelism trains the image-text contrastive model; long-document parts "
            "(document_expert, fusion) are not supported"
        )
    for i in range(len(model.blocks)):
        if not lo <= i < hi:
            model.blocks[i] = None
    if not first:
        model.patch_embed = model.token_embed = model.norm_pre = None
        model.cls_token = None
        if isinstance(model.pos_embed, nn.Parameter):
            model.pos_embed = None
    if not last:
        model.norm = model.image_proj = model.text_proj = None
        model.logit_scale = None


class PipelineStageModule(nn.Module):
    """Blocks ``lo:hi`` of ``model`` for both modalities (see the module docstring).

    Inputs: first stage ``(images (B,3,H,W), input_ids (B,T), attention_mask (B,T))``; later
    stages ``(image states (B,1+N,D), text states (B,T,D), mask (B,T) int64)``. Outputs: the next
    stage's inputs, or on the last stage ``(image embeddings (B,E), text embeddings (B,E))``.
    """

    def __init__(self, model: MMFormer, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.model = model
        self.blocks = nn.ModuleList(model.blocks[i] for i in range(lo, hi))
        self.first, self.last = first, last

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        if self.first:
            mask = m._text_mask(b, c)
            x_img, x_txt = m.patch_tokens(a), m.text_tokens(b)
        else:
            x_img, x_txt, mask = a, b, c.bool()
        x_img = m.run_blocks(x_img, "image", None, self.blocks)
        x_txt = m.run_blocks(x_txt, "text", mask, self.blocks)
        if self.last:
            return m.project_image(m.norm["image"](x_img)), m.project_text(m.norm["text"](x_txt), mask)
        return x_img, x_txt, mask.long()  # int64: the mask crosses to the next stage without gradient

    def logit_scale(self) -> torch.Tensor:
        """exp(s) clamped, as :meth:`MMFormer.forward` gives it (last stage only)."""
        return self.model.logit_scale.exp().clamp(max=self.model.config.logit_scale_max)


class PipelineRunner:
    """The schedules of one stage (one per micro-batch size pattern) and the two-pass step."""

    def __init__(
        self,
        stage_module: PipelineStageModule,
        stage_index: int,
        num_stages: int,
        group: Any,
        device: torch.device,
        microbatches: int,
        schedule: str,
        loss_group: Any,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} must be one of {sorted(SCHEDULES)}")
        if microbatches < num_stages and schedule == "1f1b":
            raise ValueError(f"the 1F1B schedule needs microbatches >= stages ({microbatches} < {num_stages})")
        self.stage_module, self.stage_index, self.num_stages = stage_module, stage_index, num_stages
        self.group, self.device, self.microbatches, self.schedule = group, device, microbatches, schedule
        self.loss_group = loss_group
        self.last_rank = dist.get_global_rank(group, num_stages - 1)
        self._schedules: dict[tuple[int, ...], Any] = {}
        self._cache: dict[str, Any] = {}
        self._pending: tuple | None = None

    @property
    def first(self) -> bool:
        return self.stage_index == 0

    @property
    def last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def _get(self, sizes: tuple[int, ...]) -> Any:
        if sizes not in self._schedules:  # stages learn the activation shapes at their first step
            stage = PipelineStage(self.stage_module, self.stage_index, self.num_stages, self.device, group=self.group)
            self._schedules[sizes] = SCHEDULES[self.schedule](stage, len(sizes), loss_fn=self._loss, scale_grads=False)
        return self._schedules[sizes]

    def split(self, batch: dict[str, Any]) -> tuple[tuple[int, ...], list[tuple] | None]:
        b = batch["images"].shape[0]
        n = self.microbatches
        if b % n:
            raise ValueError(f"a batch of {b} does not split into microbatches={n} equal micro-batches")
        sizes = (b // n,) * n
        if not self.first:
            return sizes, None
        # texts padded to the context length: the activations sent between stages keep one shape
        # (the stages learn it at their first step); padding is masked, the embeddings do not change
        c = self.stage_module.model.config
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if mask is None:
            mask = ids != c.pad_id
        pad = c.context_length - ids.shape[1]
        if pad > 0:
            ids = torch.nn.functional.pad(ids, (0, pad), value=c.pad_id)
            mask = torch.nn.functional.pad(mask.bool(), (0, pad), value=False)
        parts = [torch.split(t, b // n) for t in (batch["images"], ids, mask)]
        return sizes, [tuple(p[j] for p in parts) for j in range(n)]

    def _loss(self, output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor | None) -> torch.Tensor:
        """Schedule loss of micro-batch ``target``: the whole batch's loss with its rows in the cache."""
        img_j, txt_j = output
        if target is None:  # the forward-only pass: only the outputs are wanted
            return img_j.new_zeros(())
        c = self._cache
        j = int(target)
        lo, hi = c["bounds"][j]
        img = torch.cat([c["img"][:lo], img_j, c["img"][hi:]])
        txt = torch.cat([c["txt"][:lo], txt_j, c["txt"][hi:]])
        scale = self.stage_module.logit_scale()
        return clip_loss(img, txt, scale if j == 0 else scale.detach(), c["positives"], group=self.loss_group)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward only: the embeddings of the batch, sent from the last stage to every stage."""
        sizes, arg_mbs = self.split(batch)
        with torch.no_grad():
            out = self._get(sizes).eval(arg_mbs=arg_mbs, target_mbs=[None] * len(sizes))
        b, e = sum(sizes), self.stage_module.model.config.embed_dim
        if self.last:
            img, txt = (t.float().contiguous() for t in out)
            scale = self.stage_module.logit_scale().detach().float().reshape(1)
        else:
            img = torch.empty(b, e, device=self.device)
            txt, scale = torch.empty_like(img), torch.empty(1, device=self.device)
        for t in (img, txt, scale):
            dist.broadcast(t, src=self.last_rank, group=self.group)
        return {"image_embeds": img, "text_embeds": txt, "logit_scale": scale[0]}

    def cache_step(self, batch: dict[str, Any], positives: torch.Tensor | None) -> torch.Tensor:
        """Pass 1 of a training step: the forward-only schedule; the last stage keeps every
        micro-batch's embeddings. Returns the loss of the whole batch (detached, the same on every
        rank of the pipeline)."""
        sizes, arg_mbs = self.split(batch)
        schedule = self._get(sizes)
        with torch.no_grad():
            out = schedule.eval(arg_mbs=arg_mbs, target_mbs=[None] * len(sizes))
        loss = torch.zeros((), device=self.device)
        if self.last:
            img, txt = out
            ends = torch.tensor(sizes).cumsum(0).tolist()
            self._cache = {
                "img": img.detach(),
                "txt": txt.detach(),
                "positives": positives,
                "bounds": [(ends[j] - sizes[j], ends[j]) for j in range(len(sizes))],
            }
            with torch.no_grad():
                loss = clip_loss(img, txt, self.stage_module.logit_scale(), positives, group=self.loss_group).float()
        self._pending = (sizes, arg_mbs)
        dist.broadcast(loss, src=self.last_rank, group=self.group)
        return loss

    def backward_step(self) -> None:
        """Pass 2: the training schedule (GPipe or 1F1B) over the micro-batches of the last
        :meth:`cache_step`; gradients accumulate into this stage's parameters."""
        sizes, arg_mbs = self._pending
        targets = [torch.tensor(j) for j in range(len(sizes))] if self.last else None
        self._get(sizes).step(arg_mbs=arg_mbs, target_mbs=targets, return_outputs=False)
        self._cache, self._pending = {}, None


class PipelineStrategy(ShardedStrategy):
    """Pipeline parallelism (x FSDP2 data parallelism) for :class:`~mmformer.training.module.MMFormerModule`.

    Args:
        pipeline_parallel_size: stages (ranks per pipeline); ``"auto"`` = every process of a node.
        data_parallel_size: pipelines; ``"auto"`` = processes / ``pipeline_parallel_size``. With
            more than one, each stage is sharded with FSDP2 over the data-parallel ranks
            (:func:`~mmformer.training.distributed.apply_fsdp`: each block one unit, then the
            stage's root) and the last stages' loss gathers the embeddings of every pipeline.
        microbatches: micro-batches per step (the loader's batch must divide into them).
        schedule: ``"1f1b"`` (one forward, one backward: at most ``stages`` micro-batches' activations
            alive) or ``"gpipe"`` (all forwards, then all backwards).

    Mesh ``(data_parallel, pipeline_parallel)``: the ranks of one pipeline are consecutive and read
    the same batch (``distributed_sampler_kwargs`` follow the data-parallel rank). Validation and
    test run the forward-only schedule and broadcast the embeddings to every stage. Gradient
    clipping by norm is not supported (each stage would clip by its own norm).
    """

    def __init__(
        self,
        pipeline_parallel_size: int | Literal["auto"] = "auto",
        data_parallel_size: int | Literal["auto"] = "auto",
        microbatches: int = 4,
        schedule: str = "1f1b",
        **kwargs: Any,
    ) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1, **kwargs)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} must be one of {sorted(SCHEDULES)}")
        if int(microbatches) < 1:
            raise ValueError(f"microbatches={microbatches} must be >= 1")
        self._pipeline_parallel_size = pipeline_parallel_size
        self.microbatches, self.schedule = int(microbatches), schedule
        self.runner: PipelineRunner | None = None

    def setup_environment(self) -> None:
        ParallelStrategy.setup_environment(self)  # not ModelParallelStrategy's: it builds a data x tensor mesh
        self._setup_distributed()
        world = self.world_size
        pp = self._pipeline_parallel_size
        if pp == "auto":
            pp = self._pipeline_parallel_size = self.num_processes
        dp = self._data_parallel_size
        if dp == "auto":
            dp = self._data_parallel_size = world // pp
        if pp * dp != world:
            raise ValueError(f"pipeline_parallel_size={pp} x data_parallel_size={dp} != {world} processes")
        self._device_mesh = init_device_mesh(
            self.root_device.type, (dp, pp), mesh_dim_names=("data_parallel", "pipeline_parallel")
        )
        # the module's configure_model sees no mesh (it would shard the whole model): the stage
        # is built and sharded in setup()
        self.lightning_module._device_mesh = None

    def setup(self, trainer: Any) -> None:
        module = self.lightning_module
        if not module.automatic_optimization:
            raise ValueError(
                "PipelineStrategy takes the micro-batches of a step itself (microbatches=); use contrastive_accum=1"
            )
        if getattr(module.hparams, "loss", "clip") != "clip":
            raise ValueError(
                f"loss={module.hparams.loss!r}: PipelineStrategy computes the CLIP loss on its last "
                "stage; use loss=clip"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                "gradient clipping is not supported with PipelineStrategy (each stage holds part of "
                "the gradient); remove gradient_clip_val"
            )
        if self.runner is None:
            self._build_stage(trainer)
        super().setup(trainer)

    def _build_stage(self, trainer: Any) -> None:
        module = self.lightning_module
        mesh = self.device_mesh
        pp_mesh, dp_mesh = mesh["pipeline_parallel"], mesh["data_parallel"]
        s, n = pp_mesh.get_local_rank(), pp_mesh.size()
        lo, hi = stage_bounds(module.model.config.depth, n)[s]
        keep_stage(module.model, lo, hi, s == 0, s == n - 1)
        stage = PipelineStageModule(module.model, lo, hi, s == 0, s == n - 1)
        if dp_mesh.size() > 1:
            precision = str(trainer.precision)
            dtype = PRECISION_DTYPES.get(precision) if module.hparams.fsdp_mixed_precision else None
            apply_fsdp(stage, dp_mesh, param_dtype=dtype, reshard_after_forward=module.hparams.reshard_after_forward)
        module.loss_group = dp_mesh.get_group()  # the stages of one pipeline hold the same samples
        self.runner = PipelineRunner(
            stage, s, n, pp_mesh.get_group(), self.root_device, self.microbatches, self.schedule, module.loss_group
        )
        log.info(
            "pipeline stage %d/%d: blocks %d..%d, %d micro-batches, %s schedule, %d data-parallel ranks",
            s + 1,
            n,
            lo,
            hi - 1,
            self.microbatches,
            self.schedule,
            dp_mesh.size(),
        )

    # ---- the step: training_step = forward-only pass + loss, backward = the training schedule ----
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch, batch_idx = args[0], args[1]
        module = self.lightning_module
        if batch is None or batch["images"].shape[0] == 0:
            return None
        positives = batch.get("concepts") if module.hparams.concept_positives else None
        with self.precision_plugin.train_step_context():
            loss = self.runner.cache_step(batch, positives)
        if not module._loss_is_finite(loss, batch_idx):
            return None  # no backward, no optimizer step
        module.log("train/loss", loss, prog_bar=True, batch_size=batch["images"].shape[0])
        # Lightning's closure wants a loss that requires grad; its gradient comes from backward()
        return loss.requires_grad_()

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Runs the pipeline schedule's forward and backward of every micro-batch (after Lightning
        zeroed the gradients), instead of ``closure_loss.backward()``."""
        with self.precision_plugin.train_step_context():
            self.runner.backward_step()
        return closure_loss.detach()

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context(), self._pipelined_forward():
            return self.lightning_module.validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context(), self._pipelined_forward():
            return self.lightning_module.test_step(*args, **kwargs)

    def _pipelined_forward(self) -> Any:
        """While active, the module's ``model(images, ids, mask)`` runs the forward-only schedule."""
        runner, model = self.runner, self.lightning_module.model

        class _Patch:
            def __enter__(self) -> None:
                model.forward = lambda images, input_ids, attention_mask=None: runner.forward(
                    {"images": images, "input_ids": input_ids, "attention_mask": attention_mask}
                )

            def __exit__(self, *exc: Any) -> None:
                del model.forward

        return _Patch()

    # ---- checkpoints: every stage writes its own parameters; the folder holds the whole model ----
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Flattened (keys per parameter name, hyper-parameters included), so that the stages'
        optimizer states do not collide in the checkpoint folder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(cpu_offload=True, flatten_optimizer_state_dict=True)
        return get_optimizer_state_dict(self.model, getattr(optimizer, "_optimizer", optimizer), options=options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = check_checkpoint(self.broadcast(str(checkpoint_path)))  # also proves it loads with weights_only=True
        if weights_only is False:
            raise CheckpointError(f"{checkpoint_path}: mmformer loads checkpoints with weights_only=True only")
        if not is_sharded_checkpoint(path):
            raise ValueError(f"{path}: PipelineStrategy resumes from sharded checkpoint folders only")
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        state = {"state_dict": get_model_state_dict(self.model)}
        _distributed_checkpoint_load(state, Path(path))
        self.model.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            state = {key: get_optimizer_state_dict(self.model, optimizer, options=options)}
            _distributed_checkpoint_load(state, Path(path))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[key], options=options)
        return torch.load(Path(path) / _METADATA_FILENAME, weights_only=True)
