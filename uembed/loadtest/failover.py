"""A replica killed under load, and what it cost: ``uembed loadtest --kill-replica NAME`` against
``uembed stack --replicas N``, and the tests.

``ReplicaKill`` SIGKILLs one replica (its pid from the stack's ``stack.json``) at a set time and counts, from
haproxy's own per-server counters (its stats page), what the kill put at risk:

- ``in_flight``: requests haproxy had handed to the replica that it never answered: those it held at the kill
  (haproxy's ``scur``) plus those handed to it after (``stot`` grew) less those it still answered (the
  ``hrsp_*`` counts grew). A SIGKILLed process dies in steps: the kernel frees its memory before it closes its
  sockets, so for some milliseconds after the signal its sockets still take connections and requests that it
  will never answer; those were in flight on it too.
- ``resent``: requests haproxy resent from it to another replica (``wredis``): in flight on it and closed
  without an answer (``retry-on empty-response``), or sent to it after its sockets closed and refused
  (``retry-on conn-failure``). A refused one never reached it; haproxy may still count it in ``stot``, and then
  in ``in_flight`` too, which is therefore an upper bound of what the replica held.

What is lost is what the clients saw fail (locust's failures, or the test's own count): requests in flight on
the replica that haproxy could not resend, because their connection was reset (the kernel resets a
connection that still holds unread bytes) or their answer had begun. It must not exceed ``in_flight``.

The counters are read just before the kill and half a second after haproxy has marked the replica down (by
then every request it held has been resent or has failed), before the stack has started it again.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

from uembed.loadtest.servers import haproxy_stats

ANSWERS = ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other")


def kill_cost(before: dict[str, str], after: dict[str, str]) -> dict[str, int]:
    """``in_flight`` and ``resent`` (see the module's docstring) from two rows of haproxy's stats for the killed
    server: just before the kill and after haproxy marked it down."""

    def grew(field: str) -> int:
        return int(after[field] or 0) - int(before[field] or 0)

    in_flight = int(before["scur"] or 0) + grew("stot") - sum(grew(field) for field in ANSWERS)
    return {"in_flight": in_flight, "resent": grew("wredis")}


class ReplicaKill(threading.Thread):
    """SIGKILL replica ``name`` of the stack in ``stack_dir`` ``after_s`` seconds after ``start()``; then poll
    haproxy's stats every 50 ms for up to ``watch_s`` seconds, noting when it marks the replica down and, once
    the stack has started it again, up. ``report()`` gives the figures."""

    def __init__(self, stack_dir: Path, name: str, after_s: float, watch_s: float = 30.0) -> None:
        super().__init__(name=f"kill-{name}", daemon=True)
        state = json.loads((Path(stack_dir) / "stack.json").read_text())
        if not state.get("haproxy"):
            raise ValueError(f"the stack in {stack_dir} has one replica and no haproxy: start it with --replicas 2 or more")
        replicas = {r["name"]: r for r in state["replicas"]}
        if name not in replicas:
            raise ValueError(f"no replica {name!r} in {stack_dir}/stack.json; its replicas: {', '.join(replicas)}")
        self.replica = name
        self.pid = replicas[name]["pid"]
        self.stats_url = state["haproxy"]["stats"]
        self.after_s = after_s
        self.watch_s = watch_s
        self.stop_event = threading.Event()
        self.killed_at: float | None = None
        self.before: dict[str, str] | None = None
        self.after: dict[str, str] | None = None
        self.down_after_s: float | None = None
        self.up_after_s: float | None = None
        self.error: BaseException | None = None

    def server_row(self) -> dict[str, str]:
        for row in haproxy_stats(self.stats_url):
            if row["pxname"] == "uembed" and row["svname"] == self.replica:
                return row
        raise RuntimeError(f"haproxy has no server {self.replica}")

    def run(self) -> None:
        try:
            if self.stop_event.wait(self.after_s):
                return
            self.before = self.server_row()
            os.kill(self.pid, signal.SIGKILL)
            self.killed_at = time.time()
            deadline = time.monotonic() + self.watch_s
            while not self.stop_event.wait(0.05) and time.monotonic() < deadline:
                row = self.server_row()
                since = time.time() - self.killed_at
                if self.down_after_s is None and row["status"].startswith("DOWN"):
                    self.down_after_s = since
                elif self.down_after_s is not None and self.after is None and since > self.down_after_s + 0.5:
                    self.after = row
                if self.after is not None and row["status"].startswith("UP"):
                    self.up_after_s = since
                    return
        except BaseException as exc:  # reported by report(), not lost in the thread
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)

    def report(self) -> dict:
        """When the replica was killed, haproxy's requests on it just before (``sessions_at_kill``), when
        haproxy marked it down and back up (seconds after the kill), and ``kill_cost``."""
        if self.error:
            raise RuntimeError(f"killing {self.replica} failed: {self.error}") from self.error
        if self.killed_at is None:
            return {"replica": self.replica, "killed": False}
        cost = kill_cost(self.before, self.after) if self.after else {"in_flight": None, "resent": None}
        return {
            "replica": self.replica,
            "killed": True,
            "killed_at": self.killed_at,
            "sessions_at_kill": int(self.before["scur"] or 0),
            "marked_down_after_s": None if self.down_after_s is None else round(self.down_after_s, 3),
            "back_up_after_s": None if self.up_after_s is None else round(self.up_after_s, 3),
            **cost,
        }


def throughput_around(history_csv: Path, killed_at: float, window_s: int = 10) -> dict:
    """Requests answered per second, from locust's history (its cumulative request count, a row a second; a
    second is named by its end): the mean over the ``window_s`` seconds before the kill (``before_per_s``), the
    lowest of the 5 seconds after it (``dip_per_s``), the mean over the ``window_s`` seconds from 5 s after it
    (``after_per_s``), the seconds from the kill to the end of the first of three seconds in a row back at 90%
    of the mean before (``recovered_after_s``; None if never), and each second from 5 s before to 16 s after."""
    totals: dict[int, int] = {}
    with Path(history_csv).open() as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated" and int(row["User Count"]) > 0:
                totals[int(row["Timestamp"])] = int(row["Total Request Count"])
    seconds = sorted(totals)
    per_second = {t: totals[t] - totals[p] for p, t in zip(seconds, seconds[1:]) if t - p == 1}
    before = [v for t, v in per_second.items() if killed_at - window_s - 1 < t <= killed_at]
    after = sorted((t, v) for t, v in per_second.items() if t > killed_at)
    dip = [v for t, v in after if t <= killed_at + 5]
    later = [v for t, v in after if killed_at + 5 < t <= killed_at + 5 + window_s]
    figures = {"before_per_s": None, "dip_per_s": None, "after_per_s": None, "recovered_after_s": None,
               "per_second": [[round(t - killed_at, 1), v] for t, v in sorted(per_second.items()) if -5 <= t - killed_at <= 16]}  # fmt: skip
    if not before or not dip:
        return figures
    mean_before = sum(before) / len(before)
    figures.update(before_per_s=round(mean_before, 1), dip_per_s=min(dip))
    if later:
        figures["after_per_s"] = round(sum(later) / len(later), 1)
    for i in range(len(after) - 2):
        if all(v >= 0.9 * mean_before for _, v in after[i : i + 3]):
            figures["recovered_after_s"] = round(after[i][0] - killed_at, 1)
            break
    return figures
