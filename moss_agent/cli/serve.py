"""The ``moss-agent serve`` subcommand (wired into :mod:`moss_agent.cli` by :func:`add_serve_parser`)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from moss_agent.cli import add_model_options, default_db

__all__ = ["add_parser", "add_serve_parser"]


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``moss-agent`` subcommands.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``serve`` parser (its ``func`` default runs the server).
    """
    p = subparsers.add_parser("serve", help="serve MOSS with its plugins over an OpenAI-compatible API and a chat page")
    add_model_options(p, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=os.environ.get("MOSS_AGENT_API_KEY"), help="bearer token (or $MOSS_AGENT_API_KEY)"
    )
    p.add_argument("--db", default=default_db(), help="SQLite file for conversations")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queueing included")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting for the model")
    p.add_argument(
        "--keys", metavar="FILE", help="users and their keys, one 'USER KEY' line each (each user sees only their own)"
    )
    p.add_argument(
        "--admin-key",
        default=os.environ.get("MOSS_AGENT_ADMIN_KEY"),
        help="a key that may list, read and delete every user's conversations (or $MOSS_AGENT_ADMIN_KEY)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients use to reach the server (the public name behind a reverse proxy); repeatable",
    )
    p.add_argument("--max-batch", type=int, default=8, help="most generations batched together on the model")
    p.add_argument("--max-queue-per-user", type=int, default=None, help="most requests of one user waiting")
    p.set_defaults(func=_cmd_serve)
    return p


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _key_ring(args: argparse.Namespace) -> Any:
    """The server's keys; exits when a server on a network address would have none."""
    from moss_agent.server.users import KeyRing

    try:
        if args.keys:
            ring = KeyRing.from_file(args.keys, api_key=args.api_key or None, admin_key=args.admin_key or None)
        else:
            ring = KeyRing(api_key=args.api_key or None, admin_key=args.admin_key or None)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if ring.open and not _loopback(args.host):
        raise SystemExit(
            f"--host {args.host} is reachable from other machines: give --api-key or --keys FILE, or anyone who "
            "can reach it could use the model and read every conversation"
        )
    if ring.open:
        print(
            "warning: no --api-key or --keys: every program of every user on this machine can use the server "
            "(other web sites cannot: Host, Origin and JSON checks keep them out)",
            file=sys.stderr,
        )
    if args.host in ("0.0.0.0", "::") and not args.allowed_host:
        print(
            "note: requests must name an allowed host: add --allowed-host NAME for each name or address clients "
            "use to reach this machine (the loopback names are allowed)",
            file=sys.stderr,
        )
    return ring


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from moss_agent.chat_model import ChatMoss
    from moss_agent.cli.plugins import make_plugin_tools
    from moss_agent.memory.store import SQLiteStore
    from moss_agent.server.app import create_app
    from moss_agent.server.schemas import ServerSettings

    if "://" in args.model:
        raise SystemExit(
            f"--model {args.model}: serving a remote model by URL needs a remote engine; give a checkpoint "
            "directory or hub id"
        )
    tools = make_plugin_tools(args)  # says which plugins cannot work, before the model loads
    ring = _key_ring(args)  # refuses an open server on a network address, before the model loads
    print(f"Loading {args.model} ...", file=sys.stderr)
    chat = ChatMoss(model=args.model, precision=args.precision, adapter=args.adapter)
    chat.get_engine()  # before the first request: the process's one engine for this checkpoint (moss_agent.registry)
    settings = ServerSettings(
        api_key=args.api_key or None,
        max_request_bytes=args.max_request_bytes,
        max_tokens_limit=args.max_tokens_limit,
        request_timeout_s=args.timeout,
        max_queue=args.max_queue,
        keys=ring,
        allowed_hosts=(*args.allowed_host, args.host),
        max_batch=args.max_batch,
        max_queue_per_user=args.max_queue_per_user,
    )
    app = create_app(
        chat,
        tools=tools,
        store=SQLiteStore(args.db),
        image_dir=args.image_dir,
        settings=settings,
    )
    print(f"Chat page: http://{args.host}:{args.port}/   API: http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


add_parser = add_serve_parser
