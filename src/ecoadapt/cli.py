"""The `ecoadapt` command: parse, call, print. No logic lives here."""

from __future__ import annotations

import argparse
import sys
import textwrap
import warnings
from importlib import resources
from pathlib import Path

from ecoadapt import __version__
from ecoadapt.config import all_keys
from ecoadapt.errors import UserError


def preset_names() -> list[str]:
    """The presets shipped with the package (YAML files in ecoadapt/presets)."""
    folder = resources.files("ecoadapt") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name: str) -> Path:
    """A config file path, or the path of the shipped preset of that name."""
    path = Path(name)
    if path.exists() or name.endswith((".yaml", ".yml")):
        return path
    if name in preset_names():
        return Path(str(resources.files("ecoadapt") / "presets" / f"{name}.yaml"))
    raise UserError(f"{name}: no such config file or preset (presets: {', '.join(preset_names())})")


def keys_help() -> str:
    """Every config key with its type, default and help: generated from the schema."""
    lines = []
    for key, type_name, default, doc in all_keys():
        lines.append(f"  {key}  ({type_name}, default {default!r})")
        lines.extend(textwrap.wrap(doc, 92, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _cmd_adapt(args: argparse.Namespace) -> int:
    from ecoadapt import adapt, config

    path = resolve_config(args.config)
    cfg = config.load(path, args.set)
    summary = adapt.run(cfg, base=path.parent if path.exists() else None)
    ev = summary["eval"]
    print(
        f"{summary['status']}: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['time_s']:.1f} s "
        f"({summary['tokens_per_s']:,.0f} tok/s, measured); held-out loss {ev['loss_before']:.4f} -> {ev['loss']:.4f}"
    )
    if summary["mfu"] is not None:
        f = summary["flops"]
        print(f"MFU: {summary['mfu']:.1%} of a {f['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s peak ({f['peak_source']})")
    if summary["energy"] is not None:
        e = summary["energy"]
        print(f"energy: {e['joules']:,.0f} J in all, {e['train_joules']:,.0f} J training ({e['method']}, {e['meter']})")
    print(f"run directory: {cfg.output.dir}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    print(keys_help())
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    parser = argparse.ArgumentParser(
        prog="ecoadapt",
        description="Adapt a pretrained language model to a new domain, and measure what it costs.",
    )
    parser.add_argument("--version", action="version", version=f"ecoadapt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    adapt = sub.add_parser(
        "adapt",
        help="continued pre-training of a model on a domain corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML sections; override any with --set section.key=value):\n" + keys_help(),
    )
    adapt.add_argument("config", help="a YAML config file, or the name of a shipped preset")
    adapt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    adapt.set_defaults(func=_cmd_adapt)

    sub.add_parser("keys", help="list every config key with its default and help").set_defaults(func=_cmd_keys)
    sub.add_parser("presets", help="list the shipped presets").set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ecoadapt` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # Deprecation notices inside transformers are for its callers' developers, not our users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    try:
        return int(args.func(args))
    except UserError as e:
        if args.debug:
            raise
        print(f"ecoadapt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ecoadapt: interrupted", file=sys.stderr)
        return 130
