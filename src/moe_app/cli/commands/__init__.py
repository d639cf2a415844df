"""Offline subcommands of ``moe-app`` (no Lightning Trainer involved).

Adding one: create ``moe_app/commands/<name>.py`` with

* ``HELP: str`` — one line for ``moe-app --help``;
* ``build_parser(parser: argparse.ArgumentParser) -> None`` — add its arguments;
* ``run(args: argparse.Namespace) -> int`` — do the work; raise ``MoeAppError`` for user errors;

and add ``<name>`` to :data:`OFFLINE_COMMANDS`. The CLI imports the module lazily, so a command's
heavy imports cost nothing to the others.
"""

OFFLINE_COMMANDS: tuple[str, ...] = ("upcycle", "export", "prune", "suite")
