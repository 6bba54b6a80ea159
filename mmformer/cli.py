"""``mmformer`` command line: one table of verbs (:data:`VERBS`).

``fit``, ``validate``, ``test`` and ``predict`` are the one LightningCLI over the recipes
(:mod:`mmformer.training.recipes`). Every other verb is a typed function in its own package,
called with the parsed flags as keyword arguments; its flags are declared by a function of the
same package (argparse, hand-written so that flags keep their spellings: ``--batch-size``, ``-k``,
positional queries, exclusive groups). Both are imported only when that verb runs or shows its
help, so ``mmformer --help`` loads neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from mmformer.training.output import configure_output, recipe_help


class Verb(NamedTuple):
    function: str  #: "module:function", the typed function called with the parsed flags as keyword arguments
    arguments: str  #: "module:function" that adds the verb's flags to its parser (argparse)
    help: str


VERBS: dict[str, Verb] = {
    "demo": Verb(
        "mmformer.demo:demo_command",
        "mmformer.demo:add_arguments",
        "train the tiny preset on the bundled emoji data and search it",
    ),
    "eval": Verb(
        "mmformer.retrieval.commands:eval_command",
        "mmformer.retrieval.options:add_eval_arguments",
        "retrieval recall@K of a saved model on a manifest or the bundled test split",
    ),
    "export": Verb(
        "mmformer.training.commands:export_command",
        "mmformer.training.commands:add_export_arguments",
        "Lightning checkpoint -> save_pretrained directory; any model -> ONNX graphs or open_clip weights",
    ),
    "index build": Verb(
        "mmformer.training.commands:index_build_command",
        "mmformer.training.commands:add_index_build_arguments",
        "embed images (or texts) with a model and write an index",
    ),
    "index info": Verb(
        "mmformer.retrieval.commands:index_info_command",
        "mmformer.retrieval.options:add_index_info_arguments",
        "print an index's manifest (and check its files)",
    ),
    "search": Verb(
        "mmformer.retrieval.commands:search_command",
        "mmformer.retrieval.options:add_search_arguments",
        "search an index by text or by image",
    ),
    "prune": Verb(
        "mmformer.training.prune:prune_command",
        "mmformer.training.commands:add_prune_arguments",
        "remove attention heads, optionally recover by distillation, save the smaller model",
    ),
    "import": Verb(
        "mmformer.clip_io:import_command",
        "mmformer.clip_io:add_import_arguments",
        "open_clip or Hugging Face CLIP weights -> save_pretrained directory",
    ),
    "tokenizer": Verb("mmformer.tokenizer:tokenizer_command", "mmformer.tokenizer:add_arguments", "train a tokenizer"),
    "serve": Verb(
        "mmformer.serve.commands:serve_command",
        "mmformer.serve.options:add_arguments",
        "serve a model and its indexes over gRPC and HTTP (dynamic batching, search page, metrics)",
    ),
}
DESCRIPTION = "Image-text transformers: train, evaluate, index, search, compress and serve."
LIGHTNING_COMMANDS = {
    "fit": "train a recipe (--config NAME|FILE; --help-all for every trainer/model/data flag)",
    "validate": "run a recipe's validation loop",
    "test": "run a recipe's test loop",
    "predict": "run a recipe's predict loop",
}
#: The optional dependencies, by top-level module, and the extra of ``pyproject.toml`` that installs each.
SERVE_MODULES = ("grpc", "grpc_health", "grpc_reflection", "google", "fastapi", "uvicorn", "prometheus_client")
EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "torchao": "int8",
    "timm": "timm",
    **dict.fromkeys(SERVE_MODULES, "serve"),
}


def run(argv: Sequence[str] | None = None) -> int:
    """The ``mmformer`` console command: :func:`main`, with errors of the package's own kinds (bad
    files, bad values: ``ValueError`` and its subclasses such as ``CheckpointError``,
    ``ManifestError``, ``InvalidIndexError``, ``CorruptSample``; ``OSError``) and a missing optional
    package printed as one line, ``mmformer <verb>: <message>``, exit status 1; ``--debug`` shows
    the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    verb = verb_of(argv) or ""
    try:
        return main(argv)
    except ImportError as e:
        top = (e.name or "").split(".")[0]
        if debug or top not in EXTRAS:
            raise
        print(
            one_line_error(verb, f"needs the optional package '{top}': pip install 'mmformer[{EXTRAS[top]}]'"),
            file=sys.stderr,
        )
        return 1
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(one_line_error(verb, e), file=sys.stderr)
        return 1
    except SystemExit as e:
        if isinstance(e.code, str) and not debug:
            print(one_line_error(verb, e.code), file=sys.stderr)
            return 1
        raise


def one_line_error(verb: str, e: BaseException | str) -> str:
    """``mmformer <verb>: <message>`` (the message's lines joined; a prefix already there kept)."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    prefix = f"mmformer {verb}:" if verb else "mmformer:"
    return msg if msg.startswith(prefix) else f"{prefix} {msg}"


def verb_of(argv: Sequence[str]) -> str | None:
    """The verb that ``argv`` names (``index build`` or one word), if any."""
    if not argv or argv[0].startswith("-"):
        return None
    return " ".join(argv[:2]) if " ".join(argv[:2]) in VERBS else argv[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the verb ``argv`` names (``mmformer`` without ``run``'s error printing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        if "-h" in argv or "--help" in argv:
            print(recipe_help(argv[0], LIGHTNING_COMMANDS[argv[0]]))
            return 0
        argv = ["--help" if a == "--help-all" else a for a in argv]
        configure_output()
        from mmformer.training.recipes import fit_outputs, run_recipe

        cli = run_recipe(argv)
        if argv[0] == "fit" and getattr(cli, "trainer", None) is not None:
            for line in fit_outputs(cli.trainer):
                print(line)
        return 0
    verb = verb_of(argv)
    parser = build_parser(verb)
    args = vars(parser.parse_args(argv))
    chosen, group = args.pop("_verb", None), args.pop("_group", None)
    if chosen is None:
        (group or parser).print_help()
        return 2
    configure_output()
    return int(load(VERBS[chosen].function)(**args) or 0)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The ``mmformer`` parser: every verb listed with its help; the flags of ``verb`` only (the
    others' modules stay unimported)."""
    p = argparse.ArgumentParser(prog="mmformer", description=DESCRIPTION, allow_abbrev=False)
    sub = p.add_subparsers(metavar="COMMAND")
    for name, text in LIGHTNING_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False, allow_abbrev=False)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, entry in VERBS.items():
        words = name.split()
        if len(words) == 2 and words[0] not in groups:
            actions = "|".join(v.split()[1] for v in VERBS if v.startswith(words[0] + " "))
            g = sub.add_parser(words[0], help=f"{words[0]} {actions}", allow_abbrev=False)
            g.set_defaults(_verb=None, _group=g)
            groups[words[0]] = g.add_subparsers(metavar="ACTION")
        parent = groups[words[0]] if len(words) == 2 else sub
        vp = parent.add_parser(words[-1], help=entry.help, description=entry.help, allow_abbrev=False)
        vp.set_defaults(_verb=name)
        if name == verb:
            load(entry.arguments)(vp)
    return p


def load(target: str):
    """The function ``"module:function"`` names (its module imported now)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


if __name__ == "__main__":
    raise SystemExit(run())
