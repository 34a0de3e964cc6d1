"""Many workers on many machines share one study through PostgreSQL (--storage postgresql://...).

The test starts a real, throw-away PostgreSQL server on 127.0.0.1 and runs two workers against it;
it skips, saying why, where no server can be started here.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_harness import SUITE, WORKER, _load_keys

psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 not installed (pip install -e '.[test]')")


def _binary(name):
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    return found


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); install Debian's postgresql to run this test")
    prefix = []
    home = Path(tempfile.mkdtemp(prefix="tafm-pg-"))  # outside pytest's private tmp: the server user must reach it
    data = home / "data"
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as an unprivileged user
        if not shutil.which("runuser"):
            pytest.skip("running as root and no runuser to start PostgreSQL as an unprivileged user")
        prefix = ["runuser", "-u", "nobody", "--"]
        home.chmod(0o777)
    port = _free_port()
    log = data.parent / "pg.log"
    subprocess.run(prefix + [initdb, "-D", str(data), "-A", "trust", "-U", "tafm"], check=True, capture_output=True)
    subprocess.run(prefix + [pg_ctl, "-D", str(data), "-l", str(log), "-w", "-o",
                             f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        for _ in range(50):
            try:
                psycopg2.connect(host="127.0.0.1", port=port, user="tafm", dbname="postgres").close()
                break
            except psycopg2.OperationalError:
                time.sleep(0.2)
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="tafm", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE optuna")
        connection.cursor().execute("CREATE DATABASE fresh")
        connection.close()
        yield f"postgresql+psycopg2://tafm@127.0.0.1:{port}/"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(postgres, tmp_path):
    suite = tmp_path / "harness_test.yaml"
    suite.write_text(SUITE)
    procs = []
    for worker in range(2):  # as if on two machines: separate runs folders, one shared study
        runs = tmp_path / f"machine{worker}"
        cmd = [sys.executable, str(WORKER), str(suite), str(runs), "--sleep", "0.3", "--storage", postgres + "optuna"]
        procs.append((runs, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    calls = []
    for runs, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        log = runs / "calls.log"
        calls += log.read_text().split()[::2] if log.exists() else []
    assert sorted(calls) == sorted(_load_keys(suite)), "each grid point exactly once across both machines"
    assert all((runs / "calls.log").exists() for runs, _ in procs), "both workers took trials"


OPEN_AT = """
import sys, time
from pathlib import Path
from ablations.harness import RunOptions, open_study
from ablations.suite import load_suite
suite, runs, url, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))
open_study(load_suite(suite), RunOptions(runs_dir=Path(runs), storage=url))
"""


def test_workers_starting_at_once_on_a_fresh_database_all_get_the_study(postgres, tmp_path):
    """Optuna creates its schema on first use; machines share no file lock, so the server must serialise it."""
    suite = tmp_path / "harness_test.yaml"
    suite.write_text(SUITE)
    start = time.time() + 10.0  # after every interpreter has imported torch/optuna
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(suite), str(tmp_path / f"machine{i}"), postgres + "fresh",
                               str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-1500:]
