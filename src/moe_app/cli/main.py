"""The ``moe-app`` command line.

``moe-app fit|validate|test|predict -c CONFIG [...]`` is a LightningCLI: the model and data module
are chosen by ``class_path`` in the config (any ``CausalLMModule`` / ``LightningDataModule``
subclass), configs compose with repeated ``-c``, and the resolved config is saved in every run
directory. The same entry point dispatches the offline subcommands listed in
:data:`moe_app.cli.commands.OFFLINE_COMMANDS` (surgery, export, pruning), which need no Trainer.

Error policy: a user error (:class:`~moe_app.errors.MoeAppError`, a bad config value, a missing
file) prints one readable line and exits with code 2; a traceback only with ``--debug`` or
``MOE_APP_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
DEBUG_ENV = "MOE_APP_DEBUG"


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "False")
    if "--debug" in argv:
        debug = True
        argv = [a for a in argv if a != "--debug"]
    return debug, argv


def _top_level_help() -> str:
    from moe_app.cli.commands import OFFLINE_COMMANDS

    lines = [
        "usage: moe-app COMMAND [options]   (add --debug for tracebacks)",
        "",
        "Training (LightningCLI; see `moe-app fit --help`):",
        "  fit        train a model:   moe-app fit -c configs/tiny/dense.yaml",
        "  validate   evaluate the validation loss",
        "  test       per-domain loss, perplexity and exact-match accuracy",
        "  predict    greedy generation on the test prompts",
        "",
        "Offline commands (no Trainer):",
    ]
    for name in OFFLINE_COMMANDS:
        help_text = _offline_help(name)
        if help_text is not None:
            lines.append(f"  {name:<10} {help_text}")
    return "\n".join(lines)


def _offline_help(name: str) -> str | None:
    from moe_app.cli.commands import OFFLINE_COMMANDS

    if importlib.util.find_spec(f"moe_app.cli.commands.{name}") is None:
        return None  # listed but not shipped yet
    return OFFLINE_COMMANDS[name]


def _run_offline(name: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module(f"moe_app.cli.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"moe_app.cli.commands.{name}":
            raise _usage_error(f"the command {name!r} is not available in this version") from exc
        raise
    from moe_app.cli.commands._options import make_parser

    parser = make_parser(f"moe-app {name}", getattr(module, "HELP", None))
    module.build_parser(parser)
    cfg = parser.parse_args(argv)
    return int(module.run(cfg) or 0)


def _usage_error(message: str):
    from moe_app.errors import MoeAppError

    return MoeAppError(message, fix="run `moe-app --help` for the list of commands")


def _cli_class():
    """Build the LightningCLI subclass lazily (importing lightning costs ~2 s)."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class MoeAppCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            from lightning.pytorch.callbacks import ModelCheckpoint

            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
            # Reliability (issue #9, docs/reliability.md): always-on callbacks, configurable by key.
            from moe_app.lightning.callbacks.guard import NumericalGuard
            from moe_app.lightning.callbacks.rng import TrainingRNG
            from moe_app.lightning.callbacks.signals import GracefulStop

            parser.add_lightning_class_args(NumericalGuard, "numerical_guard")
            parser.add_lightning_class_args(GracefulStop, "graceful_stop")
            parser.add_lightning_class_args(TrainingRNG, "training_rng")

        def before_instantiate_classes(self) -> None:
            from moe_app.lightning.strategies.checks import check_strategy

            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg.get("trainer")
            check_strategy(trainer)
            root = trainer.get("default_root_dir") or "runs/default"
            trainer["default_root_dir"] = root
            if cfg.get("checkpoint") is not None and cfg["checkpoint"].get("dirpath") is None:
                cfg["checkpoint"]["dirpath"] = str(Path(root) / "checkpoints")
            from moe_app.lightning.checkpoint_io import default_trainer_plugins

            default_trainer_plugins(trainer)  # atomic checkpoint writes, weights_only loads
            ckpt = cfg.get("ckpt_path")
            if ckpt == "last" and self.subcommand in ("validate", "test", "predict"):
                last = Path(cfg["checkpoint"]["dirpath"]) / "last.ckpt"
                if not last.exists():
                    from moe_app.errors import ConfigError

                    raise ConfigError(
                        f"--ckpt_path last: there is no {last} (no finished or interrupted fit in this run "
                        "directory), so the untrained model would be evaluated.",
                        where="ckpt_path",
                        fix="run `moe-app fit` with the same config and --trainer.default_root_dir first, or pass "
                        "--ckpt_path FILE / --model.init_args.source.pretrained MODEL_DIR",
                    )
            if trainer.get("logger") in (None, True):
                # Lightning's default (CSV without tensorboard) made explicit: no fallback notice.
                from jsonargparse import Namespace

                trainer["logger"] = Namespace(
                    class_path="lightning.pytorch.loggers.CSVLogger",
                    init_args=Namespace(save_dir=root, name="lightning_logs"),
                )

    return MoeAppCLI


def _parser_class():
    from lightning.pytorch.cli import LightningArgumentParser

    class MoeAppArgumentParser(LightningArgumentParser):
        """One readable line on a bad argument or config value, not the whole usage text."""

        def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
            if os.environ.get(DEBUG_ENV) == "1":
                return super().error(message, ex)
            prog = self.prog if self.prog and "__main__" not in self.prog else "moe-app"
            first = " ".join(str(message).split())
            sys.stderr.write(
                f"moe-app: error: {first}\nFix: correct the key or value (see `{prog} --help`); "
                "add --debug for details.\n"
            )
            raise SystemExit(2)

    return MoeAppArgumentParser


def cli_main(args: list[str] | None = None, run: bool = True) -> Any:
    """Run the Lightning part of the CLI (``fit`` etc.). Callable from tests.

    With ``run=False`` the arguments must not include a subcommand: the classes are only
    instantiated (what the config tests use).
    """
    from lightning.pytorch import LightningDataModule

    from moe_app.lightning.modules.lm import CausalLMModule

    cli_cls = _cli_class()
    return cli_cls(
        parser_class=_parser_class(),
        model_class=CausalLMModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs/default"},
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
        args=args,
        run=run,
    )


def _has_omegaconf() -> bool:
    return importlib.util.find_spec("omegaconf") is not None


def _quiet_third_party_chatter() -> None:
    """Drop advertising and notices that say nothing about the user's run."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in record.getMessage()

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logging.getLogger(name).addFilter(_NoTips())
    _progress_bars_only_on_a_terminal()


def _progress_bars_only_on_a_terminal() -> None:
    """Off a terminal (logs, CI, pipes), transformers' and datasets' bars are off like moe-app's own
    (:mod:`moe_app.core.utils.progress`); ``MOE_APP_PROGRESS=1`` forces them all on."""
    from moe_app.core.utils.progress import progress_enabled

    if progress_enabled():
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66 reads it: every bar, child processes too


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party_chatter()
    debug, argv = _debug_requested(argv)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # child processes (DDP) inherit it
    from moe_app.cli.commands import OFFLINE_COMMANDS

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    if argv[0] in ("--version", "version"):
        from importlib.metadata import version

        print(f"moe-app {version('moe-app')}")
        return 0
    try:
        if argv[0] in OFFLINE_COMMANDS:
            return _run_offline(argv[0], argv[1:])
        if argv[0] not in TRAINER_COMMANDS and not argv[0].startswith("-"):
            raise _usage_error(f"unknown command {argv[0]!r}")
        cli_main(argv)
        return 0
    except SystemExit as exc:  # argparse / jsonargparse already printed their message
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        return code
    except KeyboardInterrupt:
        print("moe-app: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return _report(exc, debug)


def _report(exc: BaseException, debug: bool) -> int:
    from moe_app.errors import MoeAppError

    user = _find_user_error(exc)
    if debug:
        import traceback

        traceback.print_exception(exc)
    if user is not None:
        print(f"moe-app: error: {user}", file=sys.stderr)
        return 2
    print(
        f"moe-app: internal error: {type(exc).__name__}: {exc}\n"
        f"This is a bug in moe-app or a dependency; rerun with --debug (or {DEBUG_ENV}=1) for the traceback.",
        file=sys.stderr,
    )
    return 1 if not isinstance(exc, MoeAppError) else 2


def _find_user_error(exc: BaseException) -> BaseException | None:
    """The MoeAppError (or a file error) in ``exc``'s cause chain, if any."""
    from moe_app.errors import MoeAppError

    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, MoeAppError):
            return cur
        if isinstance(cur, FileNotFoundError):
            return cur
        if type(cur).__name__ == "MisconfigurationException":  # Lightning's "bad Trainer argument"
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


if __name__ == "__main__":
    raise SystemExit(main())
