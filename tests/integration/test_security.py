"""Kafka over SASL_SSL (SCRAM-SHA-512 and PLAIN) and the registry over HTTPS with
basic auth, end to end: a worker and the CLI through a second, secured broker.

The test makes its own CA and server certificate with openssl, starts a second
Kafka (stack.start_kafka) whose only advertised client listeners are SASL_SSL
(SCRAM-SHA-512 users created by the storage format's --add-scram; PLAIN users in
the listener's JAAS config), and puts a TLS-terminating reverse proxy that
demands basic auth in front of the stack's registry. The PLAINTEXT listener the
second broker keeps is its inter-broker listener, never given to clients.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from alarm_engine import cli, stack
from alarm_engine.config import Settings
from alarm_engine.topics import ensure_topics
from tests.integration.engine import REPO_ROOT, Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

USER, PASSWORD = "alarm-engine", "s3cret-Pa55"
REG_USER, REG_PASSWORD = "registry-user", "reg-Pa55:word"
BAD = "Wr0ng-pa55-x9"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(d: Path) -> dict[str, Path]:
    """A private CA and a server certificate for 127.0.0.1/localhost (PEM)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=alarm-engine test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    # Kafka's PEM keystore: the (PKCS#8, unencrypted) key and the certificate in one file.
    (d / "keystore.pem").write_text((d / "server.key").read_text() + (d / "server.pem").read_text())
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key", "keystore": d / "keystore.pem"}


class HTTPSProxy:
    """TLS and basic auth in front of the plain-HTTP registry; counts what it served."""

    def __init__(self, upstream: str, certs: dict[str, Path]):
        up = http.client.urlsplit(upstream)
        self.up_host, self.up_port = up.hostname, up.port
        self.authorized = 0
        self.refused = 0
        expected = "Basic " + base64.b64encode(f"{REG_USER}:{REG_PASSWORD}".encode()).decode()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                if self.headers.get("Authorization") != expected:
                    proxy.refused += 1
                    body = b'{"error_code":401,"message":"Unauthorized"}'
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="registry"')
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                proxy.authorized += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "authorization", "connection")}
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=10)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client refusing our certificate aborts the handshake: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs["cert"], certs["key"])
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """The second broker (SASL_SSL: SCRAM-SHA-512 on one port, PLAIN on another) and the
    HTTPS registry proxy."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not on the PATH: cannot make the test CA")
    d = tmp_path_factory.mktemp("security")
    certs = make_certs(d)
    internal, scram, plain, controller = (_free_port() for _ in range(4))
    props = {
        "listeners": f"PLAINTEXT://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller},"
                     f"SCRAM://127.0.0.1:{scram},PLAINSSL://127.0.0.1:{plain}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{internal},SCRAM://127.0.0.1:{scram},"
                                f"PLAINSSL://127.0.0.1:{plain}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SCRAM:SASL_SSL,PLAINSSL:SASL_SSL",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
        "listener.name.scram.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.scram.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.plainssl.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.plainssl.plain.sasl.jaas.config":
            f'org.apache.kafka.common.security.plain.PlainLoginModule required user_{USER}="{PASSWORD}";',
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(certs["keystore"]),
        "ssl.client.auth": "none",
    }
    t0 = time.monotonic()
    kafka = stack.start_kafka("kafka-secure", internal, controller, props, base_dir=d,
                              format_args=["--add-scram", f"SCRAM-SHA-512=[name={USER},password={PASSWORD}]"])
    try:
        with HTTPSProxy(stack.registry_url() if not os.environ.get("SCHEMA_REGISTRY")
                        else os.environ["SCHEMA_REGISTRY"], certs) as proxy:
            print(f"secured broker ready in {time.monotonic() - t0:.1f}s")
            base = Settings.from_env(
                bootstrap=f"127.0.0.1:{scram}", topic_prefix=f"sec{uuid.uuid4().hex[:6]}.", partitions=1,
                registry_url=f"https://127.0.0.1:{proxy.port}/apis/ccompat/v7")
            s = dataclasses.replace(
                base, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username=USER,
                sasl_password=PASSWORD, ssl_cafile=str(certs["ca"]), registry_cafile=str(certs["ca"]),
                registry_username=REG_USER, registry_password=REG_PASSWORD)
            yield {"s": s, "certs": certs, "kafka": kafka, "proxy": proxy, "plain_port": plain,
                   "internal_port": internal}
    finally:
        kafka.stop()


def env_for(s: Settings, **overrides) -> dict[str, str]:
    env = {
        "BOOTSTRAP_SERVERS": s.bootstrap, "SCHEMA_REGISTRY": s.registry_url,
        "ALARM_ENGINE_TOPIC_PREFIX": s.topic_prefix, "ALARM_ENGINE_PARTITIONS": str(s.partitions),
        "KAFKA_SECURITY_PROTOCOL": s.security_protocol, "KAFKA_SASL_MECHANISM": s.sasl_mechanism,
        "KAFKA_SASL_USERNAME": s.sasl_username, "KAFKA_SASL_PASSWORD": s.sasl_password,
        "KAFKA_SSL_CAFILE": s.ssl_cafile, "SCHEMA_REGISTRY_CAFILE": s.registry_cafile,
        "SCHEMA_REGISTRY_USERNAME": s.registry_username, "SCHEMA_REGISTRY_PASSWORD": s.registry_password,
    }
    env.update(overrides)
    return env


def run_cli(env: dict[str, str], *args, timeout: float = 60) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "alarm_engine.cli", *args], env=full, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_worker_and_cli_over_sasl_ssl_and_https_registry(secured, tmp_path, monkeypatch, capsys):
    s, proxy = secured["s"], secured["proxy"]
    asyncio.run(ensure_topics(s))
    env = env_for(s)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    w = Worker(s, tmp_path / "w", "secure", extra_env=env)
    try:
        w.start(timeout=120)
        assert cli.main(["set-alarm", "sec", "--external", "--location", "L", "--category", "C"]) == 0
        assert cli.main(["set-active", "sec", "--note", "over TLS"]) == 0
        deadline = time.monotonic() + 60
        shown = {}
        while time.monotonic() < deadline:
            capsys.readouterr()
            assert cli.main(["list-active", "--json"]) == 0
            shown = json.loads(capsys.readouterr().out)
            if "sec" in shown:
                break
            time.sleep(1)
        assert shown.get("sec", {}).get("message") == "external: over TLS", (shown, w.output()[-3000:])
        assert shown["sec"]["cause"] == "EXTERNAL"
        assert proxy.authorized > 0  # the registry was reached through TLS + basic auth only
        assert w.running
    finally:
        w.kill()

    # PLAIN over SASL_SSL, the other listener: the CLI reads what the engine wrote.
    plain = env_for(s, BOOTSTRAP_SERVERS=f"127.0.0.1:{secured['plain_port']}", KAFKA_SASL_MECHANISM="PLAIN")
    out = run_cli(plain, "list-active", "--json")
    assert out.returncode == 0, out.stderr
    assert "sec" in json.loads(out.stdout)


def test_wrong_kafka_password_is_one_clear_line_from_the_cli(secured):
    s = secured["s"]
    out = run_cli(env_for(s, KAFKA_SASL_PASSWORD=BAD), "list-active")
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert lines and lines[0].startswith("alarm-engine list-active: ")
    assert BAD not in out.stderr and PASSWORD not in out.stderr
    assert len(lines) == 1, out.stderr
    assert "uthentication" in lines[0], lines[0]


def test_wrong_registry_password_or_untrusted_certificate_is_one_clear_line(secured):
    s = secured["s"]
    out = run_cli(env_for(s, SCHEMA_REGISTRY_PASSWORD=BAD), "register-schemas")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "401" in out.stderr or "nauthorized" in out.stderr, out.stderr
    assert BAD not in out.stderr and REG_PASSWORD not in out.stderr
    out = run_cli(env_for(s, SCHEMA_REGISTRY_CAFILE=""), "register-schemas")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in out.stderr or "certificate" in out.stderr.lower(), out.stderr


def test_wrong_password_is_logged_clearly_by_the_worker(secured, tmp_path):
    s = dataclasses.replace(secured["s"], sasl_password=BAD)
    w = Worker(s, tmp_path / "w", "bad-password", extra_env=env_for(s))
    try:
        with pytest.raises(RuntimeError):
            w.start(timeout=15)  # never ready; the SASL error comes within seconds
    finally:
        w.kill()
    errors = [ln for ln in w.lines if "uthentication" in ln]
    assert errors, w.output()[-3000:]
    assert not any(BAD in ln for ln in w.lines)
