"""The README's example of one's own data: ``clicks.csv``, ad impressions with a yes/no click, and its spec
``clicks.toml`` (README: Your own data in ten minutes). Generated, not shipped: a seeded generator writes the same
file on every machine, so the README's outputs are what a user sees, and a pip install has it too.

The columns are the kinds a user's own data has: ids (``user_id``, ``item_id``), a number kept as categories
(``hour``), a category with missing values (``device``), a number bucketised by quantiles (``price``), a
``|``-separated list (``tags``) and a text label (``clicked``: yes or no). The clicks follow a planted logistic
model of the user, the item, the evening hours, the device, the tags and the price, so a model has something to
learn and its test AUC says how much it did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from uembed.contract.errors import DataError
from uembed.contract.features import load_spec

EXAMPLE_ROWS = 5000
TAGS = ("sale", "new", "kids", "sport", "home")
DEVICES = ("mobile", "desktop", "tablet")

CLICKS_SPEC = """\
# clicks.csv: one row per ad impression (uembed example-data)
[label]
column = "clicked"
positive = ["yes"]   # the only other value, "no", is the negative

[[features]]
name = "user_id"     # kind defaults to "categorical": one embedding per value (hashed)

[[features]]
name = "item_id"

[[features]]
name = "hour"        # 0-23, kept as 24 categories (the data summary says so)

[[features]]
name = "device"
missing = [""]       # an empty cell is a missing value, not a device

[[features]]
name = "price"
kind = "numeric"
boundaries = "quantiles:8"   # 8 buckets at quantiles of the training prices

[[features]]
name = "tags"
kind = "multivalent" # a list per row: "sale|kids"
separator = "|"
"""


def clicks_table(rows: int = EXAMPLE_ROWS, seed: int = 0) -> pa.Table:
    """The impressions: every column a string as in a CSV a user exports, the label yes/no."""
    rng = np.random.default_rng(seed)
    users, items = 300, 120
    user_bias, item_bias = rng.normal(0, 0.9, users), rng.normal(0, 0.9, items)
    tag_effect = dict(zip(TAGS, (0.8, 0.4, -0.3, 0.2, -0.6), strict=True))
    device_effect = {"mobile": 0.3, "desktop": -0.2, "tablet": 0.0, "": 0.0}
    user = rng.zipf(1.6, rows) % users
    item = rng.zipf(1.4, rows) % items
    hour = rng.integers(0, 24, rows)
    device = np.array(DEVICES + ("",))[rng.choice(4, rows, p=(0.55, 0.3, 0.1, 0.05))]
    price = np.round(np.exp(rng.normal(3.0, 1.0, rows)), 2)
    tags = ["|".join(sorted(rng.choice(TAGS, rng.integers(0, 3), replace=False))) for _ in range(rows)]
    logit = (user_bias[user] + item_bias[item] + np.where((hour >= 18) & (hour <= 22), 0.7, 0.0)
             + np.array([device_effect[d] for d in device]) + np.array([sum(tag_effect[t] for t in ts.split("|") if t) for ts in tags])
             - 0.4 * (np.log(price) - 3.0) - 1.3)  # fmt: skip
    clicked = rng.random(rows) < 1 / (1 + np.exp(-logit))
    return pa.table({
        "user_id": [f"u{u:03d}" for u in user], "item_id": [f"i{i:03d}" for i in item], "hour": [str(h) for h in hour],
        "device": device.tolist(), "price": [f"{p:.2f}" for p in price], "tags": tags,
        "clicked": np.where(clicked, "yes", "no").tolist(),
    })  # fmt: skip


def write_example(folder: Path, rows: int = EXAMPLE_ROWS, seed: int = 0) -> tuple[Path, Path, float]:
    """Write ``clicks.csv`` and ``clicks.toml`` into ``folder``; return their paths and the share of clicks."""
    folder.mkdir(parents=True, exist_ok=True)
    data, spec = folder / "clicks.csv", folder / "clicks.toml"
    for path in (data, spec):
        if path.exists():
            raise DataError(f"{path} exists: choose another folder, or remove it to write the example again")
    table = clicks_table(rows, seed)
    with pa.OSFile(str(data), "wb") as out:  # a plain header too: user_id, not "user_id"
        out.write((",".join(table.column_names) + "\n").encode())
        pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    spec.write_text(CLICKS_SPEC)
    load_spec(spec)  # the spec the README shows must be one the trainer reads
    clicked = float(np.mean(np.asarray(table["clicked"].to_pylist()) == "yes"))
    return data, spec, clicked
