"""The ``excb`` command line.

Verbs come from the modules that own them (``register_cli(subparsers)``) and from plugins registered under
the ``excb.cli`` entry-point group; the services add ``up``, ``serve`` and ``jobs`` that way, so this
library never imports the services.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import signal
import sys
from importlib.metadata import entry_points
from typing import Any, Callable, NoReturn

from excb.config import (
    PRESET_NAMES,
    ConfigError,
    TrainConfig,
    dump_yaml,
    format_config_fields,
    load_file,
    resolve,
)
from excb.version import __version__

# Exit status of a run stopped by SIGTERM/SIGINT after checkpointing: the job can be retried and resumes.
EXIT_INTERRUPTED = 143
EXIT_CONFIG = 2

_BUILTIN_VERBS = ("excb.evaluation.cli", "excb.inference.export", "excb.inference.embed_folder", "excb.data.pack")


class UsageError(Exception):
    """A mistake in how a verb was called: reported as one ``excb: ...`` line with exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every flag's default in its help line unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS) and not action.required
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``excb: ...`` line (exit 2) instead of a usage block and
    shows defaults in help; sub-parsers inherit it, so every verb and sub-verb does the same."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        verb = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(EXIT_CONFIG, f"excb: {verb}{message} (see {self.prog} --help)\n")


class _HelpConfig(argparse.Action):
    """``--help-config``: print every config field from the pydantic schema and exit, like ``--help``."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> NoReturn:
        sys.stdout.write(format_config_fields())
        parser.exit(0)


def _add_train(sub: "argparse._SubParsersAction[_Parser]") -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a backbone with ExCB",
        description=(
            "Train (or resume) an ExCB run. Settings come from, in increasing priority: --preset, --config FILE "
            "(YAML/JSON), then key=value overrides with dotted keys (optim.lr=0.1). Short keys: data (a folder, "
            "'digits', 'fashion-mnist[:ROOT]', 'list:FILE'), out, max_steps, epochs, batch_size, backbone, "
            "num_clusters, device. Re-running with the same out resumes from out/checkpoints/last.pt when the "
            "config matches the run's (else an error names the fields: add overwrite=true to start over, or use "
            "a new out); checkpoint=PATH starts a new run from another run's weights. --help-config lists every "
            "field."
        ),
        epilog="examples:\n  excb train --preset cpu-small data=digits max_steps=200 out=runs/digits\n"
        "  torchrun --nproc-per-node 4 -m excb.cli train --preset resnet50-ep400 data=/data/imagenet/train",
    )
    p.add_argument("--config", help="YAML or JSON file with a TrainConfig")
    p.add_argument("--preset", choices=PRESET_NAMES, help="start from a preset")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action=_HelpConfig,
                   help="list every config field (dotted name, type, default, description) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resolved-config", metavar="JSON",
                   help="a whole TrainConfig as JSON, resolved and validated where it entered (a job the control "
                        "plane accepted: the worker starts its trainer this way); trained as it is, so no --config, "
                        "--preset or key=value with it")
    p.set_defaults(func=_cmd_train)


def _config_from_args(args: argparse.Namespace) -> Any:
    if args.resolved_config is not None:
        return _resolved_config(args)
    raw = _config_file(args.config) if args.config else {}
    return resolve(raw, args.overrides, args.preset)


def _resolved_config(args: argparse.Namespace) -> TrainConfig:
    """``--resolved-config``: the config is not resolved again (no preset, file or overrides merged, ``pinned``
    kept as it came); pydantic only rebuilds the object from its JSON dump."""
    if args.config or args.preset or args.overrides:
        raise ConfigError("--resolved-config", "a resolved config is trained as it is: no --config, --preset or "
                          "key=value with it")
    return TrainConfig.model_validate_json(args.resolved_config)


def _config_file(path: str) -> dict[str, Any]:
    """``--config FILE`` read, with a missing or unparsable file reported as a config error."""
    import yaml

    try:
        return load_file(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("--config", f"{path}: {_file_problem(exc)}") from exc


def _file_problem(exc: BaseException) -> str:
    """What is wrong with a config file, in a few words (YAML errors with their line, not the whole dump)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(exc, 'problem', None) or 'invalid YAML'}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())


class _StopFlag:
    """Set by SIGTERM/SIGINT; the trainer polls it each step, checkpoints and stops."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self) -> bool:
        return self.stop

    def install(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            logging.getLogger("excb").warning("signal %d received: checkpointing and stopping", signum)
            self.stop = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    if args.dry_run:
        sys.stdout.write(_dry_run(cfg))
        return 0
    # lazy, here and in the other verbs: building the parser (``excb --help``, every verb) loads no trainer
    from excb.training.checkpoint import FencedOut
    from excb.training.trainer import NonFiniteLossError, TrainingInterrupted, train

    flag = _StopFlag()
    flag.install()
    try:
        result = train(cfg, should_stop=flag)
    except TrainingInterrupted as exc:
        print(f"excb: {exc}; resume with the same command", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as exc:
        print(f"excb: {exc}", file=sys.stderr)
        return 1
    except FencedOut as exc:  # a newer attempt of the same job owns out: this one stops, writing nothing more
        print(f"excb: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps, "status": result.status,
                      "skipped_files": result.summary.get("skipped_files", 0), "timing": result.summary.get("timing")}))
    return 0


def _dry_run(cfg: Any) -> str:
    """The config a run would start with: for ``recipe=auto`` fitted to the data and this machine, the reasons
    as YAML comments on top; a budget's step count is only known after timing steps at the start."""
    from excb.distributed import resolve_device
    from excb.training.recipe import fit_config

    fitted, recipe = fit_config(cfg, resolve_device(cfg.device))
    lines = []
    if recipe is not None:
        lines.append(f"# recipe fitted to {recipe.profile.describe()} on {recipe.device}:")
        lines += [f"#   {reason}" for reason in recipe.reasons]
    if fitted.budget:
        lines.append(f"# budget {fitted.budget}: max_steps is set at the start by timing real steps on this machine")
    return "".join(line + "\n" for line in lines) + dump_yaml(fitted)


def _add_presets(sub: "argparse._SubParsersAction[_Parser]") -> None:
    p = sub.add_parser("presets", help="list presets, or print one resolved")
    p.add_argument("name", nargs="?", choices=PRESET_NAMES, help="a preset to print resolved (omit to list them)")
    p.set_defaults(func=lambda a: _print_presets(a.name))


def _print_presets(name: str | None) -> int:
    if name is None:
        print("\n".join(PRESET_NAMES))
    else:
        sys.stdout.write(dump_yaml(resolve(preset_name=name)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full parser: built-in verbs, module verbs, then plugins."""
    parser = _Parser(prog="excb", description="ExCB pretraining, export and serving.")
    parser.add_argument("--version", action="version", version=f"excb {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_presets(sub)
    for module_name in _BUILTIN_VERBS:
        _register_module(sub, module_name)
    for ep in entry_points(group="excb.cli"):
        try:
            register: Callable[..., None] = ep.load()
        except ImportError as exc:  # services extra not installed: library verbs still work
            logging.getLogger("excb").debug("plugin %s unavailable: %s", ep.name, exc)
            continue
        register(sub)
    return parser


def _register_module(sub: "argparse._SubParsersAction[_Parser]", module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return  # that verb is not part of this install
        raise
    register = getattr(module, "register_cli", None)
    if register is not None:
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request is noise in a CLI
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"excb: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:
        status = _expected_error(exc)
        if status is None:
            raise  # a bug: the traceback is the report
        print(f"excb: {_one_line(exc)}", file=sys.stderr)
        return status


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, letting ``key=value`` overrides sit on either side of a flag (``excb train data=X
    --dry-run out=Y``): argparse takes one run of positionals, so later ones come back unrecognised and are
    appended to the verb's overrides here. Anything else unrecognised is reported as argparse reports it."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(_OVERRIDE.match(x) for x in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.parse_args(argv)  # exits 2 with argparse's message for the unrecognised arguments
    return args


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _expected_error(exc: BaseException) -> int | None:
    """Exit status for errors a user causes and can fix (bad paths, data, unreachable server), None for bugs.
    Usage errors exit 2 (as argparse does), an unreachable control plane 1."""
    from excb.data.datasets import EmptyDatasetError
    from excb.data.shards import ShardFormatError

    if isinstance(exc, (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                        EmptyDatasetError, ShardFormatError)):
        return EXIT_CONFIG
    if type(exc).__module__.split(".")[0] == "httpx":  # excb jobs: the control plane is down or unreachable
        return 1
    return None


def _one_line(exc: BaseException) -> str:
    """``[Errno 2] No such file or directory: 'x'`` -> ``x: No such file or directory``; others as they read."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    request = getattr(exc, "_request", None)  # httpx: name the server that could not be reached
    if request is not None:
        return f"cannot reach {request.url.copy_with(query=None)}: {' '.join(str(exc).split())}"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
