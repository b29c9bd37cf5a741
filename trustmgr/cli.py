"""The trustmgr command line. Errors reach the user in one place, ``main``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import yaml

from trustmgr import __version__, graph
from trustmgr import config as config_mod
from trustmgr.atomic import write_atomic
from trustmgr.engine import (
    ClusterOutcome,
    Report,
    Workspace,
    apply,
    change_rotation,
    current_federation,
    make_plan,
    now_utc,
    rollback,
    spiffe_export,
    start_rotation,
)
from trustmgr.errors import ConfigError, TargetError, TrustmgrError
from trustmgr.federation import Finding, config_findings, mesh_config_fragment
from trustmgr.observe import observe_all
from trustmgr.planner import CANARY_FIRST, Action, ClusterPlan, Plan, decide, rotation_clusters
from trustmgr.providers import ProviderError, ProviderNeedsFixError
from trustmgr.rekey import previous_protection, rekey
from trustmgr.status import cluster_status, held_trust, verify_all

log = logging.getLogger("trustmgr")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CHANGES_PENDING = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


@dataclass
class Context:
    config_path: Path = field(
        default_factory=lambda: Path(os.environ.get("TRUSTMGR_CONFIG") or config_mod.DEFAULT_CONFIG)
    )
    debug: bool = False
    verbosity: int = 0

    @property
    def verbose(self) -> bool:
        return self.verbosity > 0

    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    def workspace(self) -> Workspace:
        return Workspace.build(self.config(), clock=now_utc)


output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)
workers_option = click.option(
    "--workers",
    default=32,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Clusters worked on at once.",
)
adopt_option = click.option(
    "--adopt",
    is_flag=True,
    help="Replace cacerts that trustmgr did not create, keeping the previous one for rollback.",
)


def _set_config(ctx: click.Context, _: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(Context).config_path = value


def _set_verbose(ctx: click.Context, _: click.Parameter, value: int) -> None:
    if value:
        obj = ctx.ensure_object(Context)
        obj.verbosity += value
        _log_levels(obj.verbosity)


def _set_debug(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Context).debug = True


def _log_levels(verbosity: int) -> None:
    # Only trustmgr's own loggers get more verbose: SDKs (botocore, urllib3, hvac,
    # kubernetes) log request headers and bodies at DEBUG, tokens and keys included.
    level = max(logging.WARNING - 10 * verbosity, logging.DEBUG)
    logging.getLogger("trustmgr").setLevel(level)


def global_options(f: Any) -> Any:
    """-c/--config, -v/--verbose and --debug, accepted before or after the
    subcommand, as kubectl and helm users type them."""
    options = (
        click.option(
            "-c",
            "--config",
            type=click.Path(path_type=Path),
            expose_value=False,
            callback=_set_config,
            help=f"Configuration file (default: $TRUSTMGR_CONFIG or {config_mod.DEFAULT_CONFIG}).",
        ),
        click.option(
            "-v",
            "--verbose",
            count=True,
            expose_value=False,
            callback=_set_verbose,
            help="More log output (-vv for debug logs).",
        ),
        click.option(
            "--debug",
            is_flag=True,
            expose_value=False,
            callback=_set_debug,
            help="Show tracebacks.",
        ),
    )
    # A function's decorators apply bottom-up; a Command's params append in order.
    for option in options if isinstance(f, click.Command) else reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@global_options
@click.version_option(__version__, prog_name="trustmgr")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Multi-cluster trust and certificate manager for Istio."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(Context)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "pending": plan.pending,
        "providers": [
            {"provider": p.provider, "createRoot": p.create_root, "fingerprint": p.fingerprint}
            for p in plan.providers
        ],
        "rotations": [
            {
                "key": r.key,
                "provider": r.record.provider,
                "mesh": r.record.mesh or None,
                "fromProvider": r.record.from_provider or None,
                "id": r.record.id,
                "phase": str(r.record.phase),
                "advancedFrom": str(r.advanced_from) if r.advanced_from else None,
                "finished": r.finished,
                "aborted": r.aborted,
                "started": r.started,
                "blocked": r.blocked or None,
            }
            for r in plan.rotations
        ],
        "clusters": [
            {
                "cluster": c.cluster,
                "mesh": c.mesh,
                "action": str(c.action),
                "reason": c.reason,
                "message": c.message,
                "istiodReload": str(c.reload),
                "istiodRestart": c.restarts,
                "trustAgentKey": c.trust_agent or None,
            }
            for c in plan.clusters
        ],
    }


@cli.command()
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.pass_obj
def init(obj: Context, force: bool) -> None:
    """Write a starter configuration."""
    if obj.config_path.exists() and not force:
        raise click.UsageError(f"{obj.config_path} exists; use --force to overwrite it")
    try:
        write_atomic(obj.config_path, STARTER_CONFIG.encode())
    except OSError as exc:
        raise TargetError(f"cannot write {obj.config_path}: {exc.strerror}") from None
    click.echo(f"wrote {obj.config_path}; set TRUSTMGR_PASSPHRASE, then run `trustmgr plan`")


@cli.command()
@click.pass_obj
def validate(obj: Context) -> None:
    """Check the configuration; list every problem."""
    cfg = obj.config()
    clusters = sum(len(m.clusters) for m in cfg.meshes.values())
    _print_findings(config_findings(cfg))  # offline: no provider is asked anything
    click.echo(
        f"{obj.config_path}: valid ({len(cfg.providers)} providers, {len(cfg.meshes)} meshes, "
        f"{clusters} clusters, {len(cfg.federations)} federations)"
    )


@cli.command("plan")
@output_option
@click.option("--detailed-exitcode", is_flag=True, help="Exit 3 when changes are pending.")
@workers_option
@adopt_option
@click.pass_obj
def plan_cmd(obj: Context, output: str, detailed_exitcode: bool, workers: int, adopt: bool) -> None:
    """Show what bootstrap or reconcile would change, and why."""
    with obj.workspace() as ws:
        plan = make_plan(ws, workers=workers, adopt=adopt)
    if output == "json":
        _echo_json(_plan_json(plan))
    else:
        for p in plan.providers:
            click.echo(f"provider {p.provider}: create root {p.fingerprint[:16]}…")
        for line in _rotation_lines(plan):
            click.echo(line)
        rows = [
            (
                c.cluster,
                c.mesh,
                str(c.action),
                c.reason,
                c.message + _restart_note(ws, c.cluster, c.restarts) + _trust_note(c),
            )
            for c in plan.clusters
        ]
        click.echo(_table(rows, ("CLUSTER", "MESH", "ACTION", "REASON", "DETAIL")))
        pending = sum(c.changes for c in plan.clusters)
        click.echo(
            f"{pending} of {len(plan.clusters)} clusters to change"
            if plan.pending
            else "nothing to do"
        )
    if any(c.action is Action.FAIL for c in plan.clusters):
        sys.exit(EXIT_FAILED)  # a target that cannot be read: the plan is incomplete
    if detailed_exitcode and plan.pending:
        sys.exit(EXIT_CHANGES_PENDING)


def _trust_note(c: ClusterPlan) -> str:
    if not c.trust_agent:
        return ""
    return f"; trusts agent key {c.trust_agent[:16]}… (its first report)"


def _rotation_lines(plan: Plan) -> list[str]:
    lines = []
    for step in plan.rotations:
        head = f"{step.record.what} ({step.record.id}):"
        if step.started:
            lines.append(
                f"{head} starts at prepared, new root {step.record.new_roots[0][:16]}…; {step.blocked}"
            )
        elif step.finished:
            lines.append(f"{head} old-removed converged; the new root becomes the current one")
        elif step.aborted:
            lines.append(f"{head} aborted; the rotation is dropped")
        elif step.advanced_from is not None:
            lines.append(f"{head} {step.advanced_from} -> {step.record.phase}")
        else:
            lines.append(f"{head} at {step.record.phase}; {step.blocked}")
    return lines


def _restart_note(ws: Workspace, cluster: str, needed: bool) -> str:
    if not needed:
        return ""
    if ws.cluster_config(cluster).istio.restart_istiod:
        return " (istiod will be restarted)"
    return " (istiod restart needed)"


def _report(
    report: Report, output: str, ws: Workspace, *, verbose: bool, interrupted_by: list[int]
) -> None:
    if output == "json":
        _echo_json(
            {
                "ok": report.ok,
                "changed": report.changed,
                "interrupted": report.interrupted,
                "rootsCreated": list(report.roots_created),
                "clusters": [
                    {
                        "cluster": o.cluster,
                        "mesh": o.mesh,
                        "action": str(o.action),
                        "reason": o.reason,
                        "message": o.message,
                        "ok": o.ok,
                        "error": o.error,
                        "istiod": o.istiod,
                        "started": o.started,
                        "target": ws.description(o.cluster),
                    }
                    for o in report.outcomes
                ],
            }
        )
    else:
        _report_table(report, ws, verbose=verbose)
    if interrupted_by:
        sys.exit(128 + interrupted_by[0])
    if not report.ok:
        sys.exit(EXIT_FAILED)


def _report_table(report: Report, ws: Workspace, *, verbose: bool) -> None:
    """A line for every cluster that changed or failed (and, with -v, for those
    left unchanged), failures on stderr; then the counts, which cover all."""
    for provider in report.roots_created:
        click.echo(f"created root of provider {provider}")
    for line in _rotation_lines(report.plan):
        click.echo(line)
    for o in report.outcomes:
        istiod = f" (istiod {o.istiod})" if o.istiod and o.ok else ""
        if o.action is Action.NONE:
            if verbose:
                click.echo(f"{'unchanged':<13} {o.cluster}")
        elif o.action is Action.AWAIT:
            click.echo(f"{'waiting':<13} {o.cluster}: {o.message}")
        elif o.ok:
            where = ws.description(o.cluster)
            click.echo(f"{o.action:<13} {o.cluster} ({o.reason}) -> {where}{istiod}")
        elif not o.started:
            click.echo(f"{'not started':<13} {o.cluster}", err=True)
        else:
            verdict = "refused" if o.action is Action.REFUSE else "failed"
            click.echo(f"{verdict:<13} {o.cluster}: {o.error}", err=True)
    done = sum(1 for o in report.outcomes if o.ok and o.action.changes)
    refused = sum(1 for o in report.outcomes if o.action is Action.REFUSE)
    unstarted = sum(1 for o in report.outcomes if not o.started)
    failed = sum(1 for o in report.outcomes if not o.ok) - refused - unstarted
    same = sum(1 for o in report.outcomes if o.action is Action.NONE)
    restart = sum(1 for o in report.outcomes if o.istiod == "restart needed")
    line = f"{len(report.outcomes)} clusters: {done} changed, {same} up to date, {failed} failed"
    waiting = sum(1 for o in report.outcomes if o.action is Action.AWAIT)
    line += f", {waiting} waiting for their agent" if waiting else ""
    line += f", {refused} refused" if refused else ""
    line += f", {unstarted} not started (interrupted; run again)" if unstarted else ""
    line += f"; {restart} need an istiod restart" if restart else ""
    click.echo(line)


class _Progress:
    """A progress bar on a terminal (stderr), plain lines otherwise."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._bar: Any = None

    def __call__(self, done: int, total: int, outcome: ClusterOutcome) -> None:
        if not self._tty:
            if outcome.action is Action.NONE:
                return
            verdict = "ok" if outcome.ok else "failed"
            click.echo(f"[{done}/{total}] {outcome.cluster}: {outcome.action} {verdict}", err=True)
            return
        if self._bar is None:
            self._bar = click.progressbar(length=total, label="clusters", file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


@contextmanager
def stopping_on_signals() -> Iterator[tuple[threading.Event, list[int]]]:
    """SIGTERM and SIGINT set the event: a run stops starting new clusters,
    finishes those in flight and saves what completed. A second signal stops at
    once (what was written is recognised and recorded by the next run)."""
    stop, received = threading.Event(), []

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        click.echo(
            f"trustmgr: {signal.Signals(signum).name}: finishing the clusters in flight "
            "(signal again to stop at once)",
            err=True,
        )

    if threading.current_thread() is not threading.main_thread():
        yield stop, received  # signals are delivered to the main thread only
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop, received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _apply(obj: Context, output: str, workers: int, adopt: bool) -> None:
    progress = _Progress()
    with obj.workspace() as ws, stopping_on_signals() as (stop, received):
        try:
            report = apply(ws, workers=workers, adopt=adopt, progress=progress, stop=stop)
        finally:
            progress.close()
        _report(report, output, ws, verbose=obj.verbose, interrupted_by=received[:1])


@cli.command()
@output_option
@workers_option
@adopt_option
@click.pass_obj
def bootstrap(obj: Context, output: str, workers: int, adopt: bool) -> None:
    """Create roots and cluster CAs and write every target. Safe to re-run."""
    _apply(obj, output, workers, adopt)


@cli.command()
@output_option
@workers_option
@adopt_option
@click.pass_obj
def reconcile(obj: Context, output: str, workers: int, adopt: bool) -> None:
    """Apply renewals and repairs on a live system; the scheduled form of bootstrap."""
    _apply(obj, output, workers, adopt)


@cli.command("rollback")
@click.option("--cluster", required=True, help="The cluster whose previous cacerts to put back.")
@output_option
@click.pass_obj
def rollback_cmd(obj: Context, cluster: str, output: str) -> None:
    """Put back the cacerts a cluster held before trustmgr's last write to it."""
    with obj.workspace() as ws:
        done = rollback(ws, cluster)
        description = ws.targets[cluster].description
    if output == "json":
        _echo_json(
            {
                "cluster": done.cluster,
                "serial": done.restored.serial,
                "managed": done.managed,
                "savedAt": done.saved_at,
                "istiod": done.istiod,
                "target": description,
            }
        )
        return
    saved = f", kept at {done.saved_at}" if done.saved_at else ""
    origin = "" if done.managed else "; it was not trustmgr's: the next bootstrap needs --adopt"
    istiod = f" (istiod {done.istiod})" if done.istiod else ""
    click.echo(
        f"rolled back {done.cluster}: restored CA serial {done.restored.serial or '-'}{saved} "
        f"-> {description}{istiod}{origin}"
    )


@cli.command()
@output_option
@click.pass_obj
def status(obj: Context, output: str) -> None:
    """Per cluster: CA serial, expiry, roots in the bundle, drift."""
    with obj.workspace() as ws:
        rows = cluster_status(ws)
    if output == "json":
        _echo_json([r.to_json() for r in rows])
        return
    click.echo(
        _table(
            [
                (
                    r.cluster,
                    r.mesh,
                    r.serial or "-",
                    _date(r.not_after),
                    str(r.days_left) if r.days_left is not None else "-",
                    str(r.roots),
                    r.drift or "no",
                )
                for r in rows
            ],
            ("CLUSTER", "MESH", "SERIAL", "NOT AFTER", "DAYS LEFT", "ROOTS", "DRIFT"),
        )
    )


def _date(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}Z" if value else "-"


@cli.command()
@output_option
@click.pass_obj
def verify(obj: Context, output: str) -> None:
    """Check every cluster's material against istiod's load checks and the policy."""
    with obj.workspace() as ws:
        results = verify_all(ws)
    if output == "json":
        _echo_json({"ok": not any(results.values()), "clusters": results})
    else:
        for cluster, problems in results.items():
            if problems:
                for p in problems:
                    click.echo(f"FAIL {cluster}: {p}")
            else:
                click.echo(f"ok   {cluster}")
    if any(results.values()):
        sys.exit(EXIT_FAILED)


@cli.command()
@click.option("--once", is_flag=True, help="Run one pass and exit, with reconcile's exit code.")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@workers_option
@click.pass_obj
def daemon(obj: Context, once: bool, log_format: str, workers: int) -> None:
    """Run the reconcile pass on a schedule, serving /metrics, /healthz and /readyz."""
    from trustmgr.daemon import Daemon
    from trustmgr.logs import use_json

    if log_format == "json":
        use_json()
    logging.getLogger("trustmgr").setLevel(
        min(logging.INFO, logging.getLogger("trustmgr").getEffectiveLevel())
    )
    config = obj.config()
    runner = Daemon(
        config,
        clock=now_utc,
        workspace=lambda: Workspace.build(config, clock=now_utc),
        workers=workers,
        election=not once,
    )
    if once:
        report = runner.run_pass()
        if report is None:
            sys.exit(EXIT_FAILED)
        sys.exit(EXIT_OK if report.ok else EXIT_FAILED)
    with stopping_on_signals() as (stop, received):
        runner.stop = stop
        runner.run()
    sys.exit(128 + received[0] if received else EXIT_OK)


@cli.group("agent")
def agent_group() -> None:
    """Agent mode: the cluster CA key is made in its cluster (docs/agent.md)."""


@agent_group.command("publisher-key")
@click.option("--out", type=click.Path(path_type=Path), help="Write the PEM here instead.")
@click.option(
    "--next",
    "next_",
    is_flag=True,
    help="Make the key that replaces it (once), and print both: what agents trust meanwhile.",
)
@click.option(
    "--promote",
    is_flag=True,
    help="Sign documents with the next key from now on (agents must trust it already).",
)
@click.pass_obj
def agent_publisher_key(obj: Context, out: Path | None, next_: bool, promote: bool) -> None:
    """Print the public key agents check desired documents with (made on first use).
    To replace it: --next, give agents both keys, --promote, then the new key alone."""
    from trustmgr.agent import publisher
    from trustmgr.agent.document import key_id, public_key_pem

    if next_ and promote:
        raise click.UsageError("--next and --promote are two steps: run them one after another")
    with obj.workspace() as ws:
        blobs = ws.store.blobs()
        current = publisher.load(blobs)
        if current is not None and not (next_ or promote):
            keys = [current]  # only read: no lock
        else:
            with ws.store.lock():
                if promote:
                    keys = [publisher.promote(blobs)]
                else:
                    keys = [publisher.ensure(blobs)]
                    if next_:
                        keys.append(publisher.ensure_next(blobs))
    data = b"".join(public_key_pem(k.public_key()) for k in keys)
    ids = " and ".join(f"{key_id(k.public_key())[:16]}…" for k in keys)
    if out is not None:
        _write_output(out, data)
        click.echo(f"wrote {out} (key {ids})", err=True)
    else:
        click.echo(data.decode(), nl=False)
    if promote:
        click.echo(
            f"trustmgr: documents are signed with key {ids} from the next pass on; once every "
            "agent has its documents again, give agents this key alone",
            err=True,
        )


@agent_group.command("identity")
@click.pass_obj
def agent_identity(obj: Context) -> None:
    """Print this agent's identity key (made on first use): the cluster's agentKey
    in the central configuration, which trusts only reports it signed."""
    from trustmgr.agent import config as agent_config
    from trustmgr.agent.document import key_id, public_key_pem
    from trustmgr.agent_run import Agent

    agent = Agent.build(agent_config.load(obj.config_path), clock=now_utc)
    try:
        key = agent.identity()
    finally:
        agent.close()
    click.echo(f"# agent key {key_id(key)[:16]}… of cluster {agent.config.cluster}", err=True)
    click.echo(public_key_pem(key).decode(), nl=False)


@agent_group.command("run")
@click.option(
    "--once", is_flag=True, help="Run one pass and exit: 0 converged or waiting, else 1 or 2."
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_obj
def agent_run(obj: Context, once: bool, log_format: str) -> None:
    """Keep this cluster's cacerts as the central run's desired document says,
    with a CA key made here (the configuration is the agent's: docs/agent.md)."""
    from trustmgr.agent import config as agent_config
    from trustmgr.agent_run import Agent, run_forever

    if log_format == "json":
        from trustmgr.logs import use_json

        use_json()
    logging.getLogger("trustmgr").setLevel(
        min(logging.INFO, logging.getLogger("trustmgr").getEffectiveLevel())
    )
    config = agent_config.load(obj.config_path)
    agent = Agent.build(config, clock=now_utc)
    try:
        if once:
            result = agent.run_once(log_errors=False)
            if result.error:
                click.echo(f"trustmgr: {result.error}", err=True)
            sys.exit(result.exit_code)
        with stopping_on_signals() as (stop, received):
            run_forever(agent, stop)
        sys.exit(128 + received[0] if received else EXIT_OK)
    finally:
        agent.close()


@cli.group()
def rotate() -> None:
    """Root rotation: a new root brought to every cluster without an outage."""


@rotate.command("start")
@click.option("--provider", required=True, help="The provider whose root to renew.")
@click.pass_obj
def rotate_start(obj: Context, provider: str) -> None:
    """Make the provider's new root and record the rotation; `reconcile` carries it out."""
    with obj.workspace() as ws:
        record = start_rotation(ws, provider)
    click.echo(
        f"rotation {record.id} of provider {provider}: prepared, new root "
        f"{record.new_roots[0][:16]}…; `trustmgr plan` shows the next phase, "
        "`trustmgr reconcile` carries it out"
    )


@rotate.command("status")
@output_option
@click.pass_obj
def rotate_status(obj: Context, output: str) -> None:
    """Per rotation: phase, per-cluster progress, what blocks the next phase."""
    with obj.workspace() as ws:
        observation = observe_all(ws)
        plan = decide(ws.config, observation, advance=False)
        ahead = {s.key: s for s in decide(ws.config, observation).rotations}
        config = ws.config
    rows: list[dict[str, Any]] = []
    for step in plan.rotations:
        record = plan.rotations_before[step.key]
        step = ahead[step.key]
        affected = rotation_clusters(config, record)
        clusters = [
            {
                "cluster": c.cluster,
                "converged": not c.pending and c.reason != CANARY_FIRST,
                "next": ""
                if not c.pending and c.reason != CANARY_FIRST
                else f"{c.action} ({c.reason})",
            }
            for c in plan.clusters
            if c.cluster in affected
        ]
        rows.append(
            {
                "key": step.key,
                "provider": record.provider,
                "mesh": record.mesh or None,
                "fromProvider": record.from_provider or None,
                "what": record.what,
                "id": record.id,
                "phase": str(record.phase),
                "phaseSince": record.phase_at.isoformat(),
                "held": record.held,
                "aborting": record.aborting,
                "oldRoots": list(record.old_roots),
                "newRoots": list(record.new_roots),
                "nextPhase": str(step.record.phase) if step.advanced_from else None,
                "blocked": step.blocked or None,
                "clusters": clusters,
            }
        )
    if output == "json":
        _echo_json(rows)
        return
    if not rows:
        click.echo("no rotation in progress")
    for row in rows:
        done = sum(1 for c in row["clusters"] if c["converged"])
        click.echo(
            f"{row['what']} ({row['id']}) at {row['phase']} since "
            f"{row['phaseSince']}; {done} of {len(row['clusters'])} clusters converged"
        )
        if row["nextPhase"]:
            click.echo(f"  next pass: {row['nextPhase']}")
        if row["blocked"]:
            click.echo(f"  blocked: {row['blocked']}")
        for c in row["clusters"]:
            if not c["converged"]:
                click.echo(f"  {c['cluster']}: {c['next']}")


def _rotation_change(obj: Context, provider: str | None, mesh: str | None, how: str) -> None:
    if (provider is None) == (mesh is None):
        raise click.UsageError("name the rotation with --provider NAME or, for a move, --mesh NAME")
    key = f"mesh/{mesh}" if mesh else str(provider)
    with obj.workspace() as ws:
        record = change_rotation(ws, key, how)
    option = f"--mesh {mesh}" if mesh else f"--provider {provider}"
    then = {
        "rollback": f"held at {record.phase}; `trustmgr reconcile` converges to it, "
        f"`trustmgr rotate resume {option}` continues",
        "abort": "`trustmgr reconcile` takes the new root out of every bundle, then drops it",
        "resume": "`trustmgr reconcile` continues",
    }[how]
    click.echo(f"{record.what} ({record.id}): {then}")


_which_rotation = (
    click.option("--provider", help="The provider whose root is being renewed."),
    click.option("--mesh", help="The mesh being moved to another provider."),
)


def _named(f: Any) -> Any:
    for option in reversed(_which_rotation):
        f = option(f)
    return f


@rotate.command("rollback")
@_named
@click.pass_obj
def rotate_rollback(obj: Context, provider: str | None, mesh: str | None) -> None:
    """Go back one phase (from trust-distributed or issuer-switched) and hold there."""
    _rotation_change(obj, provider, mesh, "rollback")


@rotate.command("abort")
@_named
@click.pass_obj
def rotate_abort(obj: Context, provider: str | None, mesh: str | None) -> None:
    """Before the issuer switch: put everything back as before the rotation."""
    _rotation_change(obj, provider, mesh, "abort")


@rotate.command("resume")
@_named
@click.pass_obj
def rotate_resume(obj: Context, provider: str | None, mesh: str | None) -> None:
    """Let a held rotation advance again."""
    _rotation_change(obj, provider, mesh, "resume")


@cli.group()
def trust() -> None:
    """Who trusts whom: the trust matrix and the federation graph."""


def _print_findings(findings: list[Finding]) -> None:
    for finding in findings:
        click.echo(f"{finding.level}: {finding.message}", err=True)


@trust.command("matrix")
@output_option
@click.pass_obj
def trust_matrix(obj: Context, output: str) -> None:
    """Which mesh accepts the identities of which, and why."""
    with obj.workspace() as ws:
        federation = current_federation(ws)
        held = held_trust(ws)
    cells = federation.matrix()
    if output == "json":
        _echo_json(
            [
                {
                    "accepting": c.accepting,
                    "presenting": c.presenting,
                    "accepted": c.accepted,
                    "trust": str(c.trust),
                    "why": c.why,
                }
                for c in cells
            ]
        )
        return
    names = list(federation.meshes)
    symbol = {"own mesh": "own", "federation": "yes", "shared root only": "root*", "none": "-"}
    rows = [[a, *(symbol[str(federation.cell(a, p).trust)] for p in names)] for a in names]
    click.echo("rows accept identities of columns")
    click.echo(_table(rows, ("ACCEPTS \\ FROM", *names)))
    if any(c.trust.value == "shared root only" for c in cells):
        click.echo(
            "root*: the chain verifies through a shared root, but the trust-domain check rejects it"
        )
    for cluster, problems in sorted(held.items()):
        where = "its agent reports" if cluster in ws.exchanges else "it holds"
        click.echo(f"cluster {cluster} does not act on this yet: {where} {'; '.join(problems)}")
    _print_findings(federation.findings())


@trust.command("graph")
@click.option(
    "-f",
    "--format",
    "fmt",
    type=click.Choice(["dot", "mermaid", "svg"]),
    default="dot",
    show_default=True,
)
@click.option("--out", type=click.Path(path_type=Path), help="Write to a file instead of stdout.")
@click.pass_obj
def trust_graph(obj: Context, fmt: str, out: Path | None) -> None:
    """Meshes, their providers and federations, as DOT, Mermaid or SVG."""
    with obj.workspace() as ws:
        federation = current_federation(ws)
    text = {"dot": graph.to_dot, "mermaid": graph.to_mermaid, "svg": graph.to_svg}[fmt](federation)
    if out is None:
        click.echo(text, nl=False)
    else:
        _write_output(out, text.encode())


@cli.group("federation")
def federation_group() -> None:
    """What each mesh's istiod needs to accept its federated peers."""


@federation_group.command("export")
@click.option("--mesh", required=True, help="The mesh whose istiod the fragment is for.")
@click.option(
    "-o", "--output", type=click.Choice(["meshconfig"]), default="meshconfig", show_default=True
)
@click.option(
    "--multi-root/--aliases-only",
    default=None,
    help="Add caCertificates entries (default: when a cluster of the mesh has istio.multiRoot).",
)
@click.pass_obj
def federation_export(obj: Context, mesh: str, output: str, multi_root: bool | None) -> None:
    """The meshConfig fragment to merge into istiod's Helm values."""
    with obj.workspace() as ws:
        _known_mesh(ws, mesh)
        federation = current_federation(ws)
    if multi_root is None:
        multi_root = any(c.istio.multi_root for c in ws.config.meshes[mesh].clusters.values())
    fragment = mesh_config_fragment(federation, mesh, multi_root=multi_root)
    click.echo(yaml.safe_dump(fragment, sort_keys=False), nl=False)


@cli.group("bundle")
def bundle_group() -> None:
    """SPIFFE trust bundles, for exchange with SPIRE and Istio's spiffeBundleUrl."""


@bundle_group.command("export")
@click.option("--mesh", required=True, help="The mesh whose roots the bundle carries.")
@click.option("--out", type=click.Path(path_type=Path), help="Write to a file instead of stdout.")
@click.option(
    "--refresh-hint", default=300, show_default=True, help="spiffe_refresh_hint, in seconds."
)
@click.pass_obj
def bundle_export(obj: Context, mesh: str, out: Path | None, refresh_hint: int) -> None:
    """The mesh's SPIFFE bundle (JWKS); spiffe_sequence increases whenever its roots change."""
    with obj.workspace() as ws:
        _known_mesh(ws, mesh)
        roots = current_federation(ws).meshes[mesh].roots
        if not roots:
            raise click.UsageError(f"mesh {mesh} has no root yet; run `trustmgr bootstrap` first")
        if out is not None and not out.parent.is_dir():
            raise TargetError(f"cannot write {out}: {out.parent} is not a directory")
        data = spiffe_export(ws, mesh, roots, refresh_hint)
    if out is None:
        click.echo(data.decode(), nl=False)
    else:
        _write_output(out, data)


@cli.group("state")
def state_group() -> None:
    """What trustmgr keeps in its state store."""


@state_group.command("rekey")
@click.option("--provider", required=True, help="The self-signed provider whose root key to move.")
@click.option(
    "--from-passphrase-env",
    metavar="VAR",
    help="The variable holding the passphrase the key is sealed with now.",
)
@click.option(
    "--from-passphrase-file",
    type=click.Path(path_type=Path),
    help="A file holding the passphrase the key is sealed with now.",
)
@click.option(
    "--from-config",
    type=click.Path(path_type=Path),
    help="A configuration whose settings of the provider protect the key now.",
)
@click.pass_obj
def state_rekey(
    obj: Context,
    provider: str,
    from_passphrase_env: str | None,
    from_passphrase_file: Path | None,
    from_config: Path | None,
) -> None:
    """Protect a self-signed root key as the configuration now says (a new
    passphrase, or keyEncryption), opening it as the --from option says; with
    none, seal it afresh under the configured protection."""
    cfg = obj.config()
    previous = previous_protection(
        cfg,
        provider,
        passphrase_env=from_passphrase_env,
        passphrase_file=from_passphrase_file,
        config_path=from_config,
    )
    for done in rekey(cfg, provider, previous=previous, clock=now_utc):
        root = f"provider {provider}, root {done.fingerprint[:16]}…"
        if done.generation:
            root += f" (generation {done.generation})"
        if done.result.changed:
            click.echo(
                f"{root}: {done.result.before} -> {done.result.after}; opened again before it "
                "replaced the stored key"
            )
        else:
            click.echo(f"{root}: already {done.result.after}; nothing changed")


@state_group.command("migrate")
@click.option(
    "--to",
    "--to-config",
    "to",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A configuration file whose stateStore names the destination.",
)
@click.pass_obj
def state_migrate(obj: Context, to: Path) -> None:
    """Copy the state and blobs into an empty store; verify the copy."""
    from trustmgr.state.build import build_store
    from trustmgr.state.migrate import migrate

    source = build_store(obj.config().state_store)
    try:
        destination = build_store(config_mod.load(to).state_store)
        try:
            done = migrate(source, destination)
        finally:
            destination.close()
    finally:
        source.close()
    click.echo(
        f"copied the state ({len(done.state.clusters)} clusters, {len(done.state.rotations)} "
        f"rotations) and {len(done.blobs)} blobs from {done.source} to {done.destination}, "
        f"and read them back equal; use {to} (or its stateStore) from now on, and remove the "
        "old store once it is no longer needed"
    )


def _write_output(out: Path, data: bytes) -> None:
    try:
        write_atomic(out, data)
    except OSError as exc:
        raise TargetError(f"cannot write {out}: {exc.strerror}") from None
    click.echo(f"wrote {out}")


def _known_mesh(ws: Workspace, mesh: str) -> None:
    if mesh not in ws.config.meshes:
        known = ", ".join(ws.config.meshes)
        raise click.BadParameter(f"unknown mesh {mesh!r} (known: {known})", param_hint="--mesh")


STARTER_CONFIG = """\
# trustmgr configuration. Reference: docs/configuration.md
stateStore:
  file: {path: .trustmgr}
providers:
  corp:
    selfSigned:
      keyAlgorithm: ECDSA_P256
      ttl: 87600h
      subject: {organization: Example Corp, commonName: Example Corp Root CA}
      passphraseEnv: TRUSTMGR_PASSPHRASE
meshes:
  web:
    trustDomain: web.example
    provider: corp
    clusters:
      web-1: {directory: {path: out/web-1}}
intermediates:
  keyAlgorithm: ECDSA_P256
  ttl: 720h
  renewBefore: 240h
"""


def _with_global_options(group: click.Group) -> None:
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _with_global_options(command)
        else:
            global_options(command)


_with_global_options(cli)


def _error_lines(exc: BaseException) -> list[str]:
    if isinstance(exc, ConfigError):
        return exc.lines()
    return [str(exc)]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: exit 0 done, 1 failed, 2 bad input, 3 changes pending (plan)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="trustmgr", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_BAD_INPUT)
    except click.exceptions.Abort:
        click.echo("trustmgr: interrupted", err=True)
        sys.exit(EXIT_SIGINT)
    except (TrustmgrError, ProviderError) as exc:
        if debug:
            traceback.print_exc()
        for line in _error_lines(exc):
            click.echo(f"trustmgr: {line}", err=True)
        if isinstance(exc, TrustmgrError):
            sys.exit(exc.exit_code)
        sys.exit(EXIT_BAD_INPUT if isinstance(exc, ProviderNeedsFixError) else EXIT_FAILED)
    except KeyboardInterrupt:
        click.echo("trustmgr: interrupted", err=True)
        sys.exit(EXIT_SIGINT)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        click.echo(
            f"trustmgr: unexpected {type(exc).__name__}; run again with --debug for the traceback",
            err=True,
        )
        sys.exit(EXIT_FAILED)
