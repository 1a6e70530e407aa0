"""Who is asking: API keys, the users they belong to, and whose conversations are whose.

Three setups:

* no key (loopback only): everyone is the one anonymous user;
* ``--api-key KEY``: one user, as before;
* ``--keys FILE``: one line per key, ``USER KEY`` (``#`` starts a comment). Each user sees only their own
  conversations: another user's conversation id answers 404, as an id that does not exist.

An admin key (``--admin-key``) may list, read and delete every conversation; it sees the ids of other users'
conversations as ``USER:ID``.

The store keeps a user's conversation ``ID`` under ``USER:ID`` (the one-user setups under ``ID``, so stores of
earlier versions keep working); a client's id can never contain ``:``, so no user reaches another's rows.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ADMIN_ID", "USER_NAME", "KeyRing", "Principal"]

logger = logging.getLogger(__name__)

USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
"""What a user name in a keys file may look like."""
ADMIN_ID = re.compile(r"(?:([A-Za-z0-9_.@-]{1,64}):)?([A-Za-z0-9_-]{1,64})")
"""A conversation id as the admin names it: ``USER:ID`` or a one-user setup's ``ID``."""
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    """The caller of a request.

    Attributes:
        user: The user name, or None for the one user of a setup without a keys file.
        admin: Whether the caller holds the admin key.
    """

    user: str | None = None
    admin: bool = False

    @property
    def name(self) -> str:
        """The user name for fairness and logs (``-`` for the one user)."""
        return self.user or "-"

    def store_id(self, conversation_id: str) -> str:
        """The store's id of this caller's conversation ``conversation_id``.

        The admin may name another user's conversation as ``USER:ID``.
        """
        if self.admin and ":" in conversation_id:
            return conversation_id
        return conversation_id if self.user is None else f"{self.user}:{conversation_id}"

    def public_id(self, store_id: str) -> str | None:
        """The id this caller knows a stored conversation by, or None when it is not theirs to see."""
        owner, sep, rest = store_id.rpartition(":")
        if self.admin:
            return rest if sep and owner == self.user else store_id
        if self.user is None:
            return None if sep else store_id
        return rest if sep and owner == self.user else None


class KeyRing:
    """The server's keys.

    Args:
        users: Key -> user name (a keys file).
        api_key: The one key of a one-user setup.
        admin_key: The admin key.

    Raises:
        ValueError: For a key given twice or a bad user name.
    """

    def __init__(
        self, users: Mapping[str, str] | None = None, *, api_key: str | None = None, admin_key: str | None = None
    ) -> None:
        entries: list[tuple[bytes, Principal]] = []
        for key, user in (users or {}).items():
            if not USER_NAME.fullmatch(user):
                raise ValueError(f"user name {user!r}: use 1 to 64 letters, digits, '_', '.', '@' or '-'")
            entries.append((key.encode(), Principal(user)))
        if api_key:
            entries.append((api_key.encode(), Principal(None)))
        if admin_key:
            entries.append((admin_key.encode(), Principal(None, admin=True)))
        keys = [k for k, _ in entries]
        if len(set(keys)) != len(keys):
            raise ValueError("the same key is given twice (keys file, --api-key, --admin-key)")
        self._entries = entries
        self.users = sorted({p.user for _, p in entries if p.user is not None})

    @property
    def open(self) -> bool:
        """Whether the server has no key at all (everyone is the one user)."""
        return not self._entries

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: str | None) -> KeyRing:
        """Read a keys file: ``USER KEY`` per line, blank lines and ``#`` comments ignored.

        Raises:
            ValueError: Naming the file and line of what is wrong.
        """
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
            mode = file.stat().st_mode
        except OSError as err:
            raise ValueError(f"--keys {path}: {err.strerror or err}") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            logger.warning("%s is readable by other users of this machine: chmod 600 it", path)
        users: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: a line is 'USER KEY', got {len(parts)} fields")
            user, key = parts
            if not USER_NAME.fullmatch(user):
                raise ValueError(f"{path}:{number}: user name {user!r} has characters other than A-Z a-z 0-9 _ . @ -")
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(f"{path}:{number}: the key of {user!r} is shorter than {MIN_KEY_LENGTH} characters")
            if key in users:
                raise ValueError(f"{path}:{number}: this key is already given to {users[key]!r}")
            users[key] = user
        if not users:
            raise ValueError(f"{path}: no 'USER KEY' line")
        return cls(users, **kwargs)

    def authenticate(self, authorization: str) -> Principal | None:
        """The caller of an ``Authorization`` header value, or None for a missing or wrong key.

        Every key is compared in constant time, and all of them, so the time taken tells nothing.
        """
        if self.open:
            return Principal()
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        found = None
        for key, principal in self._entries:
            if hmac.compare_digest(given.strip().encode(), key):
                found = principal
        return found
