"""The OpenAPI contract holds: schemathesis, every check on, against a live service with Redis, the reload
token and a two-version bundle store. A fixed seed and a bounded number of examples keep it inside the
suite's time; README (API contract) has the longer run. Zero failures: a route that returns a status it
does not declare, a body that does not match its schema, or a schema-valid request refused fails this."""

import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).with_name("schemathesis.toml")
TOKEN = "contract-test-token-0123"


def test_schemathesis_finds_nothing(start_service, redis_server, synthetic_store, tmp_path):
    service = start_service([synthetic_store / "movielens" / "1"], bundle_store=synthetic_store, redis_url=redis_server.url,
                            reload_token=TOKEN)  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color", "run",
         f"{service.url}/openapi.json", "--checks", "all", "--header", f"Authorization: Bearer {TOKEN}",
         "--max-examples", "40", "--seed", "20261124", "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout, run.stdout[-4000:]
    reloads = service.metrics()
    assert reloads['uembed_model_reloads_total{model="movielens",outcome="ok"}'] > 0  # the reload route was reached
    assert reloads['uembed_http_requests_total{route="/v1/score",status="200"}'] > 0
