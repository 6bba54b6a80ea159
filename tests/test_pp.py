"""Pipeline parallelism (2 stages on CPU/gloo, ``torch.distributed.pipelining``) equals one process.

The one-process reference trains 5 AdamW steps on batches of 8 (fp32). Two ranks, one block each
(the first also embeds, the last also projects), 4 micro-batches of 2 per step:

- 1F1B: 3 steps, a sharded checkpoint, then a resumed run to step 5: losses of all 5 steps and
  the parameters after steps 3 and 5 equal the reference (each rank holds only its stage's
  parameters; together they are the whole model);
- GPipe: 3 steps, the same;
- the loss of every step is the loss of the whole batch of 8 (each micro-batch sees the other
  micro-batches' negatives: a mean of per-micro-batch losses would differ, checked);
- the checkpoint folder exports (``mmformer export``) to the whole model at step 3;
- validation runs the forward-only schedule: the embeddings equal the reference model's;
- data 2 x pipeline 2 on 4 processes (each stage sharded with FSDP2 over the 2 pipelines, the
  loss gathered over them): 3 steps give the one-process losses and parameters.
"""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from train_helpers import LossRecorder, StopAt, free_port, init_rank_env, make_loader, make_module, trainer

from mmformer.losses import clip_loss
from mmformer.model import MMFormer
from mmformer.training.checkpoint import ExactResume, export_checkpoint
from mmformer.training.pipeline import stage_bounds

B = 8
MICRO = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _own_params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def _pp_worker(rank, port, root, out):
    init_rank_env(rank, port)
    from mmformer.training.pipeline import PipelineStrategy

    root = Path(root)

    def strategy(schedule):
        return PipelineStrategy(pipeline_parallel_size=2, microbatches=MICRO, schedule=schedule)

    rec = LossRecorder()
    module = make_module()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    trainer(root, 5, [rec, ExactResume(), StopAt(3), ckpt], strategy=strategy("1f1b"), devices=2).fit(
        module, make_loader(B)
    )
    params3 = _own_params(module)

    rec2 = LossRecorder()
    module2 = make_module()
    trainer(root, 5, [rec2, ExactResume()], strategy=strategy("1f1b"), devices=2).fit(
        module2, make_loader(B), ckpt_path=str(root / "ckpt" / "last.ckpt")
    )
    params5 = _own_params(module2)

    rec3 = LossRecorder()
    module3 = make_module()
    trainer(root, 5, [rec3, StopAt(3)], strategy=strategy("gpipe"), devices=2).fit(module3, make_loader(B))

    # validation through the forward-only schedule: the module's validation_step gets embeddings
    module4 = make_module()
    tr4 = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy("1f1b"),
        logger=False,
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    seen = []
    original = module4.validation_step
    module4.validation_step = lambda batch, batch_idx: (
        original(batch, batch_idx),
        seen.append(module4._val_outputs[-1]),
    )[0]
    module4._log_retrieval = lambda stage: None
    tr4.validate(module4, make_loader(B))
    out[rank] = {
        "losses": rec.losses + rec2.losses,
        "params3": params3,
        "params5": params5,
        "gpipe_losses": rec3.losses,
        "gpipe_params3": _own_params(module3),
        "val": {k: v for k, v in seen[0].items() if k in ("image", "text")},
    }


def _dp_pp_worker(rank, port, root, out):
    init_rank_env(rank, port)
    from mmformer.training.pipeline import PipelineStrategy

    rec = LossRecorder()
    module = make_module()
    strategy = PipelineStrategy(pipeline_parallel_size=2, microbatches=2, schedule="1f1b")
    trainer(root, 5, [rec, StopAt(3)], strategy=strategy, devices=4).fit(module, make_loader(B // 2, 2, rank // 2))
    params = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in module.model.named_parameters()
    }
    out[rank] = {
        "losses": rec.losses,
        "params3": params,
        "sharded": all(hasattr(p, "to_local") for p in module.model.parameters() if p.ndim),
    }


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    out = mp.Manager().dict()
    # spawn, not fork: see tests/test_fsdp.py (a forked worker can hang in the sharded checkpoint load)
    mp.start_processes(_pp_worker, args=(free_port(), str(root), out), nprocs=2, join=True, start_method="spawn")
    return root, dict(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    rec = LossRecorder()
    module = make_module()
    root = tmp_path_factory.mktemp("ref")
    trainer(root, 5, [rec, StopAt(3)]).fit(module, make_loader(B))
    params3 = _own_params(module)
    rec2 = LossRecorder()
    module = make_module()
    trainer(root, 5, [rec2]).fit(module, make_loader(B))
    return rec2.losses, params3, _own_params(module)


def _merged(out: dict, key: str) -> dict[str, torch.Tensor]:
    a, b = out[0][key], out[1][key]
    assert not set(a) & set(b), "a parameter is held by both stages"
    return {**a, **b}


def _assert_params_close(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), where
    for name, ref in want.items():
        g, w = got[name], ref
        if name.endswith("attn.qkv.bias"):  # the key bias: zero true gradient, Adam amplifies noise
            d = ref.shape[0] // 3
            g, w = torch.cat([g[:d], g[2 * d :]]), torch.cat([w[:d], w[2 * d :]])
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name} ({where}): {m}")


def test_stage_bounds():
    assert stage_bounds(2, 2) == [(0, 1), (1, 2)]
    assert stage_bounds(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 needs"):
        stage_bounds(2, 3)


def test_1f1b_pipeline_with_resume_equals_one_process(pp_run, reference):
    _, out = pp_run
    ref_losses, ref3, ref5 = reference
    for rank in range(2):
        assert out[rank]["losses"] == pytest.approx(ref_losses, rel=1e-5), rank
    assert any(k.startswith("blocks.0.") for k in out[0]["params3"]) and "logit_scale" in out[1]["params3"]
    _assert_params_close(_merged(out, "params3"), ref3, "1F1B step 3")
    _assert_params_close(_merged(out, "params5"), ref5, "1F1B step 5 after resume")


def test_gpipe_pipeline_equals_one_process(pp_run, reference):
    _, out = pp_run
    for rank in range(2):
        assert out[rank]["gpipe_losses"] == pytest.approx(reference[0][:3], rel=1e-5), rank
    _assert_params_close(_merged(out, "gpipe_params3"), reference[1], "GPipe step 3")


def test_micro_batch_losses_alone_would_differ():
    """The equality above can tell the whole batch's loss from a mean of micro-batch losses."""
    module = make_module()
    batch = next(iter(make_loader(B)))
    with torch.no_grad():
        o = module(batch["images"], batch["input_ids"], batch["attention_mask"])
        full = clip_loss(o["image_embeds"], o["text_embeds"], o["logit_scale"], batch["concepts"])
        parts = [
            clip_loss(
                o["image_embeds"][s : s + 2],
                o["text_embeds"][s : s + 2],
                o["logit_scale"],
                batch["concepts"][s : s + 2],
            )
            for s in range(0, B, B // MICRO)
        ]
    assert abs(full.item() - sum(p.item() for p in parts) / MICRO) > 1e-2


def test_pipeline_checkpoint_exports_the_whole_model(pp_run, tmp_path):
    root, out = pp_run
    export_checkpoint(root / "ckpt" / "last.ckpt", tmp_path / "model")
    model = MMFormer.from_pretrained(tmp_path / "model")
    want = _merged(out, "params3")
    assert {n for n, _ in model.named_parameters()} == set(want)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, want[name], atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_pipeline_validation_gives_the_model_embeddings(pp_run):
    _, out = pp_run
    module = make_module()
    batch = next(iter(make_loader(B)))
    with torch.no_grad():
        o = module(batch["images"], batch["input_ids"], batch["attention_mask"])
    for rank in range(2):
        torch.testing.assert_close(out[rank]["val"]["image"], o["image_embeds"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[rank]["val"]["text"], o["text_embeds"], atol=1e-5, rtol=0)


# Out of the default run: in two full-suite runs on an AVX2-only EPYC (2 cores) one of the 4 ranks
# died with SIGSEGV, forked and spawned alike; alone (pytest tests/test_pp.py) it passed there.
# Not diagnosed; run it with `pytest -m slow tests/test_pp.py`.
@pytest.mark.slow
def test_data_2_x_pipeline_2_with_fsdp_equals_one_process(tmp_path, reference):
    out = mp.Manager().dict()
    # fork: this run loads no checkpoint (spawned, it crashed as well; see above)
    mp.start_processes(_dp_pp_worker, args=(free_port(), str(tmp_path), out), nprocs=4, join=True, start_method="fork")
    ref_losses, ref3, _ = reference
    for rank in range(4):
        assert out[rank]["sharded"], rank
        assert out[rank]["losses"] == pytest.approx(ref_losses[:3], rel=1e-5), rank
    # ranks 0, 2: stage 0 of the two pipelines; 1, 3: stage 1
    for stage in (0, 1):
        a, b = out[stage], out[stage + 2]
        for name in a["params3"]:
            torch.testing.assert_close(a["params3"][name], b["params3"][name], atol=0, rtol=0)
    _assert_params_close({**out[0]["params3"], **out[1]["params3"]}, ref3, "data 2 x pipeline 2, step 3")
