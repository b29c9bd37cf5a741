"""``trustmgr daemon``: the pass on a schedule, metrics, health, a clean stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tests.conftest import PASSPHRASE, REPO
from trustmgr import config as config_mod
from trustmgr.daemon import Daemon, make_trigger
from trustmgr.engine import Workspace, apply
from trustmgr.errors import ConfigError

CONFIG = """\
stateStore: {file: {path: state}}
daemon: {interval: 1s, jitter: 0s, listen: "127.0.0.1:PORT"}
providers:
  corp:
    selfSigned: {passphraseEnv: PASSENV}
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {directory: {path: out/web-1}}
      web-2: {directory: {path: out/web-2}}
intermediates: {ttl: 720h, renewBefore: 240h}
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(workdir: Path, *, passphrase_env: str = "TRUSTMGR_PASSPHRASE") -> tuple[Path, int]:
    port = _port()
    path = workdir / "trustmgr.yaml"
    path.write_text(CONFIG.replace("PORT", str(port)).replace("PASSENV", passphrase_env))
    return path, port


def _expiry(text: str, cluster: str) -> float:
    match = re.search(
        rf'trustmgr_certificate_expiration_timestamp_seconds\{{cluster="{cluster}",kind="cluster-ca",mesh="web"\}} (\S+)',
        text,
    )
    assert match, text
    return float(match.group(1))


def test_the_trigger_runs_every_interval_moved_by_at_most_the_jitter() -> None:
    trigger = make_trigger(timedelta(minutes=5), timedelta(seconds=30))
    previous = datetime(2026, 12, 1, tzinfo=UTC)
    for _ in range(50):
        fire = trigger.get_next_fire_time(previous, previous)
        assert timedelta(minutes=5) <= fire - previous <= timedelta(minutes=5, seconds=30)
        previous = fire
    steady = make_trigger(timedelta(minutes=5), timedelta(0))
    start = datetime(2026, 12, 1, tzinfo=UTC)
    assert steady.get_next_fire_time(start, start) - start == timedelta(minutes=5)


def test_a_jitter_as_long_as_the_interval_is_refused(workdir: Path) -> None:
    path, _ = _config(workdir)
    path.write_text(path.read_text().replace("jitter: 0s", "jitter: 1s"))
    with pytest.raises(ConfigError, match="jitter must be shorter than interval"):
        config_mod.load(path)


def test_a_pass_renews_inside_the_window_and_the_metrics_follow(workdir: Path) -> None:
    path, _ = _config(workdir)
    config = config_mod.load(path)
    now = [datetime.now(UTC)]
    daemon = Daemon(
        config,
        clock=lambda: now[0],
        workspace=lambda: Workspace.build(config, clock=lambda: now[0]),
    )
    first = daemon.run_pass()
    assert first is not None and first.ok and first.changed
    text = generate_latest(daemon.metrics.registry).decode()
    issued = _expiry(text, "web-1")
    assert 'trustmgr_cluster_changes_total{action="issue"} 2.0' in text
    assert "trustmgr_last_successful_pass_timestamp_seconds" in text
    quiet = daemon.run_pass()
    assert quiet is not None and not quiet.changed  # nothing to do: nothing done
    now[0] += timedelta(days=21)  # inside renewBefore
    renewed = daemon.run_pass()
    assert renewed is not None and renewed.changed
    text = generate_latest(daemon.metrics.registry).decode()
    assert _expiry(text, "web-1") > issued
    assert 'trustmgr_cluster_changes_total{action="renew"} 2.0' in text
    assert daemon.health.ready


def test_passes_never_overlap(workdir: Path) -> None:
    path, _ = _config(workdir)
    config = config_mod.load(path)
    daemon = Daemon(
        config,
        clock=lambda: datetime.now(UTC),
        workspace=lambda: Workspace.build(config, clock=lambda: datetime.now(UTC)),
    )
    with daemon._pass_lock:  # a pass in flight
        assert daemon.run_pass() is None
    assert not (workdir / "out").exists()


def test_a_failing_pass_makes_it_unready_not_unhealthy(workdir: Path) -> None:
    path, _ = _config(workdir, passphrase_env="TRUSTMGR_UNSET_FOR_DAEMON")
    config = config_mod.load(path)
    daemon = Daemon(
        config,
        clock=lambda: datetime.now(UTC),
        workspace=lambda: Workspace.build(config, clock=lambda: datetime.now(UTC)),
    )
    assert daemon.run_pass() is None
    assert not daemon.health.ready
    assert "TRUSTMGR_UNSET_FOR_DAEMON is empty or unset" in daemon.health.why_not_ready
    assert daemon.health.alive() == (True, "ok")
    text = generate_latest(daemon.metrics.registry).decode()
    assert 'trustmgr_pass_failures_total{reason="ProviderNeedsFix"} 1.0' in text


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_daemon_process_renews_serves_and_stops_cleanly(workdir: Path) -> None:
    path, port = _config(workdir)
    config = config_mod.load(path)
    # Bootstrapped 29 days ago: the cluster CAs are now inside renewBefore.
    past = datetime.now(UTC) - timedelta(days=29)
    with Workspace.build(config, clock=lambda: past) as ws:
        assert apply(ws).ok
    env = {**os.environ, "TRUSTMGR_PASSPHRASE": PASSPHRASE, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "trustmgr", "daemon", "--log-format", "json"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        renewed = False
        while time.monotonic() < deadline and not renewed:
            time.sleep(0.2)
            try:
                status, text = _get(port, "/metrics")
            except OSError:
                continue
            renewed = status == 200 and 'trustmgr_cluster_changes_total{action="renew"} 2.0' in text
        assert renewed, "the daemon did not renew the cluster CAs"
        assert _expiry(text, "web-1") > (past + timedelta(days=30)).timestamp()
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/readyz")[0] == 200
        assert _get(port, "/nothing")[0] == 404
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err
    assert PASSPHRASE not in out + err
    json_lines = [line for line in err.splitlines() if line.startswith("{")]
    assert any('"message": "pass: 2 changed, 0 failed"' in line for line in json_lines)
