"""``moss-agent serve`` refuses to serve an open model on a network address, and says so on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moss_agent.cli import build_parser
from moss_agent.cli.serve import _key_ring
from moss_agent.testing.checkpoints import tiny_moss_checkpoint


def _args(*extra: str) -> object:
    return build_parser().parse_args(["serve", "--model", str(tiny_moss_checkpoint()), "--plugins", "", *extra])


def test_a_network_address_without_a_key_is_refused_before_the_model_loads() -> None:
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        with pytest.raises(SystemExit, match="reachable from other machines"):
            _key_ring(_args("--host", host))
    assert not _key_ring(_args("--host", "0.0.0.0", "--api-key", "k" * 20)).open
    script = "import sys; from moss_agent.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", script, "serve", "--model", str(tiny_moss_checkpoint()), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "reachable from other machines" in run.stderr
    assert "Traceback" not in run.stderr and "Loading" not in run.stderr


def test_loopback_without_a_key_warns(capsys: pytest.CaptureFixture[str]) -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        assert _key_ring(_args("--host", host)).open
        assert "warning: no --api-key or --keys" in capsys.readouterr().err


def test_keys_file_and_admin_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alice alice-key-0123456789\n", encoding="utf-8")
    keys.chmod(0o600)
    ring = _key_ring(_args("--host", "0.0.0.0", "--keys", str(keys), "--admin-key", "admin-key-0123456789"))
    assert ring.users == ["alice"]
    alice = ring.authenticate("Bearer alice-key-0123456789")
    admin = ring.authenticate("Bearer admin-key-0123456789")
    assert alice is not None and alice.user == "alice" and not alice.admin
    assert admin is not None and admin.admin
    assert ring.authenticate("Bearer wrong-key-0123456789") is None
    keys.write_text("alice short\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="shorter than 16"):
        _key_ring(_args("--keys", str(keys)))


def test_a_wildcard_address_says_which_hosts_are_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    _key_ring(_args("--host", "0.0.0.0", "--api-key", "k" * 20))
    assert "--allowed-host" in capsys.readouterr().err
    _key_ring(_args("--host", "0.0.0.0", "--api-key", "k" * 20, "--allowed-host", "chat.example.org"))
    assert "--allowed-host" not in capsys.readouterr().err
