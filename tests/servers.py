"""Real servers for the tests, on loopback only: PostgreSQL (initdb/pg_ctl in a temporary
directory, password auth), an S3-compatible server (moto in server mode), and the production
deployment built on them: an `mlflow server` on PostgreSQL, and Dagster as separate processes
(`dagster code-server`, `dagster-daemon`, `dagster-webserver`) with `deploy/dagster.yaml` and the
artifact store on S3. Every secret reaches them through environment variables, as it would from
a Kubernetes Secret. Each `stop()` ends everything its `start()` started."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], timeout: float) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr}{done.stdout}")


@dataclass
class Postgres:
    """A PostgreSQL 15 server on 127.0.0.1, password (scram) auth, its data in a temporary
    directory of its own (the `postgres` user cannot enter pytest's, which are root's only)."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lifecycle-pg-")))
    port: int = field(default_factory=free_port)
    user: str = "lifecycle"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def start(self, databases: tuple[str, ...] = ("dagster", "mlflow")) -> Postgres:
        self.root.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        if not self.data.exists():
            _run(
                _as_postgres(
                    [
                        "initdb",
                        "-D",
                        str(self.data),
                        "-U",
                        self.user,
                        f"--pwfile={pwfile}",
                        "--auth=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ]
                ),
                timeout=120,
            )
        pwfile.unlink()
        self.pg_ctl("start")
        for db in databases:
            self.psql(f"CREATE DATABASE {db}", db="postgres")
        return self

    def pg_ctl(self, action: str, *, mode: str = "fast") -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        cmd = ["pg_ctl", "-D", str(self.data), "-w", "-t", "60"]
        if action in ("start", "restart"):
            cmd += ["-o", options, "-l", str(self.root / "server.log")]
        if action in ("stop", "restart"):
            cmd += ["-m", mode]
        _run(_as_postgres([*cmd, action]), timeout=90)

    def psql(self, sql: str, db: str = "dagster") -> str:
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", db]
            + ["-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
            env={**os.environ, "PGPASSWORD": self.password},
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.pg_ctl("stop", mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1, with a bucket; ``env`` is what boto3 and MLflow read."""

    root: Path
    bucket: str = "lifecycle-artifacts"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.port}"
        return {
            "AWS_ENDPOINT_URL": url,
            "MLFLOW_S3_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "test-key",  # moto accepts any; never a real credential
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> S3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / "moto.log"
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto server exited:\n{log.read_text()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start in 30 s") from None
                time.sleep(0.2)
        import boto3

        env = self.env
        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, chars: int = 4000) -> str:
        return f"--- {self.name} ({self.log}) ---\n" + self.log.read_text()[-chars:]


@dataclass
class Deployment:
    """PostgreSQL, the MLflow server, the Dagster code server, daemon and webserver."""

    root: Path
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pg = Postgres()
        self.s3 = S3Server(self.root / "s3")
        self.home = self.root / "dagster"
        self.state = self.root / "state"
        self.mlflow_port, self.code_port, self.web_port = free_port(), free_port(), free_port()
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        self.web_url = f"http://127.0.0.1:{self.web_port}"

    @property
    def env(self) -> dict[str, str]:
        """What a Kubernetes Secret and ConfigMap would give each process."""
        return {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.pg.port),
            "DAGSTER_PG_DB": "dagster",
            "DAGSTER_PG_USERNAME": self.pg.user,
            "DAGSTER_PG_PASSWORD": self.pg.password,
            "LIFECYCLE_ENV": "production",
            "LIFECYCLE_HOME": str(self.state),
            # A run's steps one after another in its process: on 2 cores a process per step
            # would mostly re-import torch. Queue, pools and stores are the deployment's.
            "LIFECYCLE_EXECUTOR": "in_process",
            "LIFECYCLE_TRAINING": "subprocess",  # heavy steps through Dagster Pipes, the default
            "LIFECYCLE_ARTIFACT_ROOT": f"s3://{self.s3.bucket}/store",
            **self.s3.env,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_UI_URL": self.mlflow_url,
            # The model server keeps responses and feedback there; Dagster reads them.
            "LIFECYCLE_FEEDBACK_URL": self.pg.url("feedback"),
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> Deployment:
        self.home.mkdir(parents=True)
        shutil.copy(ROOT / "deploy" / "dagster.yaml", self.home / "dagster.yaml")
        (self.root / "workspace.yaml").write_text(
            "load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
            f"      port: {self.code_port}\n      location_name: lifecycle_dagster\n"
        )
        self.pg.start(databases=("dagster", "mlflow", "feedback"))
        self.s3.start()
        # The install step of deploy/README.md: the `train` pool's limit set once, explicitly.
        done = subprocess.run(
            [str(BIN / "dagster"), "instance", "concurrency", "set", "train", "1"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            raise RuntimeError(f"dagster instance concurrency set failed:\n{done.stderr}")
        self.spawn(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                self.pg.url("mlflow"),
                "--artifacts-destination",
                (self.root / "mlflow-artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
            ],
        )
        self.spawn(
            "code-server",
            [str(BIN / "dagster"), "code-server", "start", "-m", "lifecycle_dagster.definitions"]
            + ["-h", "127.0.0.1", "-p", str(self.code_port)],
        )
        workspace = ["-w", str(self.root / "workspace.yaml")]
        self.spawn("daemon", [str(BIN / "dagster-daemon"), "run", *workspace])
        self.spawn(
            "webserver",
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.web_port)]
            + workspace,
        )
        self.wait_http("MLflow server", f"{self.mlflow_url}/health", 180)
        self.wait_http("Dagster webserver", f"{self.web_url}/server_info", 180)
        return self

    def spawn(self, name: str, cmd: list[str]) -> Process:
        log = self.root / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: its run workers stop with it
            )
        self.processes.append(p := Process(name, proc, log))
        return p

    def check_alive(self) -> None:
        for p in self.processes:
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.proc.returncode}\n{p.tail()}")

    def logs(self) -> str:
        return "\n".join(p.tail(3000) for p in self.processes)

    def wait_http(self, what: str, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(url, timeout=10).ok:
                    return
            except (requests.ConnectionError, requests.Timeout):  # still starting
                pass
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not up after {timeout_s:.0f} s\n{self.logs()}")
            time.sleep(1)

    def wait_for(self, what: str, predicate, deadline: float, every: float = 2.0):
        while True:
            value = predicate()
            if value:
                return value
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(every)

    def cpu_seconds(self) -> dict[str, int]:
        """CPU time each server and everything it started has used so far, for the log."""
        import psutil

        servers = {p.name: p.proc for p in self.processes} | {"s3": self.s3.proc}
        used = {}
        for name, popen in servers.items():
            with contextlib.suppress(psutil.NoSuchProcess, AttributeError):  # gone, or never ran
                proc = psutil.Process(popen.pid)
                total = 0.0
                for q in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        t = q.cpu_times()
                        total += t.user + t.system + t.children_user + t.children_system
                used[name] = round(total)
        return used

    def stop(self) -> list[str]:
        """The daemon first (nothing new is launched or retried), runs still in flight killed (a
        run worker finishes its step before it honours SIGTERM), then SIGTERM to every process
        group, SIGKILL after 20 s; PostgreSQL stopped. Returns the servers still running after
        that (none: everything it started is gone)."""
        import psutil

        print(f"deployment: CPU seconds {self.cpu_seconds()}")
        for p in self.processes:
            if p.name == "daemon" and p.proc.poll() is None:
                os.killpg(p.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.proc.wait(timeout=60)
        for p in self.processes:
            if p.name == "code-server" and p.proc.poll() is None:
                # Run workers are processes the gRPC server spawned (multiprocessing).
                for child in psutil.Process(p.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if "spawn_main" in " ".join(child.cmdline()):
                            for run in [child, *child.children(recursive=True)]:
                                run.kill()
        for p in reversed(self.processes):
            if p.proc.poll() is None:
                os.killpg(p.proc.pid, signal.SIGTERM)
        slow = []
        for p in self.processes:
            try:
                p.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                slow.append(p.name)
                os.killpg(p.proc.pid, signal.SIGKILL)
        if slow:  # e.g. a code server still answering a run it launched as it was killed
            print(f"deployment: SIGKILL after 20 s of SIGTERM: {slow}")
        leftover = [p.name for p in self.processes if _wait(p.proc, 30) is None]
        self.pg.stop()
        self.s3.stop()
        return leftover


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit code, or None if it is still running after ``timeout`` seconds."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(timeout=timeout)
    return None


def greedy_and_other(client, model: str, text: str, tries: int = 30):
    """The greedy answer of an OpenAI-compatible ``client`` to the task input ``text``, and a
    sampled one that differs from it: two answers to the same prompt, for feedback."""
    messages = [{"role": "user", "content": text}]
    greedy = client.chat.completions.create(model=model, messages=messages)
    for seed in range(tries):
        other = client.chat.completions.create(
            model=model, messages=messages, temperature=1.5, seed=seed
        )
        if other.choices[0].message.content != greedy.choices[0].message.content:
            return greedy, other
    raise AssertionError(f"{tries} sampled answers all equal the greedy one: {greedy}")


@contextlib.contextmanager
def in_process(app):
    """``app`` under uvicorn in a thread of this process, on a free loopback port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
