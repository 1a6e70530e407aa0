"""The ``moss-agent`` command: plan, chat, demo, convert and serve.

``moss-agent plan MODEL`` prints the load plan without reading a weight; ``moss-agent chat --model M`` chats in
the terminal with MOSS's plugins; ``moss-agent demo`` runs a plugin conversation end to end on the small
demonstration model (or on ``--model``); ``moss-agent convert`` writes a standard GPT-J / CodeGen checkpoint for
serving engines; ``moss-agent serve`` runs the OpenAI-compatible backend and its chat page. Each subcommand lives
in its own module with an ``add_parser(subparsers)``; the options several of them share are defined here once.

Errors reach the user as one line that says what to do, with exit status 2; ``--debug`` (anywhere on the
command line, or ``MOSS_AGENT_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from moss_agent import settings
from moss_agent.protocol.plugins import TOOL_KEYS

__all__ = [
    "PLUGIN_KEYS",
    "CliError",
    "add_model_options",
    "build_parser",
    "data_dir",
    "default_db",
    "gib_list",
    "main",
    "model_name",
    "plugin_keys",
    "positive_float",
    "precision",
]

PLUGIN_KEYS = TOOL_KEYS
"""The plugins that have a tool (``search``, ``calculator``, ``solver``, ``text2image``)."""

EXIT_ERROR = 2
"""The exit status of every error (argparse's own for usage errors)."""

# Which extra brings a missing module: the fix a user can act on.
_EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "diffusers": "image", "bitsandbytes": "quant", "tavily": "search"}


class CliError(SystemExit):
    """Leave with this message: the one line the user sees (it says what to do), exit status 2 via :func:`main`."""


class MossArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and help that shows every default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """As argparse's; an option without help still shows its default."""
        if kwargs.get("help") is None and kwargs.get("default") not in (None, False, True, argparse.SUPPRESS):
            kwargs["help"] = ""
            action = super().add_argument(*args, **kwargs)
            action.help = "(default: %(default)s)" if not _secret(action) else None
            return action
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line (not the usage block) and how to get help; exit status 2."""
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _secret(action: argparse.Action) -> bool:
    """An option whose default may be a secret (an API key from the environment): never printed."""
    return action.dest.rsplit("_", 1)[-1] in ("key", "token", "password", "secret")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option that has a default worth showing (never a secret)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, argparse.SUPPRESS, False, True, []) and not _secret(action)
        if shown and "%(default)" not in text and (action.option_strings or action.nargs in ("?", "*")):
            text += " (default: %(default)s)"
        return text


def data_dir() -> Path:
    r"""Where moss-agent keeps user data: ``$MOSS_AGENT_DATA``, else the platform's user data folder.

    Linux and other Unix: ``$XDG_DATA_HOME/moss-agent`` (``~/.local/share/moss-agent``); macOS:
    ``~/Library/Application Support/moss-agent``; Windows: ``%LOCALAPPDATA%\moss-agent``.
    """
    if os.environ.get("MOSS_AGENT_DATA"):
        return Path(os.environ["MOSS_AGENT_DATA"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "moss-agent"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "moss-agent"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "moss-agent"


def default_db() -> str:
    """The conversations' SQLite file of ``chat --session`` and ``serve``: in :func:`data_dir`, not the cwd."""
    return str(data_dir() / "conversations.sqlite3")


def precision(text: str) -> str:
    """``--precision``: ``auto``, a precision or an alias of one (``float16``, ``4bit`` ...)."""
    try:
        return settings.normalize_precision(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def positive_float(text: str) -> float:
    """A number above 0, for options such as ``--cpu-gib`` and ``--lr``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
    return value


def gib_list(text: str) -> tuple[float, ...]:
    """``--gpus``: free GiB per GPU, comma-separated (``24,24``; ``24GB`` / ``24GiB`` / ``24G`` read as GiB)."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        number = part.lower().removesuffix("ib").removesuffix("b").removesuffix("g").strip()
        try:
            value = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number of GiB: write e.g. 24 or 24,24") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{part!r}: a GPU needs more than 0 GiB")
        values.append(value)
    return tuple(values)


def model_name(text: str) -> str:
    """``--model`` / ``MODEL``: a directory, or a hub id; something that looks like a path must exist."""
    from moss_agent.checkpoints.files import looks_like_path

    if "://" in text:  # a server's URL: the command says whether it takes one
        return text
    path = Path(text).expanduser()
    if looks_like_path(text) and not path.exists():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file: give the checkpoint's directory")
    return text


def plugin_keys(text: str) -> list[str]:
    """``--plugins``: comma-separated plugin keys.

    Raises:
        CliError: For an unknown key, naming the choices.
    """
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PLUGIN_KEYS]
    if unknown:
        raise CliError(f"unknown plugin(s) {', '.join(unknown)}: choose from {', '.join(PLUGIN_KEYS)}")
    return keys


def add_model_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--model``, ``--precision`` and the plugin options: how a subcommand that runs MOSS picks it."""
    from moss_agent.cli.plugins import add_plugin_options

    p.add_argument("--model", required=required, type=model_name, help="checkpoint directory or hub id")
    p.add_argument("--precision", default="auto", type=precision, help="auto, " + ", ".join(settings.PRECISIONS))
    p.add_argument("--adapter", help="a LoRA adapter directory from `moss-agent finetune`, merged in at load")
    add_plugin_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``moss-agent``."""
    from moss_agent.cli import chat, convert, demo, finetune, plan, serve

    parser = MossArgumentParser(
        prog="moss-agent",
        description="MOSS (moss-moon-003) with its plugins: plan a load, chat, demo, convert, serve.",
        epilog="Errors print one line and exit with status 2; --debug shows the traceback.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (plan, chat, demo, convert, serve, finetune):
        command.add_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moss-agent")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def describe_error(err: BaseException) -> str:
    """The one line a user sees for ``err``: what is wrong and what to do."""
    if isinstance(err, ModuleNotFoundError) and err.name:
        top = err.name.split(".")[0]
        extra = _EXTRAS.get(top)
        fix = f"pip install 'moss-agent[{extra}]'" if extra else f"pip install {top}"
        return f"this needs the Python package {top!r}, which is not installed: {fix}"
    if isinstance(err, MemoryError) and not str(err):
        return "out of memory: try a smaller --precision (int8, int4) or a machine with more memory"
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ValueError | OSError | LookupError | MemoryError | RuntimeError | TimeoutError):
        return text
    return f"{type(err).__name__}: {text} (this is a bug: run again with --debug and report the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moss-agent`` console script: errors become one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MOSS_AGENT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        args: Any = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moss-agent ... | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # raise SystemExit("message") from a subcommand
            print(f"moss-agent: error: {' '.join(exit_.code.split())}", file=sys.stderr)
            return EXIT_ERROR
        raise
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(f"moss-agent: error: {describe_error(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
