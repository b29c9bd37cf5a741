"""Agent mode against push mode, on ``--clusters`` directory clusters of one
self-signed mesh, in one process, side by side:

* bring-up: push mode, one bootstrap pass; agent mode, the whole exchange
  (publish, every agent's CSR, the central signatures, every agent's write);
* the central pass with nothing to do (the daemon's pass, second and later);
* one agent's pass with nothing to do.

Each figure is the median (min-max) of ``--runs`` runs. Run through
``scripts/bench-agent``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_release import PASSPHRASE_ENV, _config


def now() -> datetime:
    return datetime.now(UTC)


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}–{max(values):.3f} s)"


def _fleet(root: Path, clusters: int, *, agent: bool) -> dict[str, float]:
    from trustmgr import config as config_mod
    from trustmgr.agent.config import AgentConfig
    from trustmgr.agent.document import public_key_pem
    from trustmgr.agent_run import Agent
    from trustmgr.daemon import Daemon
    from trustmgr.engine import apply
    from trustmgr.workspace import Workspace

    root.mkdir()
    os.chdir(root)
    text = _config(clusters)
    if agent:
        text = text.replace("}}\n", "}, mode: agent}\n").replace(
            "{file: {path: state}, mode: agent}", "{file: {path: state}}"
        )
    (root / "trustmgr.yaml").write_text(text)
    config = config_mod.load(root / "trustmgr.yaml")
    agents: list[Agent] = []

    def central() -> None:
        with Workspace.build(config, clock=now) as ws:
            report = apply(ws, workers=32)
            assert report.ok, [o.error for o in report.outcomes if not o.ok][:1]

    def every_agent() -> None:
        for a in agents:
            assert a.run_once().ok

    def bring_up() -> None:
        central()
        if agent:
            with Workspace.build(config, clock=now) as ws:
                key = ws.publisher()
                assert key is not None
                pem = public_key_pem(key.public_key()).decode()
            for i in range(clusters):
                agents.append(
                    Agent.build(
                        AgentConfig.model_validate(
                            {
                                "cluster": f"c-{i:04d}",
                                "publisherKey": pem,
                                "directory": {"path": f"out/c-{i:04d}"},
                            }
                        ),
                        clock=now,
                    )
                )
            every_agent()  # CSRs
            central()  # signatures
            every_agent()  # cacerts written

    up = _timed(bring_up)
    daemon = Daemon(config, clock=now, workspace=lambda: Workspace.build(config, clock=now))
    daemon.run_pass()
    idle = _timed(lambda: daemon.run_pass())
    one = _timed(lambda: agents[0].run_once()) if agents else 0.0
    for a in agents:
        a.close()
    return {"up": up, "idle": idle, "agent": one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ[PASSPHRASE_ENV] = "bench passphrase"
    push: dict[str, list[float]] = {"up": [], "idle": [], "agent": []}
    agent: dict[str, list[float]] = {"up": [], "idle": [], "agent": []}
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="trustmgr-agent-") as tmp:
            for name, into in (("push", push), ("agent", agent)):
                figures = _fleet(Path(tmp) / name, args.clusters, agent=name == "agent")
                for key, value in figures.items():
                    into[key].append(value)
        print(
            f"run {run + 1}/{args.runs}: bring-up push {push['up'][-1]:.2f} s, agent "
            f"{agent['up'][-1]:.2f} s; idle pass push {push['idle'][-1]:.3f} s, agent "
            f"{agent['idle'][-1]:.3f} s",
            file=sys.stderr,
        )
    print(f"| {args.clusters} directory clusters, {args.runs} runs | push mode | agent mode |")
    print("|---|---|---|")
    print(
        f"| bring-up (agent: publish, CSRs, signatures, writes) | {_cell(push['up'])} | {_cell(agent['up'])} |"
    )
    print(f"| central pass with nothing to do | {_cell(push['idle'])} | {_cell(agent['idle'])} |")
    print(f"| one agent's pass with nothing to do | – | {_cell(agent['agent'])} |")


if __name__ == "__main__":
    main()
