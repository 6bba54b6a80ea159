"""Training recipes and the one command that runs them: ``mmformer fit|validate|test --config RECIPE``.

A recipe is a LightningCLI YAML (``trainer``, ``model``, ``data``). The module and the data module
are chosen in it by class (subclass mode): ``model.class_path`` is :class:`MMFormerModule` or a
subclass (:class:`~mmformer.training.longdoc.LongDocModule`), ``data.class_path`` any
``LightningDataModule`` (:class:`~mmformer.training.datamodule.ImageTextDataModule`,
:class:`~mmformer.training.datamodule.NeedleDataModule`). Without a ``class_path`` they default to
:class:`MMFormerModule` and :class:`ImageTextDataModule`, so recipes written before subclass mode
(init arguments only) still load.

What the data must agree on with the model (image side, text length, normalisation) is not
written in recipes: each is linked from the built module's ``model.config`` into the data
module's argument of that name (:data:`MODEL_LINKS`), for every such argument the chosen data
module takes. A recipe or command line that sets one of them to another value is an error.

``trainer.precision: auto`` (in a recipe or as ``--trainer.precision auto``; :class:`RecipeTrainer`
takes the value) is resolved in :class:`RecipeCLI`'s hooks before the Trainer is built:
:func:`~mmformer.training.precision.auto_precision` times a few training steps of the built
model on one real batch in each candidate precision and keeps the faster; the saved
``config.yaml`` records the precision chosen.

The recipes ship inside the package (``mmformer/recipes/*.yaml``; ``train/`` in the checkout
links to them), so ``--config tiny-cpu`` names one in an installed package too.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT
from lightning.pytorch.utilities import rank_zero_info

from mmformer.runtime import flush_denormals, keep_freed_memory
from mmformer.training.callbacks import ExportModel
from mmformer.training.module import MMFormerModule
from mmformer.training.precision import auto_precision

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

#: The classes a recipe gets when it names none.
DEFAULT_CLASSES = {
    "model": "mmformer.training.module.MMFormerModule",
    "data": "mmformer.training.datamodule.ImageTextDataModule",
}

#: Data-module arguments that come from the built module's model config.
MODEL_LINKS: dict[str, Callable[[MMFormerModule], Any]] = {
    "image_size": lambda module: module.model.config.image_size,
    "max_length": lambda module: module.model.config.context_length,
    "image_mean": lambda module: tuple(module.model.config.image_mean),
    "image_std": lambda module: tuple(module.model.config.image_std),
}


def recipe_names() -> list[str]:
    """The recipes shipped with the package (``tiny-cpu``, ``longdoc``, ...)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """An existing file as given, else the shipped recipe of that name (``tiny-cpu`` or
    ``tiny-cpu.yaml``); raises ``FileNotFoundError`` listing the shipped ones."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"recipe {str(name_or_path)!r}: no such file, and no shipped recipe of that name "
        f"(shipped: {', '.join(recipe_names())})"
    )


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """The recipe YAML as a dict (``trainer``, ``model``, ``data``, ...)."""
    with open(recipe_path(name_or_path), encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def init_args(section: dict[str, Any] | None) -> dict[str, Any]:
    """The init arguments of a recipe's ``model`` / ``data`` section, with or without ``class_path``."""
    section = section or {}
    return dict(section.get("init_args", {})) if "class_path" in section else dict(section)


def _config_values(argv: Sequence[str]) -> list[tuple[int, str]]:
    """(index, value) of every ``--config`` / ``-c`` value in ``argv``."""
    found = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--config", "-c"):
            if eq:
                found.append((i, value))
            elif i + 1 < len(argv):
                found.append((i + 1, argv[i + 1]))
    return found


def resolve_recipes(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` that is no file but a shipped recipe's name replaced by
    that recipe's path."""
    argv = list(argv)
    for i, value in _config_values(argv):
        try:
            path = str(recipe_path(value))
        except FileNotFoundError:
            continue  # LightningCLI says what is wrong with it
        argv[i] = f"{argv[i].partition('=')[0]}={path}" if argv[i].startswith(("--config=", "-c=")) else path
    return argv


def names_class(argv: Sequence[str], key: str) -> bool:
    """True when ``argv`` or one of its ``--config`` files chooses the class of ``key``
    (``--model NAME``, ``--model.class_path``, or ``class_path`` in the file's section)."""
    for arg in argv:
        if arg.partition("=")[0] in (f"--{key}", f"--{key}.class_path"):
            return True
    for _, value in _config_values(argv):
        section = config_section(value, key)
        if isinstance(section, str) or (isinstance(section, dict) and "class_path" in section):
            return True
    return False


def config_section(path: str, key: str) -> Any:
    """Section ``key`` of the YAML file ``path``; None when the file cannot be read or parsed or
    has no such section (LightningCLI reports what is wrong with the file itself)."""
    try:
        with open(path, encoding="utf-8") as f:
            return (yaml.safe_load(f) or {}).get(key)
    except (OSError, yaml.YAMLError, AttributeError):
        return None


#: The logger a ``fit`` gets when neither the recipe nor the command line names one (its
#: ``save_dir`` is ``trainer.default_root_dir``, see :meth:`RecipeCLI.instantiate_trainer`).
DEFAULT_LOGGER = "lightning.pytorch.loggers.CSVLogger"


def name_default_logger(argv: Sequence[str]) -> list[str]:
    """``argv`` with the default logger named (``--trainer.logger.class_path`` CSVLogger, ``name``
    logs) before its first ``--trainer.logger.init_args.*`` argument, when neither ``argv`` nor its
    ``--config`` files name a logger: ``--trainer.logger.init_args.save_dir DIR`` alone then sets
    where the logs go, as it did when the recipes named the CSVLogger themselves."""
    argv = list(argv)
    first = next((i for i, a in enumerate(argv) if a.startswith("--trainer.logger.init_args.")), None)
    if first is None or any(a.partition("=")[0] in ("--trainer.logger", "--trainer.logger.class_path") for a in argv):
        return argv
    for _, value in _config_values(argv):
        trainer = config_section(value, "trainer")
        if isinstance(trainer, dict) and trainer.get("logger") not in (None, True):
            return argv
    return (
        argv[:first]
        + [f"--trainer.logger.class_path={DEFAULT_LOGGER}", "--trainer.logger.init_args.name=logs"]
        + argv[first:]
    )


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _link(name: str, given: Any, default: Any, value_of: Callable[[MMFormerModule], Any]) -> Callable:
    """``value_of``, refusing a data-module value set by hand that differs from the model's."""

    def compute(module: MMFormerModule) -> Any:
        value = value_of(module)
        norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
        if given is not None and norm(given) != norm(default) and norm(given) != norm(value):
            raise ValueError(
                f"data.{name}={given!r} but the model has {value!r}: {name} is linked from the "
                f"model's config; leave it out of the recipe and the command line"
            )
        return value

    return compute


class RecipeTrainer(L.Trainer):
    """``lightning.Trainer`` whose ``precision`` may also be ``"auto"`` in a recipe or on the command
    line: :class:`RecipeCLI` measures and replaces it before the Trainer is built."""

    def __init__(self, *args: Any, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs: Any) -> None:
        if precision == "auto":
            raise ValueError(
                "precision 'auto' is resolved by RecipeCLI (mmformer fit); a Trainer built directly "
                "needs 32-true, bf16-mixed, ..."
            )
        super().__init__(*args, precision=precision, **kwargs)


class RecipeCLI(LightningCLI):
    """LightningCLI in subclass mode over :class:`MMFormerModule` (and subclasses) and any
    ``LightningDataModule``, with the defaults and links described in the module docstring.

    ``announce`` shows the line that says which precision ``auto`` chose (default: Lightning's
    info logger, shown by the command line like Lightning's own lines); the choice is kept in
    ``precision_choice``."""

    def __init__(self, args: Sequence[str], run: bool = True, announce: Callable[[str], None] = rank_zero_info) -> None:
        self._argv = name_default_logger(resolve_recipes(args))
        self._announce = announce
        self._auto_precision = False
        self.precision_choice = None
        super().__init__(
            MMFormerModule,
            L.LightningDataModule,
            trainer_class=RecipeTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=self._argv,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False, "prog": "mmformer"},
        )

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        # A default class only where none is chosen: jsonargparse keeps the default class's
        # argument values when the class changes, which would hand a subclass its parent's defaults.
        defaults = {
            key: {"class_path": path} for key, path in DEFAULT_CLASSES.items() if not names_class(self._argv, key)
        }
        if defaults:
            parser.set_defaults(defaults)

    def before_instantiate_classes(self) -> None:
        """Note ``trainer.precision: auto`` (measured in :meth:`instantiate_trainer`, once the model
        and the data exist) and link :data:`MODEL_LINKS` into the arguments the chosen data module
        takes."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._auto_precision = config.trainer.get("precision") == "auto"
        if self._auto_precision:
            config.trainer.precision = None
        data = config.get("data")
        if not data or not data.get("class_path"):
            return
        params = inspect.signature(_import(data.class_path)).parameters
        given = data.get("init_args") or {}
        parser = self._parser(self.subcommand)
        for name, value_of in MODEL_LINKS.items():
            if name in params:
                parser.link_arguments(
                    "model",
                    f"data.init_args.{name}",
                    apply_on="instantiate",
                    compute_fn=_link(name, given.get(name), params[name].default, value_of),
                )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer, with ``precision: auto`` resolved by measurement on this model and data,
        and, when the recipe and command line name no logger, a ``CSVLogger`` writing
        ``logs/version_N/metrics.csv`` under ``trainer.default_root_dir`` (so that logs follow
        ``--trainer.default_root_dir``; ``--trainer.logger false`` turns logging off)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "logger" not in kwargs and config.trainer.get("logger") in (None, True):
            kwargs["logger"] = CSVLogger(save_dir=config.trainer.get("default_root_dir") or ".", name="logs")
        if self._auto_precision and "precision" not in kwargs:
            accelerator = str(config.trainer.get("accelerator") or "auto")
            if accelerator not in ("cpu", "auto") or (accelerator == "auto" and torch.cuda.is_available()):
                raise ValueError(
                    "precision auto measures CPU training steps; on an accelerator set the "
                    "precision (bf16-mixed, 16-mixed, 32-true) in the recipe"
                )
            choice = self.precision_choice = auto_precision(self.model, self.datamodule)
            self._announce(choice.reason())
            kwargs["precision"] = choice.precision
            config.trainer.precision = choice.precision  # what the saved config.yaml records
        return super().instantiate_trainer(**kwargs)


def check_ckpt_path_arg(argv: Sequence[str]) -> None:
    """``fit --ckpt_path X``: check X (named in the error, loaded with weights_only=True) before
    LightningCLI reads it."""
    from mmformer.training.checkpoint import check_checkpoint

    for i, a in enumerate(argv):
        value = (
            argv[i + 1]
            if a == "--ckpt_path" and i + 1 < len(argv)
            else a.split("=", 1)[1]
            if a.startswith("--ckpt_path=")
            else None
        )
        if value and value not in ("null", "None", "last", "best", "hpc", "registry"):
            check_checkpoint(value)


def fit_outputs(trainer: L.Trainer) -> list[str]:
    """What a finished ``fit`` wrote, one line each (for the command to print; empty on ranks
    other than 0): the ``save_pretrained`` model folder (:class:`ExportModel`), the checkpoints
    and the metrics log."""
    if not trainer.is_global_zero:
        return []
    lines = []
    for callback in trainer.callbacks:
        if isinstance(callback, ExportModel) and callback.target(trainer).is_dir():
            lines.append(f"model: {callback.target(trainer)} (config.json, model.safetensors, tokenizer.model)")
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint):
        saved = [
            f"last {ckpt.last_model_path}" if ckpt.last_model_path else "",
            f"best {ckpt.best_model_path}"
            + (f" ({ckpt.monitor} {float(ckpt.best_model_score):.4g})" if ckpt.best_model_score is not None else "")
            if ckpt.best_model_path and ckpt.best_model_path != ckpt.last_model_path
            else "",
        ]
        if any(saved):
            lines.append("checkpoints: " + ", ".join(s for s in saved if s))
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            lines.append(f"metrics: {Path(logger.log_dir) / 'metrics.csv'}")
    return lines


def run_recipe(argv: Sequence[str]) -> RecipeCLI:
    """``mmformer fit|validate|test|predict ...``: check a ``--ckpt_path`` and apply the CPU
    settings of :mod:`mmformer.runtime` first (before any torch work, so that every thread torch
    starts inherits them), then run :class:`RecipeCLI`."""
    check_ckpt_path_arg(argv)
    flush_denormals()
    keep_freed_memory()
    return RecipeCLI(argv)
