"""Locust load test of the scoring service: POST /v1/score with realistic examples.

``uembed loadtest`` runs it headless and reports; directly, with locust's web UI on :8089:

    locust -f uembed/loadtest/locustfile.py --host http://127.0.0.1:8000
    locust -f uembed/loadtest/locustfile.py,uembed/loadtest/shapes.py --host ...   # stepped ramp (shapes.py)

Scenarios (``--scenario``): ``zipf`` builds examples from the served model's own features
(GET /v1/models) with Zipf-distributed values; ``movielens`` sends real MovieLens-100K
examples. Every option below is also a ``LOCUST_*`` environment variable.
"""

from __future__ import annotations

from locust import FastHttpUser, constant_throughput, events, task

from uembed.loadtest.traffic import MovieLensExamples, ZipfExamples, served_features

TRAFFIC: dict = {}


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    parser.add_argument("--scenario", choices=["zipf", "movielens"], default="zipf", env_var="LOCUST_SCENARIO",
                        help="zipf: the model's features with Zipf values; movielens: real MovieLens-100K examples")
    parser.add_argument("--examples-per-request", type=int, default=64, env_var="LOCUST_EXAMPLES_PER_REQUEST",
                        help="examples in each POST /v1/score")
    parser.add_argument("--zipf-exponent", type=float, default=1.1, env_var="LOCUST_ZIPF_EXPONENT",
                        help="skew of the zipf scenario's values (larger: hotter head)")
    parser.add_argument("--zipf-vocabulary", type=int, default=100_000, env_var="LOCUST_ZIPF_VOCABULARY",
                        help="distinct values per feature in the zipf scenario")
    parser.add_argument("--model", default="", env_var="LOCUST_MODEL",
                        help="model to score with (default: the service's default model)")
    parser.add_argument("--user-rate", type=float, default=0.0, env_var="LOCUST_USER_RATE",
                        help="requests per second per user (0: each user sends its next request when answered)")  # fmt: skip


@events.test_start.add_listener
def prepare_traffic(environment, **_) -> None:
    options = environment.parsed_options
    if options.examples_per_request < 1:
        raise ValueError("--examples-per-request must be at least 1")
    if options.scenario == "movielens":
        TRAFFIC["source"] = MovieLensExamples()
        TRAFFIC["model"] = options.model or None
    else:
        model, features = served_features(environment.host, options.model or None)
        TRAFFIC["source"] = ZipfExamples(features, options.zipf_exponent, options.zipf_vocabulary)
        TRAFFIC["model"] = model


class ScoringUser(FastHttpUser):
    """One client of the ranking service: scores a batch of candidates, then the next."""

    pace = None

    def on_start(self) -> None:
        rate = self.environment.parsed_options.user_rate
        self.pace = constant_throughput(rate) if rate > 0 else None

    def wait_time(self) -> float:
        return self.pace(self) if self.pace else 0.0

    @task
    def score(self) -> None:
        count = self.environment.parsed_options.examples_per_request
        body = {"examples": TRAFFIC["source"].batch(count)}
        if TRAFFIC["model"]:
            body["model"] = TRAFFIC["model"]
        with self.client.post("/v1/score", json=body, name="/v1/score", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
            elif len(response.json().get("scores", ())) != count:
                response.failure(f"expected {count} scores")
