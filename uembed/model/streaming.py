"""Training on streamed data: one pass (or a few) over files too large to hold, on sparse tables.

``train_stream`` reads the training split through the pipeline of ``uembed/model/data/stream.py``
(record batches in file order, a shuffle buffer, bounded memory), updates the embedding
tables sparsely (``uembed/model/optim.py``: only the rows a batch touched) and the dense network
with Adam, prints examples/s, and writes the same run directory as ``uembed/model/train.py`` plus:

    runs/<name>/resume.pt     a resumable checkpoint (model, optimisers, stream position, RNG),
                              written every ``checkpoint_every`` examples at a shuffle-window
                              boundary; a run started again with the same configuration
                              continues from it and gives the same model as an uninterrupted run
    runs/<name>/stats/        the training split's statistics (uembed/model/data/stream.py: StreamStats)

Evaluation streams too: test AUC from two histograms of predicted probabilities (2**20
bins; pairs within one bin count as ties) and LogLoss summed, so memory does not grow with
the test split.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uembed.contract.errors import UembedError
from uembed.contract.features import SplitSpec
from uembed.contract.hashing import hash_canonical
from uembed.contract.known import save_known_values
from uembed.contract.plan import EmbeddingPlan, method_spec
from uembed.contract.seo import ChunkPolicy
from uembed.model import distributed
from uembed.model.data.stream import (
    SPLITS,
    StreamSource,
    StreamStats,
    encode_batch,
    encoded_chunks,
    shuffled_batches,
    split_of_rows,
)
from uembed.model.optim import EMBEDDING_OPTIMIZERS, embedding_optimizer
from uembed.model.summary import stop_reason
from uembed.model.train import (
    TrainConfig,
    TrainResult,
    build_model,
    feature_columns_of,
    gradient_dominance,
    plan_for,
    search_policy,
    throughput,
)  # fmt: skip

AUC_BINS = 1 << 20


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` into /proc/self/clear_refs); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StreamingMetrics:
    """AUC and LogLoss of predictions seen batch by batch, in constant memory."""

    def __init__(self, bins: int = AUC_BINS) -> None:
        self.bins = bins
        self.positive = np.zeros(bins, dtype=np.int64)
        self.negative = np.zeros(bins, dtype=np.int64)
        self.loss = 0.0
        self.count = 0

    def add(self, labels: np.ndarray, probabilities: np.ndarray) -> None:
        p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
        self.loss += float(-(labels * np.log(p) + (1 - labels) * np.log1p(-p)).sum())
        self.count += labels.size
        index = np.minimum((probabilities * self.bins).astype(np.int64), self.bins - 1)
        self.positive += np.bincount(index[labels > 0.5], minlength=self.bins)
        self.negative += np.bincount(index[labels <= 0.5], minlength=self.bins)

    def result(self) -> dict[str, float]:
        positives, negatives = int(self.positive.sum()), int(self.negative.sum())
        if not positives or not negatives:
            return {"auc": float("nan"), "logloss": self.loss / max(self.count, 1), "examples": self.count}
        below = np.cumsum(self.negative) - self.negative  # negatives in lower bins
        pairs = float((self.positive * below).sum() + 0.5 * (self.positive * self.negative).sum())
        return {"auc": pairs / (positives * negatives), "logloss": self.loss / self.count, "examples": self.count}


def evaluate_stream(
    model, plan: EmbeddingPlan, source: StreamSource, stats: StreamStats, wanted: tuple[int, ...], seed: int,
    read_rows: int, progress: bool = False, batch_size: int = 8192,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Metrics of the model per wanted split (1 validation, 2 test) in one pass over the source."""
    model.eval()

    def score(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(model(torch.from_numpy(rows), torch.from_numpy(weights))).numpy()

    return stream_metrics(score, plan, source, stats, wanted, seed, read_rows, progress, batch_size)


def evaluate_stream_models(
    models: dict, plan: EmbeddingPlan, source: StreamSource, stats: StreamStats, seed: int, read_rows: int,
    batch_size: int = 8192,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Test metrics of several models of one plan (a run's copies in each row codec), in one pass over the source."""

    def scorer(model) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        model.eval()

        def score(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return torch.sigmoid(model(torch.from_numpy(rows), torch.from_numpy(weights))).numpy()

        return score

    found = stream_metrics_of({name: scorer(m) for name, m in models.items()}, plan, source, stats, (2,), seed, read_rows,
                              batch_size=batch_size)  # fmt: skip
    return {name: splits["test"] for name, splits in found.items()}


def stream_metrics(
    score: Callable[[np.ndarray, np.ndarray], np.ndarray], plan: EmbeddingPlan, source: StreamSource, stats: StreamStats,
    wanted: tuple[int, ...], seed: int, read_rows: int, progress: bool = False, batch_size: int = 8192,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Metrics per wanted split of ``score(rows, weights) -> probabilities`` over the examples ``plan`` encodes:
    a model in training, or an exported bundle's scorer (``uembed export --evaluate``)."""
    return stream_metrics_of({"": score}, plan, source, stats, wanted, seed, read_rows, progress, batch_size)[""]


def stream_metrics_of(
    scores: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]], plan: EmbeddingPlan, source: StreamSource,
    stats: StreamStats, wanted: tuple[int, ...], seed: int, read_rows: int, progress: bool = False, batch_size: int = 8192,
) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """:func:`stream_metrics` of each named scorer, the source read and encoded once for all of them."""
    spec, split = stats.spec, stats.spec.split or SplitSpec()
    metrics = {name: {code: StreamingMetrics() for code in wanted} for name in scores}
    total = sum(stats.examples[SPLITS[c]] for c in wanted)
    bar = tqdm(total=total, unit="ex", unit_scale=True, desc="evaluating", disable=not progress, leave=False, file=sys.stderr)
    import pyarrow as pa

    for first_row, batch in source.record_batches(spec, read_rows, shard=distributed.shard()):
        codes = split_of_rows(first_row, batch, split, seed, source.name)
        for code in wanted:
            chosen = codes == code
            if not chosen.any():
                continue
            rows_batch = batch.filter(pa.array(chosen))
            labels = spec.label.binarise(rows_batch.column(spec.label.column), source.name, check_classes=False)
            rows, weights = plan.encode(encode_batch(spec, rows_batch))
            for start in range(0, len(labels), batch_size):
                stop = start + batch_size
                for name, score in scores.items():
                    metrics[name][code].add(labels[start:stop], score(rows[start:stop], weights[start:stop]))
            bar.update(len(labels))
    bar.close()
    out = {}
    for name, per_split in metrics.items():
        for m in per_split.values():  # every rank evaluated its share of the source: the metrics over all of them
            m.positive, m.negative = distributed.sum_counts(m.positive), distributed.sum_counts(m.negative)
            m.loss, m.count = distributed.sum_over_ranks([m.loss, m.count])
            m.count = int(m.count)
        out[name] = {SPLITS[code]: m.result() for code, m in per_split.items()}
    return out


def table_module(model):
    """The PlanEmbedding that holds the model's tables (the search model wraps one)."""
    return getattr(model.embedding, "base", model.embedding)


def _checkpoint_key(config: TrainConfig, source: StreamSource) -> str:
    """What a checkpoint must match to be resumed: the configuration and the files."""
    doc = {"config": {k: v for k, v in config.to_dict().items() if k != "checkpoint_every"},
           "source": [str(p) for p in source.paths]}  # fmt: skip
    return json.dumps(doc, sort_keys=True, default=str)


def train_stream(
    config: TrainConfig,
    source: StreamSource,
    stats: StreamStats,
    run_dir: Path,
    progress: bool = True,
    stop_after_examples: int | None = None,
    source_options: dict | None = None,
) -> TrainResult | None:
    """Train one model on the streamed training split; the best validation-AUC epoch is kept.

    With ``stop_after_examples``, stop at the first shuffle-window boundary past that many
    training examples, leave ``resume.pt`` and return None; calling again continues from it.
    """
    if config.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise UembedError(f"unknown embedding optimizer {config.embedding_optimizer!r}; choose one of {', '.join(EMBEDDING_OPTIMIZERS)}")
    if config.qat and config.qat_warm_start:
        raise UembedError("--qat-warm-start trains in memory (a float32 phase, then a quantised one): leave it out for streamed data")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(distributed.rank_seed(config.seed))
    plan = plan_for(config, stats.spec, stats)
    for message in plan.warnings:
        print(f"warning: {message}", file=sys.stderr)
    model = build_model(plan, config)
    tables = table_module(model)
    tables.sparse = config.embedding_optimizer != "adam"
    distributed.use_sparse_tables(model)
    table_params = [tables.weight]
    logits = [p for name, p in model.named_parameters() if name == "embedding.logits"]
    dense = [p for name, p in model.named_parameters() if name != "embedding.logits" and p is not tables.weight]
    groups = [{"params": dense}] + ([{"params": logits, "lr": config.logits_learning_rate}] if logits else [])
    dense_optimizer = torch.optim.Adam(groups, lr=config.learning_rate)
    table_optimizer = embedding_optimizer(config.embedding_optimizer, table_params, config.embedding_learning_rate or config.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    feature_columns = feature_columns_of(model, plan)

    state = {"epoch": 0, "next_row": 0, "examples": 0, "epoch_examples": 0, "train_seconds": 0.0, "history": [],
             "best_auc": -math.inf, "best_epoch": -1, "stale": 0, "loss_sum": 0.0,
             "gradient": {name: 0.0 for name in feature_columns}}  # fmt: skip
    resume_path = run_dir / "resume.pt"
    key = _checkpoint_key(config, source)
    if resume_path.is_file():
        saved = torch.load(resume_path, weights_only=True)
        if saved["key"] != key:
            raise UembedError(f"{run_dir} holds a checkpoint of another configuration or data; choose another run directory")
        model.load_state_dict(saved["model"])
        dense_optimizer.load_state_dict(saved["dense_optimizer"])
        table_optimizer.load_state_dict(saved["table_optimizer"])
        rng.bit_generator.state = saved["rngs"][distributed.rank()] if "rngs" in saved else saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        if "rank_examples" in saved:
            state["examples"] = saved["rank_examples"][distributed.rank()]
        print(f"resuming from {resume_path}: epoch {state['epoch'] + 1}, row {state['next_row']:,}, "
              f"{state['examples']:,} examples trained", file=sys.stderr)  # fmt: skip

    if distributed.launched():
        distributed.check_same_epoch(state["epoch"], str(resume_path))
    progress = progress and distributed.is_writer()

    def save_checkpoint() -> None:
        doc = {"key": key, "model": model.state_dict(), "dense_optimizer": dense_optimizer.state_dict(),
               "table_optimizer": table_optimizer.state_dict(), "rng": rng.bit_generator.state,
               "torch_rng": torch.get_rng_state(), "state": state}  # fmt: skip
        if distributed.world_size() > 1:  # each rank's shuffle stream, so a restarted group draws as it would have
            doc["rngs"] = distributed.gather_objects(rng.bit_generator.state)
            doc["rank_examples"] = distributed.gather_objects(state["examples"])  # state holds rank 0's count
        distributed.save_checkpoint(resume_path, doc)

    warnings = list(plan.warnings)
    train_total = stats.examples["train"]
    while state["epoch"] < config.epochs:
        epoch = state["epoch"]
        model.train()
        started = time.perf_counter()
        since_checkpoint = 0
        chunks = encoded_chunks(source, stats.spec, plan, 0, config.split_seed, config.read_rows, state["next_row"], distributed.shard())
        bar = tqdm(total=train_total, initial=state["epoch_examples"], unit="ex", unit_scale=True,
                   desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, file=sys.stderr, mininterval=2.0)  # fmt: skip
        stopped = False
        # Equal windows on every rank: the ranks fill them at the same step (uembed/model/data/stream.py).
        batches = shuffled_batches(chunks, config.shuffle_buffer, config.batch_size, rng, exact=distributed.world_size() > 1,
                                   start_row=state["next_row"])  # fmt: skip
        steps = distributed.Lockstep(batches)
        dense_tables = config.embedding_optimizer == "adam"
        exchange = (distributed.OverlappedExchange(model, dense_tables, table_optimizer.step, config.wire())
                    if config.overlap_exchange and distributed.world_size() > 1 else None)  # fmt: skip
        for batch in steps:
            dense_optimizer.zero_grad(set_to_none=True)
            table_optimizer.zero_grad(set_to_none=True)
            if batch is not None:
                rows, weights, labels, next_row = batch
                vectors = model.embedding(torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(weights))
                vectors.retain_grad()
                loss = loss_fn(model.network(vectors), torch.from_numpy(labels))
                loss.backward()
            # A rank whose share ran dry still steps, with the others' gradients: the replicas stay equal.
            if exchange is None:
                applied = distributed.sync_gradients(model, batch is not None, dense_tables, table_optimizer.step, config.wire())
            else:
                applied = exchange.step(batch is not None)  # the previous step's gradients (None: none yet)
            if applied == 0:
                break  # every rank has run dry
            if applied:
                dense_optimizer.step()
            if batch is None:
                continue
            n = len(labels)
            state["loss_sum"] += float(loss.detach()) * n
            grad = vectors.grad
            for name, (a, b) in feature_columns.items():
                state["gradient"][name] += float(grad[:, a:b].norm(dim=1).sum())
            state["examples"] += n
            state["epoch_examples"] += n
            since_checkpoint += n
            bar.update(n)
            if next_row is not None:  # a shuffle window ends: a resume point
                state["next_row"] = next_row
                elapsed = state["train_seconds"] + time.perf_counter() - started
                bar.set_postfix_str(f"{state['examples'] / max(elapsed, 1e-9):,.0f} ex/s", refresh=False)
                if stop_after_examples is not None and state["examples"] >= stop_after_examples:
                    stopped = True
                    break
                if config.max_examples and state["epoch_examples"] >= config.max_examples // distributed.world_size():
                    steps.finish()
                    continue
                # Mid-epoch resume points are one rank's stream position: a group checkpoints at epoch ends.
                if config.checkpoint_every and since_checkpoint >= config.checkpoint_every and not distributed.launched():
                    state["train_seconds"] += time.perf_counter() - started
                    started = time.perf_counter()
                    save_checkpoint()
                    since_checkpoint = 0
        if exchange is not None:
            if exchange.flush():
                dense_optimizer.step()
            state["exchange_overflows"] = state.get("exchange_overflows", 0) + exchange.overflows
        bar.close()
        state["train_seconds"] += time.perf_counter() - started
        if stopped:
            save_checkpoint()
            print(f"stopped after {state['examples']:,} examples; run again to resume from {resume_path}", file=sys.stderr)
            return None
        seen, loss_sum, *sums = distributed.sum_over_ranks([state["epoch_examples"], state["loss_sum"], *state["gradient"].values()])
        seen = max(seen, 1)
        gradient = {name: value / seen for name, value in zip(state["gradient"], sums)}
        last = epoch + 1 == config.epochs
        evaluated = evaluate_stream(model, plan, source, stats, (1, 2) if last else (1,), config.split_seed, config.read_rows, progress)
        val = evaluated["validation"]
        shares, dominant = gradient_dominance(plan, gradient, config.dominance_threshold)
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "val_auc": val["auc"], "val_logloss": val["logloss"],
                 "seconds": state["train_seconds"], "examples": int(seen),
                 "health": {"gradient_per_feature": gradient, "gradient_share_per_table": shares}}  # fmt: skip
        state["history"].append(entry)
        for table, feature, share in dominant:
            message = f"epoch {epoch + 1}: feature {feature!r} carries {share:.0%} of the gradient into shared table {table!r}"
            if message not in warnings:
                warnings.append(message)
                if distributed.is_writer():
                    print(f"warning: {message}", file=sys.stderr)
        if progress:
            print(f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f}  val AUC {val['auc']:.4f}  val LogLoss "
                  f"{val['logloss']:.4f}  ({state['examples'] / max(state['train_seconds'], 1e-9):,.0f} examples/s)", file=sys.stderr)  # fmt: skip
        improved = val["auc"] > state["best_auc"]
        if improved:
            state["best_auc"], state["best_epoch"], state["stale"] = val["auc"], epoch + 1, 0
            if not last and distributed.is_writer():
                torch.save(model.state_dict(), run_dir / "best.pt")
        else:
            state["stale"] += 1
        state.update(epoch=epoch + 1, next_row=0, epoch_examples=0, loss_sum=0.0,
                     gradient={name: 0.0 for name in feature_columns})  # fmt: skip
        if (config.checkpoint_every or distributed.launched()) and not last:
            save_checkpoint()
        if not improved and state["stale"] >= config.patience:
            break
    if not (last and improved):
        distributed.barrier()  # rank 0 has written best.pt
        model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True))
        evaluated = evaluate_stream(model, plan, source, stats, (2,), config.split_seed, config.read_rows, progress)
    test = evaluated["test"]
    seconds = state["train_seconds"]
    examples = int(distributed.sum_over_ranks([state["examples"]])[0])
    metrics = {
        "dataset": source.name, "embedding": config.embedding, "test_auc": test["auc"], "test_logloss": test["logloss"],
        "test_examples": test["examples"], "best_epoch": state["best_epoch"], "best_val_auc": state["best_auc"],
        "epochs_run": len(state["history"]), "train_seconds": seconds,
        "stopped": stop_reason(len(state["history"]), config.epochs, state["best_epoch"], state["best_auc"], config.patience),
        "seconds_per_epoch": seconds / max(len(state["history"]), 1), **throughput(examples, state["examples"], seconds),
        **distributed.replica_check(model), "peak_rss_bytes": peak_rss_bytes(),
        **({"exchange_overflows": state.get("exchange_overflows", 0)} if config.overlap_exchange and distributed.world_size() > 1 else {}),
        "embedding_optimizer": config.embedding_optimizer, "budget_rows": plan.budget_rows,
        "embedding_parameters": plan.embedding_parameters, "embedding_bytes": plan.embedding_bytes(),
        "tables": {t.name: {"rows": t.rows, "dim": t.dim} for t in plan.tables}, "warnings": warnings,
        "history": state["history"],
    }  # fmt: skip
    if method_spec(plan.method).search:
        search = {"dataset": source.name, "budget_rows": plan.budget_rows, "seed": config.seed,
                  "search_multiplier": config.search_multiplier, "adjust_hash_buckets": config.adjust_hash_buckets,
                  "down_projection": config.down_projection, "temperature": config.temperature, "test_auc": test["auc"]}  # fmt: skip
        metrics["policy"] = search_policy(model, plan, config, search).to_dict()
    tables.sparse = False
    distributed.barrier()  # every rank has read best.pt
    if distributed.is_writer():
        save_stream_run(run_dir, config, plan, model, metrics, source, stats, source_options or {})
        for leftover in (resume_path, run_dir / "best.pt"):
            leftover.unlink(missing_ok=True)
    return TrainResult(model=model, plan=plan, metrics=metrics, run_dir=run_dir, warnings=warnings)


def save_stream_run(
    run_dir: Path, config: TrainConfig, plan: EmbeddingPlan, model, metrics: dict, source: StreamSource,
    stats: StreamStats, source_options: dict,
) -> Path:  # fmt: skip
    """The run directory ``uembed/model/train.py: load_run`` and the export read."""
    first = next(source.record_batches(stats.spec, 4096))[1]
    columns = encode_batch(stats.spec, first)
    doc = {
        "train": config.to_dict(),
        "dataset": {"name": source.name, "spec": stats.spec.to_dict()},
        "split": {"train": stats.examples["train"], "validation": stats.examples["validation"], "test": stats.examples["test"]},
        "source": {"streaming": True, "paths": [str(p) for p in source.paths], "format": source.format, **source_options},
        "sample_values": {
            name: [v.decode("utf-8", "surrogateescape") for v in sorted(column.present_values())[:3]]
            for name, column in columns.items()
        },
    }
    if plan.heads:  # hybrid tables: head and tail values per feature with a head, for the export's test vectors of both
        doc["head_samples"] = stream_head_samples(plan, source, stats.spec)
    (run_dir / "config.json").write_text(json.dumps(doc, indent=2, default=str))
    (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    np.savez(run_dir / "vocabularies.npz", **plan.vocabularies)
    if plan.heads:
        np.savez(run_dir / "heads.npz", **plan.heads)
    # Which values training saw (the scan's keys), so the service can count unseen ones.
    save_known_values(run_dir / "known_values.npz", stats.keys)
    torch.save(model.state_dict(), run_dir / "checkpoint.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if metrics.get("policy"):
        ChunkPolicy.from_dict(metrics["policy"]).save(run_dir / "policy.json")
    stats.save(run_dir / "stats")
    return run_dir


def stream_head_samples(plan: EmbeddingPlan, source: StreamSource, spec, count: int = 2, batches: int = 64) -> dict[str, list[str]]:
    """``count`` head values and ``count`` tail values of each feature with a head (the smallest of those found), read
    from the first ``batches`` record batches: a head holds the most frequent values, so the first rows show some."""
    found = {name: ({}, {}) for name in plan.heads}  # per feature: head values, tail values (as dict keys: ordered sets)
    features = [f for f in plan.features if f.name in plan.heads]
    for number, (_, batch) in enumerate(source.record_batches(spec, 4096)):
        columns = encode_batch(spec, batch)
        for feature in features:
            values = [v for v in columns[feature.name].present_values() if v]
            inside = np.isin(hash_canonical(values, feature.lookups[0].seed, count=len(values)), plan.heads[feature.name])
            for value, head in zip(values, inside.tolist()):
                found[feature.name][0 if head else 1].setdefault(value)
        if number + 1 >= batches or all(len(h) >= count and len(t) >= count for h, t in found.values()):
            break
    return {name: [v.decode("utf-8", "surrogateescape") for part in parts for v in sorted(part)[:count]]
            for name, parts in found.items()}  # fmt: skip
