"""Real servers for the distributed tests: a throwaway PostgreSQL cluster (Debian's packages) and an
`mlflow server` process, both on 127.0.0.1 and free ports, torn down afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

USER = "sweeplab"
PASSWORD = "pg-test-secret-7f3a"  # the tests check it never shows up in output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int

    def url(self, database: str, password: bool = False) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql+psycopg://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, *command: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)

    def start(self) -> None:
        subprocess.run(
            self._as_owner(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-w",
                "-t",
                "30",
                "-l",
                str(self.data.parent / "postgres.log"),
                "-o",
                # max_connections: every worker, MLflow server process and helper holds a pool; 100 ran out under load
                f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c max_connections=300",
                "start",
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
            capture_output=True,
        )

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data.parent, ignore_errors=True)

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')


def start_postgres() -> Postgres:
    """A new cluster in its own /tmp folder (pytest's folders are private to root, and PostgreSQL refuses to run
    as root, so as root the cluster belongs to the `postgres` user)."""
    import tempfile

    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql); .ci/run installs it")
    folder = Path(tempfile.mkdtemp(prefix="sweeplab-pg-"))
    password_file = folder / "pw"
    password_file.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(password_file, "postgres")
    server = Postgres(bin_dir, folder / "data", free_port())
    subprocess.run(
        server._as_owner(
            str(bin_dir / "initdb"),
            "-D",
            str(server.data),
            "-U",
            USER,
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ),
        check=True,
        capture_output=True,
    )
    server.start()
    return server


@dataclass
class MlflowServer:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_mlflow_server(backend_uri: str, folder: Path, env: dict[str, str]) -> MlflowServer:
    port = free_port()
    log = folder / "mlflow-server.log"
    process = subprocess.Popen(  # through `sweeplab server`, the command users run
        [
            sys.executable,
            "-m",
            "sweeplab",
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return MlflowServer(process, url, log)
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"mlflow server did not answer within 120 s: {log.read_text()[-2000:]}")
