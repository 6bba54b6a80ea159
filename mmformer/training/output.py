"""What the commands print: their own lines and the progress bar, not Lightning's banners.

:func:`configure_output` is called by the command line before a verb runs (the application
layer; the library only logs). Lightning's INFO lines go through one handler of their own (so each
appears once) with a filter that drops the device banner ("GPU available: ...", "TPU available:
...") and tips; the third-party warnings named in :data:`QUIET_WARNINGS` are ignored one by one,
every other warning still shows.
"""

from __future__ import annotations

import logging
import re
import warnings

#: Lightning INFO lines dropped: the device banner, tips, and the seed (recorded in the saved config.yaml).
QUIET_LINES = re.compile(r"\s*((GPU|TPU|HPU|IPU) available:|\N{ELECTRIC LIGHT BULB} Tip:|Seed set to )")

#: (message regex, module regex of the code the warning names) of warnings that say nothing about
#: the user's run.
QUIET_WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)", r"lightning\."),  # torch pytree deprecation inside Lightning
    (r"LightningCLI's args parameter is intended", r"lightning\."),  # the command line is passed on purpose
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", r"lightning\."),
    (r".*does not have many workers which may be a bottleneck", r"lightning\."),  # recipes set num_workers
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated", r"lightning\."),  # Lightning's all_gather
    # retrieval metrics are computed on every rank over the gathered set: nothing to sync
    (r"It is recommended to use `self\.log\('(val|test)/", r"lightning\."),
    # short runs (the demo's calibrated steps, a smoke test): the CSV logger still gets every step it logs
    (r"The number of training batches \(\d+\) is smaller than the logging interval", r""),
)


class QuietLines(logging.Filter):
    """Drops the log records whose message matches :data:`QUIET_LINES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not QUIET_LINES.match(str(record.msg))


def configure_output() -> None:
    """Each log line once, without Lightning's banners or the known third-party warnings.

    mmformer's warnings go through the root handler (``LEVEL name: message``); Lightning's lines
    (INFO and up) through one handler of their own, printed as they are, without propagating to
    the root (which would print them twice)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        handler = logging.StreamHandler()
        handler.addFilter(QuietLines())
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


def recipe_help(verb: str, summary: str) -> str:
    """The short help of ``mmformer fit|validate|test|predict`` (the full LightningCLI help: ``--help-all``);
    ``summary`` is the verb's line of the command table."""
    from pathlib import Path

    names = ", ".join(sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")))
    return f"""usage: mmformer {verb} --config RECIPE [--trainer.KEY VALUE] [--model.KEY VALUE] [--data.KEY VALUE]
       {" " * len(verb)} [--ckpt_path FILE|last] [--print_config]

{summary}.

RECIPE is a YAML file or the name of a shipped recipe: {names}.
Any value of the recipe can be set on the command line, for example:
  --trainer.max_steps 600            --trainer.precision auto|32-true|bf16-mixed
  --trainer.default_root_dir DIR     --trainer.accumulate_grad_batches 4
  --model.pretrained DIR             --model.lr 8e-4   --model.model_config.depth 2
  --data.train_manifest FILE.jsonl   --data.val_manifest FILE   --data.batch_size 128
  --ckpt_path last                   (resume the run in default_root_dir)
  --print_config                     (the resolved recipe, as YAML, without running)

mmformer {verb} --help-all lists every trainer, model and data flag (LightningCLI's help)."""
