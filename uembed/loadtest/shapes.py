"""A stepped ramp for locust: ``--steps`` steps of ``--step-users`` more users, each held ``--step-seconds``.

Load it beside the locustfile (``locust -f uembed/loadtest/locustfile.py,uembed/loadtest/shapes.py``, or
``uembed loadtest --steps N``). With ``--user-rate`` each user offers a fixed request rate, so
step k offers k x step-users x user-rate requests per second: the x axis of the
latency-vs-offered-load plot.
"""

from __future__ import annotations

from locust import LoadTestShape, events


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    parser.add_argument("--steps", type=int, default=5, env_var="LOCUST_STEPS", help="number of load steps")
    parser.add_argument("--step-users", type=int, default=4, env_var="LOCUST_STEP_USERS", help="users added per step")
    parser.add_argument("--step-seconds", type=float, default=20.0, env_var="LOCUST_STEP_SECONDS",
                        help="seconds each step is held (keep it above locust's 10 s percentile window)")  # fmt: skip


class SteppedLoad(LoadTestShape):
    def tick(self):
        options = self.runner.environment.parsed_options
        step = int(self.get_run_time() // options.step_seconds)
        if step >= options.steps:
            return None  # stops the test
        return (step + 1) * options.step_users, max(options.step_users, 1)
