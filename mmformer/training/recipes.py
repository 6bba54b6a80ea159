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

``trainer.precision: auto`` (in a recipe or as ``--trainer.precision auto``) is resolved before the
Trainer is built: :func:`~mmformer.training.precision.auto_precision` times a few training steps
of the built model on one real batch in each candidate precision and keeps the faster; the saved
``config.yaml`` records the precision chosen.

The recipes ship inside the package (``mmformer/recipes/*.yaml``; ``train/`` in the checkout
links to them), so ``--config tiny-cpu`` names one in an installed package too.
"""

from __future__ import annotations

import importlib
import inspect
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from mmformer.runtime import flush_denormals, keep_freed_memory
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
    raise FileNotFoundError(f"recipe {str(name_or_path)!r}: no such file, and no shipped recipe of that name "
                            f"(shipped: {', '.join(recipe_names())})")


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


def _precision_values(argv: Sequence[str]) -> list[tuple[int, str | None]]:
    """(index, value) of every ``trainer.precision`` the command line sets, in order: from each
    ``--config`` file (index of its value; None when the file sets none) and each
    ``--trainer.precision`` argument (index of its value)."""
    found: list[tuple[int, str | None]] = []
    configs = dict(_config_values(argv))
    for i, arg in enumerate(argv):
        if i in configs:
            trainer = config_section(configs[i], "trainer")
            value = trainer.get("precision") if isinstance(trainer, dict) else None
            if value is not None:
                found.append((i, str(value)))
        name, eq, value = arg.partition("=")
        if name == "--trainer.precision":
            if eq:
                found.append((i, value))
            elif i + 1 < len(argv):
                found.append((i + 1, argv[i + 1]))
    return found


def take_auto_precision(argv: Sequence[str], scratch: str | Path | None = None) -> tuple[list[str], bool]:
    """(argv, auto): auto is True when the precision that takes effect (the last one set) is
    ``auto``. Every ``auto`` in argv becomes ``32-true`` (Lightning knows no ``auto``, even in a
    recipe file whose value a later argument overrides; the measured choice replaces the
    placeholder before the Trainer is built): a ``--trainer.precision auto`` argument is
    rewritten, and a recipe file that says ``precision: auto`` is replaced by a copy that says
    ``32-true``, written into the folder ``scratch`` (needed then)."""
    argv = list(argv)
    values = _precision_values(argv)
    auto = bool(values) and values[-1][1] == "auto"
    if not any(value == "auto" for _, value in values):
        return argv, False
    configs = dict(_config_values(argv))
    for n, (i, value) in enumerate(values):
        if value != "auto":
            continue
        if i in configs:
            if scratch is None:
                raise ValueError(f"{configs[i]} sets trainer.precision: auto; a scratch folder is needed to rewrite it")
            with open(configs[i], encoding="utf-8") as f:
                recipe = yaml.safe_load(f)
            recipe["trainer"]["precision"] = "32-true"
            copy = Path(scratch) / f"{n}-{Path(configs[i]).name}"
            copy.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
            argv[i] = f"{argv[i].partition('=')[0]}={copy}" if argv[i].startswith(("--config=", "-c=")) else str(copy)
        elif argv[i].partition("=")[0] == "--trainer.precision":
            argv[i] = "--trainer.precision=32-true"
        else:
            argv[i] = "32-true"
    return argv, auto


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _link(name: str, given: Any, default: Any, value_of: Callable[[MMFormerModule], Any]) -> Callable:
    """``value_of``, refusing a data-module value set by hand that differs from the model's."""
    def compute(module: MMFormerModule) -> Any:
        value = value_of(module)
        norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
        if given is not None and norm(given) != norm(default) and norm(given) != norm(value):
            raise ValueError(f"data.{name}={given!r} but the model has {value!r}: {name} is linked from the "
                             f"model's config; leave it out of the recipe and the command line")
        return value
    return compute


class RecipeCLI(LightningCLI):
    """LightningCLI in subclass mode over :class:`MMFormerModule` (and subclasses) and any
    ``LightningDataModule``, with the defaults and links described in the module docstring."""

    def __init__(self, args: Sequence[str], run: bool = True) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="mmformer-recipe-")  # removed with the CLI object
        self._argv, self._auto_precision = take_auto_precision(resolve_recipes(args), self._scratch.name)
        super().__init__(MMFormerModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         args=self._argv, run=run, save_config_kwargs={"overwrite": True},
                         parser_kwargs={"default_env": False})

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        # A default class only where none is chosen: jsonargparse keeps the default class's
        # argument values when the class changes, which would hand a subclass its parent's defaults.
        defaults = {key: {"class_path": path} for key, path in DEFAULT_CLASSES.items()
                    if not names_class(self._argv, key)}
        if defaults:
            parser.set_defaults(defaults)

    def before_instantiate_classes(self) -> None:
        """Link :data:`MODEL_LINKS` into the arguments the chosen data module takes."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        data = config.get("data")
        if not data or not data.get("class_path"):
            return
        params = inspect.signature(_import(data.class_path)).parameters
        given = data.get("init_args") or {}
        parser = self._parser(self.subcommand)
        for name, value_of in MODEL_LINKS.items():
            if name in params:
                parser.link_arguments("model", f"data.init_args.{name}", apply_on="instantiate",
                                      compute_fn=_link(name, given.get(name), params[name].default, value_of))


    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer, with ``precision: auto`` resolved by measurement on this model and data."""
        if self._auto_precision and "precision" not in kwargs:
            config = self.config[self.subcommand] if self.subcommand else self.config
            accelerator = str(config.trainer.get("accelerator") or "auto")
            if accelerator not in ("cpu", "auto") or (accelerator == "auto" and torch.cuda.is_available()):
                raise ValueError("precision auto measures CPU training steps; on an accelerator set the "
                                 "precision (bf16-mixed, 16-mixed, 32-true) in the recipe")
            choice = auto_precision(self.model, self.datamodule)
            rank_zero_info(choice.reason())  # Lightning's logger: shown by the CLI like its own lines
            kwargs["precision"] = choice.precision
            config.trainer.precision = choice.precision  # what the saved config.yaml records
        return super().instantiate_trainer(**kwargs)


def run_recipe(argv: Sequence[str]) -> RecipeCLI:
    """``mmformer fit|validate|test|predict ...``: apply the CPU settings of
    :mod:`mmformer.runtime` first (before any torch work, so that every thread torch starts
    inherits them), then run :class:`RecipeCLI`."""
    flush_denormals()
    keep_freed_memory()
    return RecipeCLI(argv)
