"""FSDP2 under Lightning's ModelParallelStrategy on CPU (gloo, 2 processes) equals one process.

One spawn of 2 ranks does: fit (global batch 8 = 2 x 4, a 5-step schedule) and stop after step 3
with a sharded checkpoint there, then a fresh module resumes from that checkpoint to step 5. The single-process reference
fits 5 steps on batches of 8 in the same order. Checked, fp32:

- losses of every step equal (rel 1e-5): the contrastive loss of each rank sees the negatives of
  both ranks (a per-rank loss over 4 pairs would differ, also checked);
- parameters after step 5 equal (atol 2e-5, rtol 1e-4; the key bias, whose true gradient is 0,
  excluded), so gradients are gathered, routed and reduced right;
- contrastive accumulation (2 micro-batches of 2 per rank) under FSDP gives the same steps;
- activation checkpointing per block (``grad_checkpointing``) under FSDP gives the same steps;
- ``bf16-mixed``: FSDP2 gathers parameters in bf16 for compute; the sharded master weights and
  the reduced gradients are fp32;
- the sharded checkpoint is one folder with a shard per rank; ``export_checkpoint`` turns it
  into a ``save_pretrained`` folder holding exactly the step-3 weights; a truncated shard gives
  a ``CheckpointError`` naming the file.
"""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from train_helpers import LossRecorder, StopAt, free_port, full_params, init_rank_env, make_loader, make_module, trainer

from mmformer.losses import clip_loss
from mmformer.model import MMFormer
from mmformer.training.checkpoint import CheckpointError, ExactResume, check_checkpoint, export_checkpoint

WORLD = 2
LOCAL_B = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _fsdp_worker(rank, port, root, out):
    init_rank_env(rank, port)
    from mmformer.training.distributed import ShardedStrategy

    root = Path(root)
    ckpt_cb = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    rec = LossRecorder()
    module = make_module()
    tr = trainer(root, 5, [rec, ExactResume(), StopAt(3), ckpt_cb], strategy=ShardedStrategy(), devices=WORLD)
    tr.fit(module, make_loader(LOCAL_B, WORLD, rank))
    shard_numel = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.model.parameters())
    params3 = full_params(module)

    rec2 = LossRecorder()
    module2 = make_module(lr=1e-3)
    tr2 = trainer(
        root,
        5,
        [rec2, ExactResume(), ModelCheckpoint(dirpath=root / "ckpt2")],
        strategy=ShardedStrategy(),
        devices=WORLD,
    )
    tr2.fit(module2, make_loader(LOCAL_B, WORLD, rank), ckpt_path=str(root / "ckpt" / "last.ckpt"))
    params5 = full_params(module2)

    # contrastive accumulation under FSDP: 2 ranks x 2 micro-batches x 2 = the same 8 pairs a step
    rec3 = LossRecorder()
    module3 = make_module(contrastive_accum=2)
    tr3 = trainer(root, 5, [rec3, StopAt(3)], strategy=ShardedStrategy(), devices=WORLD)
    tr3.fit(module3, make_loader(LOCAL_B // 2, WORLD, rank))
    accum_params3 = full_params(module3)

    # bf16-mixed: FSDP2 gathers block weights in bf16 for compute; shards and gradients stay fp32
    module4 = make_module()
    seen = []
    module4.model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    grad_dtypes = []
    rec4 = LossRecorder()
    tr4 = trainer(
        root, 1, [rec4, _GradDtypes(grad_dtypes)], strategy=ShardedStrategy(), devices=WORLD, precision="bf16-mixed"
    )
    tr4.fit(module4, make_loader(LOCAL_B, WORLD, rank))
    # activation checkpointing per block under FSDP: same steps
    rec5 = LossRecorder()
    module5 = make_module(model_config_extra={"grad_checkpointing": True})
    trainer(root, 5, [rec5, StopAt(2)], strategy=ShardedStrategy(), devices=WORLD).fit(
        module5, make_loader(LOCAL_B, WORLD, rank)
    )
    out[rank] = {
        "ckpt_losses": rec5.losses,
        "losses": rec.losses + rec2.losses,
        "params3": params3,
        "params5": params5,
        "shard_numel": shard_numel,
        "accum_losses": rec3.losses,
        "accum_params3": accum_params3,
        "bf16": {
            "compute": sorted(set(map(str, seen))),
            "grads": sorted(set(grad_dtypes)),
            "params": sorted({str(p.dtype) for p in module4.model.parameters()}),
            "loss": rec4.losses,
        },
    }


class _GradDtypes(L.Callback):
    def __init__(self, sink):
        self.sink = sink

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sink.extend(str(p.grad.dtype) for p in pl_module.model.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out = mp.Manager().dict()
    # spawn, not fork: a forked worker inherits the locks of the test process's threads (earlier
    # tests start threads); a forked worker of the tensor-parallel test once hung for minutes in the
    # resume's sharded checkpoint load, which these workers do too. Spawning costs the children
    # an import of torch and Lightning each.
    mp.start_processes(_fsdp_worker, args=(free_port(), str(root), out), nprocs=WORLD, join=True, start_method="spawn")
    return root, dict(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    rec = LossRecorder()
    module = make_module()
    tr = trainer(tmp_path_factory.mktemp("ref"), 5, [rec])
    tr.fit(module, make_loader(LOCAL_B * WORLD))
    return rec.losses, full_params(module)


def test_two_rank_fsdp_equals_one_process(fsdp_run, reference):
    _, out = fsdp_run
    ref_losses, ref_params = reference
    assert len(ref_losses) == 5
    for rank in range(WORLD):
        assert out[rank]["losses"] == pytest.approx(ref_losses, rel=1e-5), rank
    for name, ref in ref_params.items():
        for rank in range(WORLD):
            got, want = out[rank]["params5"][name], ref
            if name.endswith("attn.qkv.bias"):
                # the key bias has an exactly-zero gradient (softmax ignores a per-query constant);
                # Adam turns its rounding noise (~1e-10) into +-lr steps, so only q and v are compared
                d = ref.shape[0] // 3
                got, want = torch.cat([got[:d], got[2 * d :]]), torch.cat([want[:d], want[2 * d :]])
            torch.testing.assert_close(
                got, want, atol=2e-5, rtol=1e-4, msg=lambda m, name=name, rank=rank: f"{name} (rank {rank}): {m}"
            )
    # parameters really are sharded: each rank holds about half
    total = sum(p.numel() for p in ref_params.values())
    for rank in range(WORLD):
        assert 0.45 * total < out[rank]["shard_numel"] < 0.55 * total


def test_contrastive_accumulation_under_fsdp_equals_one_big_batch(fsdp_run, reference):
    _, out = fsdp_run
    ref_losses, _ = reference
    for rank in range(WORLD):
        assert out[rank]["accum_losses"] == pytest.approx(ref_losses[:3], rel=1e-5), rank
        for name, p in out[rank]["accum_params3"].items():
            if not name.endswith("attn.qkv.bias"):
                torch.testing.assert_close(
                    p, out[rank]["params3"][name], atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
                )


def test_activation_checkpointing_under_fsdp_gives_the_same_steps(fsdp_run, reference):
    _, out = fsdp_run
    for rank in range(WORLD):
        assert out[rank]["ckpt_losses"] == pytest.approx(reference[0][:2], rel=1e-5)


def test_bf16_mixed_gathers_bf16_keeps_fp32_master_weights_and_grads(fsdp_run, reference):
    _, out = fsdp_run
    for rank in range(WORLD):
        r = out[rank]["bf16"]
        assert r["compute"] == ["torch.bfloat16"]  # the gathered qkv weight seen in forward
        assert r["params"] == ["torch.float32"] and r["grads"] == ["torch.float32"]
        assert r["loss"][0] == pytest.approx(reference[0][0], abs=2e-2)  # bf16 rounding only


def test_per_rank_negatives_would_give_a_different_loss():
    """The check above can tell a gathered loss from per-rank losses: they differ at init."""
    module = make_module()
    loader = make_loader(LOCAL_B * WORLD)
    batch = next(iter(loader))
    with torch.no_grad():
        out = module(batch["images"], batch["input_ids"], batch["attention_mask"])
        full = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], batch["concepts"])
        halves = [
            clip_loss(out["image_embeds"][s], out["text_embeds"][s], out["logit_scale"], batch["concepts"][s])
            for s in (slice(0, LOCAL_B), slice(LOCAL_B, None))
        ]
    assert abs(full.item() - sum(h.item() for h in halves) / 2) > 1e-2


def test_sharded_checkpoint_exports_to_save_pretrained(fsdp_run, tmp_path):
    root, out = fsdp_run
    ckpt = root / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    assert len(list(ckpt.glob("*.distcp"))) == WORLD
    assert not list((root / "ckpt").glob(".*tmp*"))  # no temp folder left behind
    export_checkpoint(ckpt, tmp_path / "model")
    model = MMFormer.from_pretrained(tmp_path / "model")
    assert model.tokenizer is not None
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, out[0]["params3"][name], atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_truncated_shard_is_a_clear_error(fsdp_run, tmp_path):
    import shutil

    root, _ = fsdp_run
    bad = tmp_path / "bad.ckpt"
    shutil.copytree(root / "ckpt" / "last.ckpt", bad)
    shard = sorted(bad.glob("*.distcp"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated"):
        check_checkpoint(bad)
    (bad / "meta.pt").unlink()
    with pytest.raises(CheckpointError, match="no meta.pt"):
        export_checkpoint(bad, tmp_path / "out")
