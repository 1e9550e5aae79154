"""The ``fastgrpo`` command line. ``train``'s flags are generated from ``fastgrpo.train.config``."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

from .train import config

SWITCHES_HELP = (
    "Switches (the [true|false] flags) may also be given bare or negated: --use_peft means --use_peft true, "
    "--no-use_peft means --use_peft false."
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` flag per config field, grouped by section, help from the fields' metadata.

    Values stay strings here (defaults suppressed) so only what the user typed overrides the
    YAML file; ``config.build_config`` converts and validates them.
    """
    comments = config.field_help()
    types_ = config.field_types()
    defaults = {k: v for section in config.Config().to_dict().values() for k, v in section.items()}
    groups = {s: parser.add_argument_group(f"{s} options") for s in config.SECTIONS}
    for name, section in config.FIELD_SECTIONS.items():
        tp = types_[name]
        is_list = typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))
        help_ = comments.get(name, "")
        if name in config.FIELD_CHOICES:
            help_ += f"; one of: {', '.join(config.FIELD_CHOICES[name])}"
        if tp is bool or bool in typing.get_args(tp):
            # A switch: --name alone means true, --no-name false (SWITCHES_HELP, said once in the
            # description); --name true/false (or auto, for an optional switch) still works. `train`
            # takes no positional arguments, so a bare --name never swallows one.
            optional = tp is not bool
            groups[section].add_argument(
                f"--{name}",
                default=argparse.SUPPRESS,
                nargs="?",
                const="true",
                metavar="true|false|auto" if optional else "true|false",
                help=f"{help_} (default: {_default_text(defaults[name])})",
            )
            groups[section].add_argument(
                f"--no-{name}", dest=name, action="store_const", const="false", default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )  # fmt: skip
            continue
        groups[section].add_argument(
            f"--{name}",
            default=argparse.SUPPRESS,
            nargs="+" if is_list else None,
            metavar=name.upper(),
            help=f"{help_} (default: {defaults[name]})",
        )


def _default_text(value: bool | None) -> str:
    """A switch's default as the command line spells it."""
    return "auto" if value is None else str(value).lower()


def resolve_train_config(args: argparse.Namespace) -> config.Config:
    """Embedded preset (only when no model is named anywhere) < YAML file < command line."""
    cli = {k: v for k, v in vars(args).items() if k in config.FIELD_SECTIONS}
    layers: list[tuple[dict[str, Any], str]] = []
    file_values = config.load_yaml(args.config) if args.config else {}
    flat_file = config.flatten(file_values, args.config) if file_values else {}
    from .train.embedded import preset_layer

    preset = preset_layer(flat_file, cli)
    if preset is not None:
        layers.append((preset, "the embedded preset"))
    if file_values:
        layers.append((file_values, f"config file {args.config}"))
    layers.append((cli, "the command line"))
    return config.build_config(*layers)


BENCHMARKS = {
    "ops": "fused GRPO loss vs naive, torch.compile, Liger-Kernel and TRL vs the lm_head GEMM floor: time, memory",
    "train": "one `fastgrpo train` update step against completion length: peak memory and tokens/s, packing on/off",
    "trl-dropin": "one TRL GRPO step, stock trl.GRPOTrainer vs fastgrpo.integrations.trl's: loss+backward time, memory",
    "generate": "sampling backends (hf, continuous, graph, vllm) on long-tailed completion lengths: tokens/s, memory",
    "step": "one whole GRPO step, fastgrpo vs stock TRL vs TRL + drop-in: time per phase, tokens/s, peak memory",
}


def bench(argv: list[str]) -> int:
    """``fastgrpo bench <name> ...`` (a name of ``BENCHMARKS``): the rest of the line goes to its parser."""
    if not argv or argv[0] not in BENCHMARKS:
        listing = "\n".join(f"  {k:10} {v}" for k, v in BENCHMARKS.items())
        stream = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
        print(f"usage: fastgrpo bench {{{','.join(BENCHMARKS)}}} [--help | options]\n\n{listing}", file=stream)
        return 0 if stream is sys.stdout else 2
    if argv[0] == "ops":
        from .benchmarks.bench_ops import main as run
    elif argv[0] == "trl-dropin":
        from .benchmarks.bench_trl import main as run
    elif argv[0] == "generate":
        from .benchmarks.bench_generate import main as run
    elif argv[0] == "step":
        from .benchmarks.bench_step import main as run
    else:
        from .benchmarks.bench_train import main as run
    from .benchmarks._common import set_command

    set_command(["fastgrpo", "bench", *argv])  # what the result rows record (no interpreter, no machine paths)
    try:
        return run(argv[1:]) or 0
    finally:
        set_command(None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # each benchmark parses its own flags (and its own --help)
        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="fastgrpo", description="Fused GRPO training for LLMs on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="GRPO/DAPO training: sample -> score -> update (no arguments: the embedded offline default)",
        description="Values apply in this order: defaults shown below; with no --model anywhere, the embedded "
        "default's preset (fastgrpo.train.embedded.EMBEDDED_PRESET); the --config YAML file; command-line flags. "
        + SWITCHES_HELP,
    )
    train.add_argument("--config", default=None, help="YAML file with config keys (flat or by section)")
    add_config_arguments(train)

    demo = sub.add_parser("demo", help="fused GRPO loss against the materialized reference on a small problem")
    from .demo import add_arguments

    add_arguments(demo)
    sub.add_parser("bench", help=f"benchmarks: `fastgrpo bench {'|'.join(BENCHMARKS)} --help`", add_help=False)
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            cfg = resolve_train_config(args)
            from .train.run import train as run_train

            run_train(cfg)
        except ValueError as e:
            print(f"fastgrpo train: error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:  # a failure mid-run that says what to do: a reward function, a NaN loss, a save
            from .train.rewards import RewardFunctionError
            from .train.trainer import RunStopped

            if not isinstance(e, (RewardFunctionError, RunStopped)):
                raise
            print(f"fastgrpo train: error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo":
        from .demo import run

        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
