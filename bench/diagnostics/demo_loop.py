"""Seconds per step of the demo's own training loop: Lightning, the bundled data, the demo recipe.

``mmformer demo`` trains for a fixed time, so its result follows the steps it makes; this times
that loop (data loading and augmentation in the main process, forward, backward, fused AdamW,
logging) over whole epochs, after a first epoch that is not timed (warm-up: allocator, oneDNN
kernel builds), with no validation. One configuration per run; compare configurations by
running them one after the other (or alternated), each in a fresh process:

    python -m bench.diagnostics.demo_loop --precision bf16-mixed
    python -m bench.diagnostics.demo_loop --precision bf16-mixed --pack-text-below 0      # text path padded
    python -m bench.diagnostics.demo_loop --precision 32-true --pack-text-multiple 1      # no rounding

It prints one line per configuration, and with ``--breakdown`` Lightning's ``SimpleProfiler``
summary (the time in the data loader, the training step, backward, the optimizer). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

from bench.common import machine_line
from mmformer.config import ModelConfig
from mmformer.data.emoji import default_data_dir
from mmformer.demo import demo_cli, demo_process_settings
from mmformer.model import MMFormer
from mmformer.training.trainer import make_trainer


def main(argv: list[str] | None = None) -> int:
    import lightning as L

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    p.add_argument("--epochs", type=int, default=5, help="timed epochs, after one untimed (default: 5)")
    p.add_argument("--recipe", default=None, help="a demo recipe name or YAML (default: the shipped one)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument(
        "--pack-text-below",
        type=float,
        default=ModelConfig.pack_text_below,
        help=f"ModelConfig.pack_text_below (default {ModelConfig.pack_text_below}; 0: the text path padded)",
    )
    p.add_argument(
        "--pack-text-multiple",
        type=int,
        default=MMFormer.pack_text_multiple,
        help=f"MMFormer.pack_text_multiple (default {MMFormer.pack_text_multiple})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="also print Lightning's SimpleProfiler summary")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")

    demo_process_settings(args.seed)  # as `mmformer demo` does
    with tempfile.TemporaryDirectory() as scratch:  # the recipe's Trainer is built but not used
        cli = demo_cli(
            args.recipe,
            default_data_dir(None),
            scratch,
            batch_size=args.batch_size,
            precision=args.precision,
            seed=args.seed,
        )
    module, dm = cli.model, cli.datamodule
    module.model.config = dataclasses.replace(module.model.config, pack_text_below=args.pack_text_below)
    module.model.pack_text_multiple = args.pack_text_multiple
    dm.setup("fit")

    class Clock(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                self.start, self.first_step = time.perf_counter(), trainer.global_step

        def on_train_end(self, trainer, pl_module) -> None:
            self.seconds, self.steps = time.perf_counter() - self.start, trainer.global_step - self.first_step

    clock = Clock()
    trainer = make_trainer(
        max_steps=-1,
        max_epochs=1 + args.epochs,
        precision=args.precision,
        logger=False,
        callbacks=[clock],
        enable_progress_bar=False,
        enable_checkpointing=False,
        check_val_every_n_epoch=10**6,
        num_sanity_val_steps=0,
        profiler="simple" if args.breakdown else None,
    )
    trainer.fit(module, dm)
    print(
        f"demo loop ({args.recipe or 'shipped recipe'}, batch {dm.hparams.batch_size}, {args.precision}, pack_text_below "
        f"{args.pack_text_below:g}, pack_text_multiple {args.pack_text_multiple}): "
        f"{1e3 * clock.seconds / clock.steps:.1f} ms per step over {clock.steps} steps "
        f"(epochs 2-{1 + args.epochs})",
        flush=True,
    )
    print(machine_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
