"""`maskcls tune` on a real PostgreSQL server (issue 36): two processes share one study, one is killed mid-trial;
the next start leaves no trial RUNNING, every trial has its state, and best.toml reproduces the best trial's
config. A temporary cluster (initdb, pg_ctl) on 127.0.0.1; skipped, saying why, where there is no server binary
or no driver."""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, make_crops

pytest.importorskip("optuna")
pytestmark = pytest.mark.slow


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    return found



@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binary (initdb, pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'psycopg[binary]'")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="maskcls-pg-"))  # not under pytest's root-only folder: the server's user reads it
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster runs as an unprivileged user
        import pwd

        user = "postgres" if any(p.pw_name == "postgres" for p in pwd.getpwall()) else "nobody"
        uid = pwd.getpwnam(user).pw_uid
        for p in (base, sock):
            os.chown(p, uid, -1)
        as_user = ["runuser", "-u", user, "--"]
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    res = run(initdb, "-D", str(data), "-A", "trust", "-U", "maskcls")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run(pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"), "-o",
              f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start")
    assert res.returncode == 0, res.stderr[-2000:] + (base / "log").read_text()[-2000:]
    yield f"postgresql+psycopg://maskcls@127.0.0.1:{port}/postgres"
    run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
    shutil.rmtree(base, ignore_errors=True)


def _trials(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_processes_on_postgres_one_killed_mid_trial(postgres, tmp_path):
    crops = make_crops(tmp_path / "c", people=12, size=16)
    (tmp_path / "space.toml").write_text('[lr]\nlow = 1e-4\nhigh = 3e-3\nlog = true\n')
    study = tmp_path / "s"
    cmd = [sys.executable, str(REPO / "cli.py"), "tune", str(crops), "--out", str(study), "--trials", "3",
           "--space", str(tmp_path / "space.toml"), "--epochs", "2", "--img-size", "32", "--workers", "0",
           "--weights", "none", "--device", "cpu", "--preset", "none", "--model", "resnet18"]
    env = {**os.environ, "MASKCLS_TUNE_STORAGE": postgres}  # the URL from the environment, as the tutorial shows
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    time.sleep(3)  # the first has made the study: the second joins it
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    import optuna

    storage = optuna.storages.RDBStorage(postgres)
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and victim is None:  # the first process's trial, mid-way (an epoch written)
        for s in storage.get_all_studies():
            for t in storage.get_all_trials(s._study_id):
                if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("pid") == first.pid and \
                        (Path(t.user_attrs.get("run", "/nonexistent")) / "metrics.csv").is_file():
                    victim = t.number
        time.sleep(0.2)
    assert victim is not None, "the first process never had a trial mid-way"
    first.send_signal(signal.SIGKILL)
    first.wait()
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)  # the next start
    assert again.returncode == 0, again.stderr[-3000:]
    trials = [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    states = {t.number: t.state.name for t in trials}
    assert states[victim] == "FAIL" and sum(v == "COMPLETE" for v in states.values()) >= 3
    rows = {int(r["number"]): r for r in _trials(study)}
    assert "its process was gone" in rows[victim]["note"]
    best = max((t for t in trials if t.value is not None), key=lambda t: t.value)
    toml = tomllib.loads((study / "best.toml").read_text())["train"]
    config = json.loads((study / f"trial-{best.number}" / "config.json").read_text())
    assert toml["lr"] == pytest.approx(best.params["lr"]) == pytest.approx(config["lr"])
    assert {k: toml[k] for k in ("epochs", "img_size", "model")} == {k: config[k] for k in ("epochs", "img_size", "model")}
