"""The ``moss-agent`` command as a user meets it: one-line errors, help with defaults, the terminal chat."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from moss_agent import cli
from moss_agent.cli import chat as chat_cli
from moss_agent.cli.chat import ChatLoop, Printer
from moss_agent.cli.plugins import make_plugin_tools

RUN = "import sys; from moss_agent.cli import main; sys.exit(main())"


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "./no/such/dir"],
        ["chat", "--model", "./no/such/dir"],
        ["plan", "X", "--gpus", "24GB"],
        ["plan", "X", "--gpus", "lots"],
        ["serve", "--model", "./nope"],
        ["chat", "--model", ".", "--plugins", "teleport"],
    ],
)
def test_errors_are_one_line_with_exit_status_2(argv: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOSS_AGENT_DATA": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, env=env, timeout=120)
    out = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, out
    assert len(out) <= 2 and "Traceback" not in done.stderr, out
    assert "error" in out[0]


def test_a_missing_path_is_named_as_one() -> None:
    for text in ("./nope", "../models/moss", "/no/such/dir", "~/nope", "a/b/c"):
        with pytest.raises(argparse.ArgumentTypeError, match="no such directory"):
            cli.model_name(text)
    assert cli.model_name("fnlp/moss-moon-003-sft") == "fnlp/moss-moon-003-sft"  # a hub id
    from moss_agent.checkpoints.files import resolve_checkpoint
    from moss_agent.checkpoints.spec import MossCheckpointError

    with pytest.raises(MossCheckpointError, match=r"^no such directory: \./nope$"):  # the library says so too
        resolve_checkpoint("./nope")
    assert cli.model_name("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"  # a server's URL


def test_gpu_sizes_accept_units() -> None:
    assert cli.gib_list("24") == (24.0,)
    assert cli.gib_list("24GB, 24GiB,80G") == (24.0, 24.0, 80.0)
    for bad in ("lots", "24,", "0", "-8"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.gib_list(bad)


def test_debug_shows_the_traceback_and_bugs_say_so(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    assert cli.main(["plan", "X", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("moss-agent: error: 'X'")

    def broken(args: argparse.Namespace) -> int:
        raise TypeError("unexpected")

    def parser() -> argparse.ArgumentParser:
        p = cli.MossArgumentParser(prog="moss-agent")
        p.set_defaults(func=broken)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main([]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "TypeError: unexpected" in line and "--debug" in line


@pytest.mark.parametrize(
    ("error", "expected", "status"),
    [
        (KeyboardInterrupt(), "interrupted", 130),
        (ModuleNotFoundError("No module named 'fastapi'", name="fastapi"), "pip install 'moss-agent[serve]'", 2),
        (MemoryError(), "smaller --precision", 2),
        (SystemExit("multi\nline"), "moss-agent: error: multi line", 2),
    ],
)
def test_top_level_handler(error: BaseException, expected: str, status: int, monkeypatch: Any, capsys: Any) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise error

    def parser() -> argparse.ArgumentParser:
        p = cli.MossArgumentParser(prog="moss-agent")
        p.set_defaults(func=fail)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main([]) == status
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_help_shows_every_default_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            default = action.default
            unshown = default in (None, False, True, [], argparse.SUPPRESS) or action.dest == "help"
            if not action.option_strings or unshown:
                continue
            if action.dest.endswith("key"):
                assert str(default) not in text or not default  # a key from the environment is never printed
                continue
            assert f"(default: {default})" in text, (name, action.dest)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("moss-agent ")


def test_conversations_live_in_the_user_data_folder(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.delenv("MOSS_AGENT_DATA", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert cli.default_db() == str(tmp_path / "xdg" / "moss-agent" / "conversations.sqlite3")
    monkeypatch.setenv("MOSS_AGENT_DATA", str(tmp_path / "mine"))
    parser = cli.build_parser()
    for argv in (["chat", "--model", "m"], ["serve", "--model", "m"]):
        args = parser.parse_args(argv)
        assert Path(args.db).parent == tmp_path / "mine" and not Path(args.db).is_relative_to(Path.cwd())
        assert Path(args.image_dir).parent == tmp_path / "mine"


# ---------------------------------------------------------------- plugins that cannot work say so


def plugin_args(**kw: Any) -> argparse.Namespace:
    base = {"plugins": "auto", "docs": None, "image_model": "stabilityai/sd-turbo", "image_dir": "images"}
    return argparse.Namespace(**{**base, **kw})


def test_plugins_that_cannot_work_say_so(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = io.StringIO()
    tools = make_plugin_tools(plugin_args(), out=out)
    assert [t.name for t in tools] == ["Calculate", "Solve"]
    said = out.getvalue()
    assert "Search: off" in said and "--docs PATH" in said and "TAVILY_API_KEY" in said
    assert "Text2Image: off" in said and "hf download stabilityai/sd-turbo" in said and "--image-model" in said

    with pytest.raises(cli.CliError, match=r"Text2Image cannot work.*hf download"):
        make_plugin_tools(plugin_args(plugins="calculator,text2image"), out=io.StringIO())
    with pytest.raises(cli.CliError, match="no such file or folder: nowhere"):
        make_plugin_tools(plugin_args(docs=["nowhere"]), out=io.StringIO())
    with pytest.raises(SystemExit, match="unknown plugin"):
        make_plugin_tools(plugin_args(plugins="teleport"), out=io.StringIO())


def test_docs_make_a_local_search_index(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "moss.md").write_text("MOSS is a plugin-augmented chat model from Fudan University.\n")
    (notes / "cats.txt").write_text("Cats sleep most of the day.\n")
    painter = tmp_path / "painter"
    painter.mkdir()
    (painter / "model_index.json").write_text("{}")  # a diffusers folder as far as the check goes
    out = io.StringIO()
    tools = make_plugin_tools(plugin_args(docs=[str(notes)], image_model=str(painter)), out=out)
    assert [t.name for t in tools] == ["Search", "Calculate", "Solve", "Text2Image"]
    assert f"Search: local index of 2 passages from {notes}" in out.getvalue()
    assert "Fudan" in tools[0].invoke({"query": "Who made MOSS?"})


# ---------------------------------------------------------------- the terminal chat


class FakeAgent:
    """Replies with the question; a question with "slow" is interrupted by Ctrl-C half-way."""

    def __init__(self) -> None:
        self.tools = [SimpleNamespace(name="Calculate")]
        self.memory: list[str] | None = []
        self.resets = 0

    def stream_events_of_turn(self, text: str) -> Any:
        yield SimpleNamespace(type="reply", data="You said ")
        if "slow" in text:
            raise KeyboardInterrupt
        yield SimpleNamespace(type="reply", data=f"**{text}**")
        assert self.memory is not None
        self.memory.append(text)
        yield SimpleNamespace(type="turn", data=None)

    def reset(self) -> None:
        self.resets += 1
        self.memory = []


def run_loop(lines: list[str | BaseException], session: tuple[str, str] | None = None) -> tuple[str, str, Any]:
    feed = iter(lines)

    def read() -> str:
        item = next(feed, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    out, said = io.StringIO(), []
    agent = FakeAgent()
    notes = ["Search: off, nothing to search"]
    status = ChatLoop(agent, Printer(out, color=False), read, said.append, session, notes).run()
    assert status == 0
    return out.getvalue(), "\n".join(said), agent


def test_chat_commands_and_clean_endings() -> None:
    out, said, agent = run_loop(["", "hello", "/help", "/plugins", "/session", "/nope", "/reset", "/quit", "unread"])
    assert out == "You said **hello**\n"  # an empty line does not quit; piped output is plain text
    for word in ("/quit", "/reset", "/plugins", "/session", "/help"):
        assert word in said
    assert "Plugins on: Calculate (choose with --plugins at start)\nSearch: off" in said
    assert "No session" in said and "Unknown command /nope" in said
    assert agent.resets == 1
    _, said, _ = run_loop(["hi", "/session"], session=("work", "/data/db.sqlite3"))
    assert "Session 'work' in /data/db.sqlite3: 1 turn." in said
    # Ctrl-C stops an answer and the chat goes on; Ctrl-C or Ctrl-D at the prompt ends it cleanly.
    out, said, agent = run_loop(["slow one", "after", KeyboardInterrupt(), "unread"])
    assert "[stopped]" in said and out.endswith("You said **after**\n") and agent.memory == ["after"]
    run_loop([EOFError()])


def test_the_reply_is_markdown_on_a_terminal() -> None:
    out = io.StringIO()
    printer = Printer(out, color=True, markdown=True)
    for piece in ("Some **bold", "** text\n\n", "- one\n- two"):
        printer.event(SimpleNamespace(type="reply", data=piece))
    printer.event(SimpleNamespace(type="turn", data=None))
    text = out.getvalue()
    final = text[text.rindex("Some") :]  # the last frame (earlier ones showed the reply as it grew)
    assert "Some \x1b[1mbold\x1b[0m text" in final and "**" not in final and "•" in final  # rendered Markdown


def test_chat_resumes_a_session(monkeypatch: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moss_agent.chat_model import ChatMoss
    from moss_agent.testing.scripted_rules import RuleBasedEngine

    monkeypatch.setattr(chat_cli, "_chat_model", lambda args, model: ChatMoss(engine=RuleBasedEngine()))
    monkeypatch.delenv("TAVILY_API_KEY", raising=False)
    db = tmp_path / "chats.sqlite3"
    argv = ["chat", "--model", str(tmp_path), "--plugins", "calculator", "--session", "work", "--db", str(db)]
    monkeypatch.setattr(sys, "stdin", io.StringIO('Calculate "6*7"\n'))
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    assert "The result is: 42" in first.out and "Session 'work': new." in first.err
    monkeypatch.setattr(sys, "stdin", io.StringIO("/session\n/quit\n"))
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "Session 'work': resumed 1 turn." in err and f"Session 'work' in {db}: 1 turn." in err
