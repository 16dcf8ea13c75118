"""A real headless browser for tests and the benchmark: Debian's chromium driven by Playwright.

Playwright's own browser builds are never downloaded: it launches the system
chromium (executable_path). `ensure_chromium` installs Debian's package when it
is missing (as root, with apt-get), as .ci/run does.
"""

from __future__ import annotations

import os
import shutil
import subprocess

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str | None:
    for p in (os.environ.get("ALARM_ENGINE_CHROMIUM"), *CANDIDATES):
        if p and os.path.exists(p):
            return p
    return shutil.which("chromium")


def ensure_chromium() -> str:
    """The chromium executable, installed with apt-get first if missing (needs root)."""
    found = chromium_path()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("chromium is not installed and cannot be installed here (needs root and apt-get): "
                           "apt-get install -y chromium")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env=env, stdout=subprocess.DEVNULL)
    found = chromium_path()
    if not found:
        raise RuntimeError("apt-get installed chromium but no executable was found")
    return found


def launch(playwright, **kw):
    """A headless chromium through Playwright; the sandbox is off when running as root."""
    args = ["--disable-gpu", "--disable-dev-shm-usage"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    return playwright.chromium.launch(executable_path=ensure_chromium(), headless=True, args=args, **kw)


class WebServer:
    """`alarm-engine web` in a subprocess on a free port, with a users file."""

    def __init__(self, settings, tmp_dir, users: dict[str, str] | None = None, anonymous_read: bool = True,
                 extra_env: dict | None = None):
        import socket

        self.settings = settings
        self.tmp_dir = tmp_dir
        self.users_file = str(tmp_dir / "web-users")
        self.users = users or {}
        self.anonymous_read = anonymous_read
        self.extra_env = extra_env or {}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = tmp_dir / "web.log"

    def start(self, timeout: float = 60.0) -> "WebServer":
        import sys
        import time
        import urllib.request

        from alarm_engine.web.auth import set_user

        for name, password in self.users.items():
            set_user(self.users_file, name, password)
        env = dict(os.environ, BOOTSTRAP_SERVERS=self.settings.bootstrap, SCHEMA_REGISTRY=self.settings.registry_url,
                   ALARM_ENGINE_WEB_USERS=self.users_file if self.users else "",
                   ALARM_ENGINE_WEB_ANONYMOUS_READ="1" if self.anonymous_read else "0", **self.extra_env)
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alarm_engine.cli", "--topic-prefix", self.settings.topic_prefix,
             "web", "--listen", f"127.0.0.1:{self.port}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/api/v1/whoami", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"web server did not start:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def request(self, method: str, path: str, body=None, user: str | None = None, password: str = "",
                content_type: str = "application/json", headers: dict | None = None):
        """(status, JSON body) of one API request."""
        import base64
        import json
        import urllib.error
        import urllib.request

        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type, **(headers or {})})
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
