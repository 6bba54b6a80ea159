"""Tensor parallelism (heads split over ranks, DTensor) on CPU/gloo equals one process.

- forward: 2 ranks, every ``share`` mode, fp32: image and text embeddings equal the unsharded
  model's (atol 1e-5); each rank holds whole heads of q, k and v (rows [q_r; k_r; v_r] of the
  fused weight), half the output projection's input columns and half the FFN;
- training through Lightning (``ShardedStrategy(tensor_parallel_size=2)``, FSDP2 over a data-parallel
  mesh of size 1): 3 AdamW steps, a sharded checkpoint, a resumed run to step 5: the losses of
  all 5 steps and the parameters after step 5 equal a one-process run on the same batches;
- the checkpoint holds ``attn.qkv.weight`` as (3D, D) and ``mmformer export`` of it gives the
  step-3 weights in the usual ``save_pretrained`` folder;
- data 2 x tensor 2 on 4 processes: 3 steps give the one-process losses and parameters.
"""

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from train_helpers import LossRecorder, StopAt, free_port, full_params, init_rank_env, make_loader, make_module, trainer

from mmformer.config import get_config
from mmformer.model import MMFormer
from mmformer.training.checkpoint import ExactResume, export_checkpoint, load_checkpoint_state_dict

GLOBAL_B = 8
SHARE_MODES = ("qkv", "attention", "all", "none")
FORWARD = dict(width=32, depth=2, heads=4, image_size=32, patch_size=8, embed_dim=32, context_length=8, vocab_size=500)

pytestmark = pytest.mark.usefixtures("one_thread")


def _forward_check(rank: int) -> dict:
    """Every share mode: TP embeddings vs the same model unsharded, and what each rank holds."""
    from torch.distributed.device_mesh import init_device_mesh

    from mmformer.training.distributed import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(3, 500, (3, 8), generator=g)
    mask = torch.arange(8)[None] < torch.tensor([[8], [5], [2]])
    out = {}
    for share in SHARE_MODES:
        torch.manual_seed(0)
        model = MMFormer(get_config("tiny", share=share, **FORWARD)).eval()
        full = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            ref_img, ref_txt = model.encode_image(images), model.encode_text(ids, mask)
        apply_tensor_parallel(model, mesh)
        with torch.no_grad():
            img, txt = model.encode_image(images), model.encode_text(ids, mask)
        d = FORWARD["width"]
        qkv = model.blocks[0].attn.qkv
        qkv = qkv if isinstance(qkv, torch.nn.Linear) else qkv["image"]
        prefix = "blocks.0.attn.qkv." + ("" if share != "none" else "image.")
        w = full[prefix + "weight"]
        h = d // 2  # rows of q (and of k, v) per rank
        want = torch.cat([w[i * d + rank * h : i * d + (rank + 1) * h] for i in range(3)])
        out[share] = {
            "img": (img - ref_img).abs().max().item(),
            "txt": (txt - ref_txt).abs().max().item(),
            "qkv_rows": torch.equal(qkv.weight.to_local(), want),
            "global_shape": tuple(qkv.weight.shape),
            "heads": model.blocks[0].attn.heads,
            "local_shapes": {
                k: tuple(v.to_local().shape)
                for k, v in model.state_dict().items()
                if k.startswith("blocks.0.") and hasattr(v, "to_local")
            },
        }
    try:  # 3 heads do not split over 2 ranks
        apply_tensor_parallel(MMFormer(get_config("tiny", **{**FORWARD, "width": 36, "heads": 3})), mesh)
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out


def _tp_worker(rank, ports, root, out):
    init_rank_env(rank, ports[0])
    import torch.distributed as dist

    from mmformer.training.distributed import ShardedStrategy

    root = Path(root)
    # its own port: the Trainer's group below rendezvouses on MASTER_PORT, and a second store on
    # the port of a group just destroyed could hang the rendezvous
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    forward = _forward_check(rank)
    dist.destroy_process_group()

    rec = LossRecorder()
    module = make_module()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    tr = trainer(
        root, 5, [rec, ExactResume(), StopAt(3), ckpt], strategy=ShardedStrategy(tensor_parallel_size=2), devices=2
    )
    tr.fit(module, make_loader(GLOBAL_B))  # data-parallel size 1: both ranks read the whole batch
    params3 = full_params(module)
    heads = module.model.blocks[0].attn.heads

    rec2 = LossRecorder()
    module2 = make_module()
    tr2 = trainer(root, 5, [rec2, ExactResume()], strategy=ShardedStrategy(tensor_parallel_size=2), devices=2)
    tr2.fit(module2, make_loader(GLOBAL_B), ckpt_path=str(root / "ckpt" / "last.ckpt"))
    out[rank] = {
        "forward": forward,
        "losses": rec.losses + rec2.losses,
        "params3": params3,
        "params5": full_params(module2),
        "heads": heads,
    }


def _dp_tp_worker(rank, ports, root, out):
    init_rank_env(rank, ports[0])
    from mmformer.training.distributed import ShardedStrategy

    rec = LossRecorder()
    module = make_module()
    tr = trainer(root, 5, [rec, StopAt(3)], strategy=ShardedStrategy(tensor_parallel_size=2), devices=4)
    dp_rank = rank // 2  # mesh (data 2, tensor 2): ranks 0, 1 read the first half of each batch
    tr.fit(module, make_loader(GLOBAL_B // 2, 2, dp_rank))
    local = {n: (p.to_local() if hasattr(p, "to_local") else p).numel() for n, p in module.model.named_parameters()}
    out[rank] = {
        "losses": rec.losses,
        "params3": full_params(module),
        "local_numel": local,
        "loss_group_size": torch.distributed.get_world_size(module.loss_group),
    }


def _spawn(fn, nprocs, root):
    out = mp.Manager().dict()
    ports = [free_port()]
    while len(ports) < 2:
        port = free_port()
        if port not in ports:
            ports.append(port)
    # spawn, not fork: a forked worker inherits the threads' locks of the test process (earlier tests
    # start threads) and once hung for minutes in a checkpoint load of the resume step
    mp.start_processes(fn, args=(ports, str(root), out), nprocs=nprocs, join=True, start_method="spawn")
    return dict(out)


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return root, _spawn(_tp_worker, 2, root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batches of 8, 5 steps; parameters after step 3 and step 5."""
    rec = LossRecorder()
    module = make_module()
    root = tmp_path_factory.mktemp("ref")
    trainer(root, 5, [rec, StopAt(3)]).fit(module, make_loader(GLOBAL_B))
    params3 = full_params(module)
    rec2 = LossRecorder()
    module = make_module()
    trainer(root, 5, [rec2]).fit(module, make_loader(GLOBAL_B))
    assert rec2.losses[:3] == rec.losses
    return rec2.losses, params3, full_params(module)


def _assert_params_close(got: dict, want: dict, where: str) -> None:
    for name, ref in want.items():
        g, w = got[name], ref
        if name.endswith("attn.qkv.bias"):
            # the key bias has an exactly-zero true gradient (softmax ignores a per-query constant);
            # Adam turns rounding noise (~1e-10) into +-lr steps: compare q and v only
            d = ref.shape[0] // 3
            g, w = torch.cat([g[:d], g[2 * d :]]), torch.cat([w[:d], w[2 * d :]])
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name} ({where}): {m}")


@pytest.mark.parametrize("share", SHARE_MODES)
def test_tensor_parallel_forward_equals_one_process(tp_run, share):
    _, out = tp_run
    d = FORWARD["width"]
    for rank in range(2):
        r = out[rank]["forward"][share]
        assert r["img"] < 1e-5 and r["txt"] < 1e-5, (rank, r)
        assert r["qkv_rows"], f"rank {rank} does not hold rows [q_r; k_r; v_r] of the fused qkv weight"
        assert r["global_shape"] == (3 * d, d) and r["heads"] == FORWARD["heads"] // 2
        shapes = r["local_shapes"]
        hidden = 4 * d
        for key, shape in shapes.items():
            if key.endswith(("qkv.weight", "qkv.image.weight")):
                assert shape == (3 * d // 2, d), key
            if ".proj." in key and key.endswith("weight"):
                assert shape == (d, d // 2), key  # row-parallel: half the input columns
            if ".fc1" in key and key.endswith("weight"):
                assert shape == (hidden // 2, d), key
            if ".fc2" in key and key.endswith("weight"):
                assert shape == (d, hidden // 2), key


def test_tensor_parallel_training_and_resume_equal_one_process(tp_run, reference):
    _, out = tp_run
    ref_losses, ref3, ref5 = reference
    for rank in range(2):
        assert out[rank]["heads"] == 1  # TINY has 2 heads: one per rank
        assert out[rank]["losses"] == pytest.approx(ref_losses, rel=1e-5), rank
        _assert_params_close(out[rank]["params3"], ref3, f"step 3, rank {rank}")
        _assert_params_close(out[rank]["params5"], ref5, f"step 5 after resume, rank {rank}")


def test_tensor_parallel_checkpoint_keeps_the_format_and_exports(tp_run, tmp_path):
    root, out = tp_run
    ckpt = root / "ckpt" / "last.ckpt"
    state, _ = load_checkpoint_state_dict(ckpt)
    d = 32
    assert state["model.blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert state["model.blocks.0.attn.qkv.bias"].shape == (3 * d,)
    export_checkpoint(ckpt, tmp_path / "model")
    model = MMFormer.from_pretrained(tmp_path / "model")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, out[0]["params3"][name], atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_data_2_x_tensor_2_equals_one_process(tmp_path, reference):
    out = _spawn(_dp_tp_worker, 4, tmp_path)
    ref_losses, ref3, _ = reference
    total = sum(p.numel() for p in ref3.values())
    for rank in range(4):
        assert out[rank]["loss_group_size"] == 2  # the loss gathers over the data-parallel ranks only
        assert out[rank]["losses"] == pytest.approx(ref_losses[:3], rel=1e-5), rank
        _assert_params_close(out[rank]["params3"], ref3, f"rank {rank}")
        # every block weight is split 4 ways (2 tensor x 2 data), the rest 2 ways
        local = out[rank]["local_numel"]
        assert local["blocks.0.attn.qkv.weight"] * 4 == ref3["blocks.0.attn.qkv.weight"].numel()
        assert sum(local.values()) < 0.55 * total


def test_heads_that_do_not_split_are_a_clear_error(tp_run):
    _, out = tp_run
    assert "tensor_parallel_size=2 must divide heads=3" in out[0]["forward"]["error"]
