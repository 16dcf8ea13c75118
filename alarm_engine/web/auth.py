"""Who is asking: HTTP basic against a user file, or a trusted reverse-proxy header.

User file: one `name:pbkdf2_sha256$iterations$salt$hash` a line (salt and hash
base64), `#` comments; written by `alarm-engine web-user FILE NAME`, re-read
when it changes. Passwords are never stored or logged in clear.

A reverse proxy that authenticates users itself (Kerberos, OIDC, ...) may pass
the name in a header (ALARM_ENGINE_WEB_TRUSTED_HEADER, e.g. X-Remote-User);
it is believed only from the proxy's addresses (ALARM_ENGINE_WEB_TRUSTED_PROXIES,
default 127.0.0.1 and ::1), and the web server must then be reachable only
through that proxy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field

ITERATIONS = 200_000
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        want = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(want, got)


def parse_users(text: str) -> dict[str, str]:
    users = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, stored = line.split(":", 1)
        users[name.strip()] = stored.strip()
    return users


def set_user(path: str, name: str, password: str) -> None:
    """Adds or replaces one user in the file (created with mode 0600)."""
    if not NAME.match(name):
        raise ValueError(f"user name {name!r}: use 1 to 64 of letters, digits and _ . @ -")
    if len(password) < 4:
        raise ValueError("password too short (at least 4 characters)")
    lines = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.split(":", 1)[0].strip() != name]
    lines.append(f"{name}:{hash_password(password)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


@dataclass
class Auth:
    users_file: str | None = None
    trusted_header: str | None = None
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    anonymous_read: bool = False
    _users: dict = field(default_factory=dict)
    _mtime: float = -1.0
    _checked: dict = field(default_factory=dict)  # (user, password hash) -> ok, so PBKDF2 runs once

    @classmethod
    def from_env(cls, env=None) -> "Auth":
        env = os.environ if env is None else env
        proxies = tuple(p.strip() for p in env.get("ALARM_ENGINE_WEB_TRUSTED_PROXIES", "127.0.0.1,::1").split(",")
                        if p.strip())
        return cls(users_file=env.get("ALARM_ENGINE_WEB_USERS") or None,
                   trusted_header=env.get("ALARM_ENGINE_WEB_TRUSTED_HEADER") or None,
                   trusted_proxies=proxies,
                   anonymous_read=env.get("ALARM_ENGINE_WEB_ANONYMOUS_READ", "0").strip().lower()
                   in ("1", "yes", "true", "on"))

    @property
    def configured(self) -> bool:
        return bool(self.users_file or self.trusted_header)

    @property
    def reads_need_login(self) -> bool:
        # With no way to log in configured, reads are anonymous and writes refused.
        return self.configured and not self.anonymous_read

    def _load(self) -> dict[str, str]:
        if not self.users_file:
            return {}
        try:
            mtime = os.stat(self.users_file).st_mtime
        except OSError:
            self._users, self._mtime = {}, -1.0
            return {}
        if mtime != self._mtime:
            with open(self.users_file, encoding="utf-8") as f:
                self._users = parse_users(f.read())
            self._mtime = mtime
            self._checked.clear()
        return self._users

    def identify(self, headers, remote: str | None) -> str | None:
        """The authenticated user name, or None."""
        if self.trusted_header and remote in self.trusted_proxies:
            name = headers.get(self.trusted_header, "").strip()
            if name:
                return name[:64]
        value = headers.get("Authorization", "")
        if self.users_file and value[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(value[6:].strip()).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
            stored = self._load().get(user)
            if stored is None:
                return None
            key = (user, hashlib.sha256(password.encode()).hexdigest(), stored)
            if key in self._checked:
                return user
            if check_password(password, stored):
                self._checked[key] = True  # only successes: wrong guesses must not fill memory
                return user
            return None
        return None
