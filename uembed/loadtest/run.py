"""``uembed loadtest``: locust headless against a URL, with CSV stats, an HTML report and a summary.

A stepped run (``--steps``) also writes per-step figures and, with ``--plot``, a PNG of latency
percentiles against offered load. ``--kill-replica`` SIGKILLs one replica of ``uembed stack --replicas N``
during the run and reports what it cost (uembed/loadtest/failover.py).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from uembed.contract.errors import UembedError
from uembed.loadtest.failover import ReplicaKill, throughput_around

HERE = Path(__file__).resolve().parent
PERCENTILES = ("50%", "95%", "99%")


def check_target(url: str, allow_remote: bool) -> None:
    host = urlparse(url).hostname
    if not host:
        raise UembedError(f"--url: {url!r} is not a URL like http://127.0.0.1:8000")
    if allow_remote:
        return
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UembedError(f"--url: {host} is not a loopback address; pass --allow-remote to load another machine")


def run_seconds(args) -> float:
    return args.steps * args.step_seconds if args.steps else args.seconds


def locust_command(args, prefix: Path) -> list[str]:
    files = str(HERE / "locustfile.py") + (f",{HERE / 'shapes.py'}" if args.steps else "")
    seconds = run_seconds(args)
    command = [
        sys.executable, "-m", "locust", "-f", files, "--headless", "--host", args.url,
        "--run-time", f"{int(seconds + 0.999)}s", "--stop-timeout", "5",
        "--csv", str(prefix), "--csv-full-history", "--html", str(prefix.parent / "report.html"),
        "--scenario", args.scenario, "--examples-per-request", str(args.examples), "--user-rate", str(args.user_rate),
        "--zipf-exponent", str(args.zipf_exponent), "--loglevel", "WARNING",
    ]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    if args.steps:
        command += ["--steps", str(args.steps), "--step-users", str(args.step_users), "--step-seconds", str(args.step_seconds)]
    else:
        command += ["--users", str(args.users), "--spawn-rate", str(args.spawn_rate)]
    return command


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def read_summary(stats_csv: Path) -> dict:
    with stats_csv.open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "requests_per_s": round(number(total["Requests/s"]), 1),
        **{f"p{p[:-1]}_ms": number(total[p]) for p in PERCENTILES},
        "mean_ms": round(number(total["Average Response Time"]), 2),
    }


def read_steps(history_csv: Path, step_seconds: float, user_rate: float) -> list[dict]:
    """Per step (user count): median of locust's windowed figures over the step's settled half."""
    import numpy as np

    by_users: dict[int, list[dict]] = {}
    with history_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated" and int(row["User Count"]) > 0:
                by_users.setdefault(int(row["User Count"]), []).append(row)
    steps = []
    for users, rows in sorted(by_users.items()):
        start = int(rows[0]["Timestamp"])
        settled = [r for r in rows if int(r["Timestamp"]) - start >= step_seconds / 2] or rows[-1:]
        figures = {"users": users, "offered_per_s": users * user_rate if user_rate else None}
        figures["achieved_per_s"] = float(np.nanmedian([number(r["Requests/s"]) for r in settled]))
        figures["failures_per_s"] = float(np.nanmedian([number(r["Failures/s"]) for r in settled]))
        for p in PERCENTILES:
            figures[f"p{p[:-1]}_ms"] = float(np.nanmedian([number(r[p]) for r in settled]))
        steps.append(figures)
    return steps


def plot_steps(steps: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    offered = [s["offered_per_s"] if s["offered_per_s"] is not None else s["achieved_per_s"] for s in steps]
    label = "offered load (requests/s)" if steps[0]["offered_per_s"] is not None else "throughput (requests/s, closed loop)"
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p, style in zip(("p50", "p95", "p99"), ("o-", "s-", "^-")):
        latency.plot(offered, [s[f"{p}_ms"] for s in steps], style, label=p)
    latency.set_yscale("log")
    latency.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    latency.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    latency.set_xlabel(label)
    latency.set_ylabel("latency (ms, log scale)")
    latency.set_title("latency percentiles")
    latency.grid(True, which="both", alpha=0.3)
    latency.legend()
    throughput.plot(offered, [s["achieved_per_s"] for s in steps], "o-", label="achieved")
    throughput.plot(offered, offered, ":", color="grey", label="offered = achieved")
    throughput.set_xlabel(label)
    throughput.set_ylabel("achieved (requests/s)")
    throughput.set_title("throughput")
    throughput.grid(True, alpha=0.3)
    throughput.legend()
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def last_history_row(history_csv: Path) -> dict | None:
    if not history_csv.exists():
        return None
    lines = history_csv.read_text().splitlines()
    aggregated = [line for line in lines[1:] if ",Aggregated," in line]
    return dict(zip(lines[0].split(","), aggregated[-1].split(","))) if aggregated else None


def replica_kill(args, seconds: float):
    """With ``--kill-replica``: the thread (not started) that SIGKILLs that replica of the stack in ``--stack-dir``
    after ``--kill-after`` seconds (default: half the run)."""
    if not args.kill_replica:
        return None
    after_s = args.kill_after if args.kill_after is not None else seconds / 2
    if not 0 < after_s < seconds:
        raise UembedError(f"--kill-after {after_s:g}: kill within the run's {seconds:g} s")
    try:
        return ReplicaKill(args.stack_dir, args.kill_replica, after_s=after_s, watch_s=seconds)
    except (OSError, ValueError) as exc:
        raise UembedError(f"--kill-replica: {exc}") from exc


def kill_summary(kill, history_csv: Path, failures: int) -> dict:
    """The kill's figures (uembed/loadtest/failover.py) with locust's throughput around it and its failures."""
    kill.stop()
    report = kill.report()
    if report["killed"]:
        report.update(throughput_around(history_csv, report["killed_at"]))
    report["failed_requests"] = failures
    return report


def print_kill(report: dict) -> None:
    if not report["killed"]:
        print(f"{report['replica']} was not killed: the run ended first")
        return
    down = report["marked_down_after_s"]
    down = f"marked down after {down:g} s" if down is not None else "never marked down"
    back = report["back_up_after_s"]
    back = f"back in rotation after {back:g} s" if back is not None else "not back in rotation before the run ended"
    print(f"killed {report['replica']}: haproxy had handed it {report['in_flight']} request(s) it never answered "
          f"(in flight), {report['resent']} resent to other replicas (with any refused after its death); "
          f"{report['failed_requests']} failed at the client; {down}, {back}")  # fmt: skip
    if report.get("before_per_s") is not None:
        recovered = f"{report['recovered_after_s']:g} s" if report["recovered_after_s"] is not None else "never"
        after = f"{report['after_per_s']:g}/s" if report["after_per_s"] is not None else "(run ended)"
        print(f"  requests answered per second: {report['before_per_s']:g} in the 10 s before, {report['dip_per_s']} in "
              f"the slowest of the 5 s after, {after} from 5 to 15 s after; back at 90% after {recovered}")  # fmt: skip


def run_loadtest(args) -> int:
    check_target(args.url, args.allow_remote)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    command = locust_command(args, prefix)
    seconds = run_seconds(args)
    log_path = out / "locust.log"
    kill = replica_kill(args, seconds)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        if kill:
            kill.start()
        with tqdm(total=int(seconds), desc=f"locust -> {args.url}", unit="s", disable=args.quiet) as bar:
            started = time.monotonic()
            while process.poll() is None:
                time.sleep(1)
                bar.n = min(int(time.monotonic() - started), int(seconds))
                row = last_history_row(Path(f"{prefix}_stats_history.csv"))
                if row:
                    bar.set_postfix(users=row["User Count"], rps=row["Requests/s"], failures=row["Total Failure Count"])
                bar.refresh()
    stats_csv = Path(f"{prefix}_stats.csv")
    if not stats_csv.exists() or process.returncode not in (0, 1):
        raise UembedError(f"locust failed (exit {process.returncode}); its log {log_path} ends:\n"
                          + log_path.read_text()[-2000:])  # fmt: skip
    summary = {"url": args.url, "scenario": args.scenario, "examples_per_request": args.examples,
               "seconds": seconds, **read_summary(stats_csv)}  # fmt: skip
    if args.steps:
        summary["steps"] = read_steps(Path(f"{prefix}_stats_history.csv"), args.step_seconds, args.user_rate)
        if args.plot:
            plot_steps(summary["steps"], Path(args.plot),
                       f"uembed /v1/score, {args.examples} examples/request ({args.scenario}), "
                       f"{args.step_users} users per step")  # fmt: skip
    if kill:
        summary["kill"] = kill_summary(kill, Path(f"{prefix}_stats_history.csv"), summary["failures"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{summary['requests']} requests in {seconds:g} s: {summary['requests_per_s']} req/s, "
        f"p50 {summary['p50_ms']:g} ms, p95 {summary['p95_ms']:g} ms, p99 {summary['p99_ms']:g} ms, "
        f"{summary['failures']} failures"
    )
    for step in summary.get("steps", []):
        offered = f"offered {step['offered_per_s']:g}/s, " if step["offered_per_s"] is not None else ""
        print(f"  {step['users']:4d} users: {offered}achieved {step['achieved_per_s']:.1f}/s, "
              f"p50 {step['p50_ms']:g} ms, p95 {step['p95_ms']:g} ms, p99 {step['p99_ms']:g} ms")  # fmt: skip
    if kill:
        print_kill(summary["kill"])
    print(f"reports: {out}/report.html, {prefix}_stats.csv, {out}/summary.json" + (f", plot {args.plot}" if args.steps and args.plot else ""))
    if kill and summary["kill"]["killed"]:  # failures are expected: at most the requests in flight on the replica
        return 1 if summary["failures"] > (summary["kill"]["in_flight"] or 0) else 0
    return 1 if summary["failures"] else 0
