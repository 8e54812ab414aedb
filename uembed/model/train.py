"""Training and evaluation: Adam on binary cross-entropy, early stopping on validation AUC.

A run writes a directory that export and the study read back::

    runs/<name>/config.json        the TrainConfig, dataset spec and split sizes
    runs/<name>/plan.json          the embedding plan (tables, lookups, seeds)
    runs/<name>/vocabularies.npz   sorted vocabulary keys (collisionless features only)
    runs/<name>/heads.npz          sorted head keys per feature with a head (hybrid tables, --head-share)
    runs/<name>/checkpoint.pt      model state dict (tensors only; load with weights_only=True)
    runs/<name>/metrics.json       per-epoch history with embedding health, test AUC / LogLoss
    runs/<name>/collisions.json    per feature, the training occurrences whose row another value shares (streamed runs have none)
    runs/<name>/policy.json        SEO search runs only: the derived chunk policy (uembed/contract/seo.py)
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uembed.bundle.codecs import default_subvectors
from uembed.contract.collisions import collision_report, save_report, training_value_counts
from uembed.contract.errors import SpecError, UembedError
from uembed.contract.hashing import hash_canonical
from uembed.contract.known import save_known_values, training_keys
from uembed.contract.plan import EmbeddingPlan, build_plan, method_spec
from uembed.contract.seo import ChunkPolicy, derive_policy
from uembed.model import distributed
from uembed.model.data import Dataset
from uembed.model.embeddings import PlanEmbedding, SearchEmbedding
from uembed.model.networks import RankingModel, build_network
from uembed.model.qat import qat_bits
from uembed.model.summary import stop_reason

DOMINANCE_THRESHOLD = 0.5  # a feature with more gradient than all its table-mates together


EXCHANGE_DTYPES = ("float32", "bfloat16")  # of the gradients between data-parallel processes


@dataclass
class TrainConfig:
    """Everything that decides a run besides the data. Defaults suit MovieLens-100K."""

    embedding: str = "unified"
    budget_fraction: float | None = 0.1
    budget_rows: int | None = None
    dim: int = 16
    network: str = "dcn"
    hidden: tuple[int, ...] = (192,)
    cross_layers: int = 1
    learning_rate: float = 1e-3
    # Decoupled (AdamW) weight decay on the embedding tables only; 0 keeps plain Adam.
    embedding_weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 20
    patience: int = 2
    seed: int = 0
    split_seed: int = 0
    dominance_threshold: float = DOMINANCE_THRESHOLD
    # Multi-size unified: lookups per feature = the default for its vocabulary (uembed/contract/plan.py) plus this.
    lookups_offset: int = 0
    # Ablation: these features get a collisionless table of their own, outside the budget.
    exact_features: tuple[str, ...] = ()
    # Hybrid tables: this share of each table's rows is given to the most frequent values, or "auto": a size per
    # table from the values' counts (uembed/contract/plan.py: with_heads, auto_head_size).
    head_share: float | str = 0.0
    # SEO (uembed/contract/seo.py): the Applier's policy, and the search model's shape.
    policy: dict | None = None
    chunk_dim: int = 8
    search_multiplier: int = 2
    adjust_hash_buckets: bool = True
    down_projection: bool = False
    temperature: float = 1.0
    logits_learning_rate: float = 0.02
    # Streaming (uembed/model/streaming.py): the tables' optimiser (uembed/model/optim.py), the shuffle buffer
    # and record batch sizes in examples, a resumable checkpoint every so many examples (0: none).
    embedding_optimizer: str = "adam"
    embedding_learning_rate: float | None = None  # None: learning_rate
    shuffle_buffer: int = 1 << 18
    read_rows: int = 1 << 16
    checkpoint_every: int = 0
    max_examples: int = 0  # train on at most this many examples per epoch (0: all)
    # Quantization-aware training (uembed/model/qat.py): the rowwise codec the tables' rows are trained in; None: off.
    qat: str | None = None
    # ``qat="pq"``: the sub-vectors a row is split into (None: two values a sub-vector, pq's export default).
    pq_subvectors: int | None = None
    # With ``qat``: train in float32 until validation AUC stops improving (``patience``), then fine-tune from the best
    # epoch's weights fake-quantised, at ``qat_fine_tune_lr_scale`` times the learning rates, until it stops again;
    # ``epochs`` bounds each phase. False: quantised throughout.
    qat_warm_start: bool = False
    qat_fine_tune_lr_scale: float = 0.1
    # Data-parallel: apply each step's averaged gradients one step late, while the next step's forward and backward
    # run (uembed/model/distributed.py: OverlappedExchange); False: every step waits for its own exchange.
    overlap_exchange: bool = False
    # Data-parallel: the dtype the gradients travel in ("bfloat16": half the bytes, each rank's gradients rounded).
    exchange_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.exchange_dtype not in EXCHANGE_DTYPES:
            raise ValueError(f"exchange_dtype {self.exchange_dtype!r}: choose one of {', '.join(EXCHANGE_DTYPES)}")

    def wire(self):
        """The dtype for ``uembed/model/distributed.py`` (None: the parameters' own)."""
        return torch.bfloat16 if self.exchange_dtype == "bfloat16" else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: RankingModel
    plan: EmbeddingPlan
    metrics: dict
    run_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every parameter group's learning rate times ``factor`` (a QAT fine-tune after the float32 phase)."""
    for group in optimizer.param_groups:
        group["lr"] *= factor


def set_quantised(tables: PlanEmbedding, config: TrainConfig, on: bool) -> None:
    """Switch a QAT run's quantiser on or off (a warm start's float32 phase runs with it off)."""
    tables.qat_bits = qat_bits(config.qat) if on else 0
    tables.qat_pq = on and config.qat == "pq"


def build_model(plan: EmbeddingPlan, config: TrainConfig) -> RankingModel:
    if method_spec(plan.method).search:
        # Down projection keeps the network's input as wide as the baselines': F * dim columns.
        projected = len(plan.features) * config.dim // config.chunk_dim if config.down_projection else 0
        embedding = SearchEmbedding(plan, config.chunk_dim, config.temperature, projected)
        input_dim = embedding.output_dim
    else:
        embedding, input_dim = PlanEmbedding(plan), plan.output_dim
    tables = getattr(embedding, "base", embedding)
    if config.qat == "pq":
        if distributed.world_size() > 1:
            raise SpecError("--qat pq trains in one process: its codebooks are refitted from that process's rows")
        tables.train_pq(default_subvectors(plan.dim, config.pq_subvectors))
    set_quantised(tables, config, True)
    network = build_network(config.network, input_dim, config.hidden, config.cross_layers)
    return RankingModel(embedding, network)


def plan_for(config: TrainConfig, spec, statistics) -> EmbeddingPlan:
    """The run's embedding plan; ``statistics`` is the training split's columns, or a streamed split's StreamStats."""
    policy = ChunkPolicy.from_dict(config.policy) if config.policy else None
    return build_plan(
        config.embedding, spec, statistics, config.dim, config.budget_fraction, config.budget_rows,
        policy=policy, chunk_dim=config.chunk_dim, search_multiplier=config.search_multiplier,
        adjust_hash_buckets=config.adjust_hash_buckets, lookups_offset=config.lookups_offset,
        exact_features=tuple(config.exact_features), head_share=config.head_share,
    )  # fmt: skip


def build_optimizer(model: RankingModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the network and tables; the SEO search's logits at their own rate; AdamW-style
    decay on the tables alone when ``embedding_weight_decay`` is set (the network is never decayed)."""
    groups: dict[str, list] = {"logits": [], "tables": [], "network": []}
    for name, parameter in model.named_parameters():
        kind = "logits" if name == "embedding.logits" else "tables" if name.startswith("embedding.") else "network"
        groups[kind].append(parameter)
    decay = config.embedding_weight_decay
    param_groups = [
        {"params": groups["network"], "weight_decay": 0.0},
        {"params": groups["tables"], "weight_decay": decay},
        {"params": groups["logits"], "lr": config.logits_learning_rate, "weight_decay": 0.0},
    ]
    param_groups = [group for group in param_groups if group["params"]]
    if decay > 0:
        return torch.optim.AdamW(param_groups, lr=config.learning_rate)
    return torch.optim.Adam(param_groups, lr=config.learning_rate)


def dense_parameters(model: RankingModel) -> int:
    """Parameters of the network on top of the embeddings: what a wider input (multi-size) costs."""
    return sum(p.numel() for p in model.network.parameters())


def feature_columns_of(model: RankingModel, plan: EmbeddingPlan) -> dict[str, tuple[int, int]]:
    """Each feature's columns of the embedding output; none when a projection mixes them."""
    if getattr(model.embedding, "projection", None) is not None:
        return {}
    return plan.feature_columns()


def search_policy(model: RankingModel, plan: EmbeddingPlan, config: TrainConfig, search: dict) -> ChunkPolicy:
    """The SEO policy a trained search model's logits give (uembed/contract/seo.py: derive_policy)."""
    logits = model.embedding.logits.detach().numpy()
    names = [f.name for f in plan.features]
    return derive_policy(logits, names, config.temperature, config.chunk_dim, config.dim, search)


def predict(model: RankingModel, rows: np.ndarray, weights: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Probabilities (float32) for encoded examples."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            logits = model(torch.from_numpy(rows[start : start + batch_size]), torch.from_numpy(weights[start : start + batch_size]))
            out.append(torch.sigmoid(logits).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def evaluate(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    # imported here: scikit-learn takes about a second to import, which a command that only reads a run (an export,
    # a row push) does not need
    from sklearn.metrics import log_loss, roc_auc_score

    return {
        "auc": float(roc_auc_score(labels, probabilities)),
        "logloss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }


def embedding_health(model: RankingModel, plan: EmbeddingPlan, rows: np.ndarray, weights: np.ndarray) -> dict:
    """Per-feature norm quantiles of the assembled embeddings of (a sample of) examples."""
    model.eval()
    with torch.no_grad():
        vectors = model.embedding(torch.from_numpy(rows[:4096]), torch.from_numpy(weights[:4096]))
    out = {}
    for name, (start, stop) in feature_columns_of(model, plan).items():
        norms = vectors[:, start:stop].norm(dim=1).numpy()
        p5, p50, p95 = np.percentile(norms, [5, 50, 95])
        out[name] = {"norm_p5": float(p5), "norm_p50": float(p50), "norm_p95": float(p95)}
    return out


def gradient_dominance(
    plan: EmbeddingPlan, gradient: dict[str, float], threshold: float
) -> tuple[dict, list[tuple[str, str, float]]]:
    """Each feature's share of the gradient into every shared table, and the (table, feature,
    share) of each feature whose share is above ``threshold``."""
    shares, dominant = {}, []
    for table, features in plan.table_features().items():
        if len(features) < 2:
            continue
        total = sum(gradient[f] for f in features) or 1.0
        shares[table] = {f: gradient[f] / total for f in features}
        top = max(features, key=lambda f: shares[table][f])
        if shares[table][top] > threshold:
            dominant.append((table, top, shares[table][top]))
    return shares, dominant


def train(
    config: TrainConfig,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset | None,
    run_dir: Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
    echo_warnings: bool = True,
) -> TrainResult:
    """Train one model; the best validation-AUC epoch is the one kept and tested.

    ``on_epoch(epoch, val_auc)`` is called after each epoch's validation (hyperparameter search
    reports to its pruner there, and may raise to stop the run). Without a ``test_set`` nothing is
    tested: the metrics hold validation figures only (model selection never sees the test split).
    Warnings are printed to stderr unless ``echo_warnings`` is off; they are in the metrics either way.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    plan = plan_for(config, train_set.spec, train_set.columns)
    for message in plan.warnings if echo_warnings else ():
        print(f"warning: {message}", file=sys.stderr)
    model = build_model(plan, config)
    distributed.use_sparse_tables(model)
    optimizer = build_optimizer(model, config)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train_rows, train_weights = plan.encode(train_set.columns)
    val_rows, val_weights = plan.encode(val_set.columns)
    labels = torch.from_numpy(train_set.labels)
    feature_columns = feature_columns_of(model, plan)

    history, warnings, warned = [], list(plan.warnings), set()
    best_auc, best_state, best_epoch, stale = -math.inf, None, -1, 0
    table_module = getattr(model.embedding, "base", model.embedding)
    # The epoch (0-based) the quantised phase of a warm-started QAT run began at; None: not begun (float32 phase)
    quantised_from = None if config.qat and config.qat_warm_start else 0
    set_quantised(table_module, config, quantised_from is not None)
    train_seconds, first_epoch, examples_trained = 0.0, 0, 0
    # Launched by torchrun: a checkpoint every epoch, resumed when the group restarts after a lost rank.
    resume_path = run_dir / "resume.pt" if run_dir is not None and distributed.launched() else None
    resume_key = json.dumps({"config": config.to_dict(), "dataset": train_set.name, "examples": len(train_set),
                             "world_size": distributed.world_size()}, sort_keys=True, default=str)  # fmt: skip
    if resume_path is not None and resume_path.is_file():
        saved = torch.load(resume_path, weights_only=True)
        if saved["key"] != resume_key:
            raise UembedError(f"{run_dir} holds a checkpoint of another configuration or data; choose another run directory")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        history, warnings, best_state = saved["history"], saved["warnings"], saved["best_state"]
        warned = {tuple(pair) for pair in saved["warned"]}
        best_auc, best_epoch, stale = saved["best_auc"], saved["best_epoch"], saved["stale"]
        quantised_from = saved.get("quantised_from", quantised_from)  # the optimiser's state holds its scaled rates
        set_quantised(table_module, config, quantised_from is not None)
        train_seconds, first_epoch, examples_trained = saved["train_seconds"], saved["epoch"], saved["examples"]
        if distributed.is_writer():
            print(f"resuming from {resume_path}: epoch {first_epoch + 1}", file=sys.stderr)
    if resume_path is not None:
        distributed.check_same_epoch(first_epoch, str(resume_path))
    progress = progress and distributed.is_writer()
    last_epoch = config.epochs if quantised_from is None else config.epochs + (quantised_from or 0)
    for epoch in range(first_epoch, 2 * config.epochs):
        if quantised_from is None and (stale >= config.patience or epoch == config.epochs):
            # the float32 phase is over: its best weights go on fake-quantised, judged afresh
            model.load_state_dict(best_state)
            set_quantised(table_module, config, True)
            quantised_from, last_epoch = epoch, epoch + config.epochs
            best_auc, best_state, best_epoch, stale = -math.inf, None, -1, 0
            scale_learning_rates(optimizer, config.qat_fine_tune_lr_scale)
        if stale >= config.patience or epoch >= last_epoch:
            break
        model.train()
        started = time.perf_counter()
        order = distributed.shard_order(torch.from_numpy(rng.permutation(len(train_set))))
        rows_t, weights_t = torch.from_numpy(train_rows), torch.from_numpy(train_weights)
        gradient = {name: 0.0 for name in feature_columns}
        loss_sum, batches = 0.0, range(0, len(order), config.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False, file=sys.stderr)
        exchange = (distributed.OverlappedExchange(model, dense_tables=True, wire=config.wire())
                    if config.overlap_exchange and distributed.world_size() > 1 else None)  # fmt: skip
        for start in bar:
            index = order[start : start + config.batch_size]
            vectors = model.embedding(rows_t[index], weights_t[index])
            vectors.retain_grad()
            loss = loss_fn(model.network(vectors), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if exchange is None:
                distributed.sync_gradients(model, dense_tables=True, wire=config.wire())
                optimizer.step()
            elif exchange.step(True):
                optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
            grad = vectors.grad
            for name, (a, b) in feature_columns.items():
                gradient[name] += float(grad[:, a:b].norm(dim=1).sum())
        if exchange is not None and exchange.flush():
            optimizer.step()
        train_seconds += time.perf_counter() - started
        examples, loss_sum, *sums = distributed.sum_over_ranks([len(order), loss_sum, *gradient.values()])
        examples_trained += int(examples)
        gradient = {name: value / examples for name, value in zip(gradient, sums)}
        val_metrics = evaluate_shared(model, val_set.labels, val_rows, val_weights)
        shares, dominant = gradient_dominance(plan, gradient, config.dominance_threshold)
        entry = {
            "epoch": epoch + 1,
            **({"quantised": quantised_from is not None} if config.qat and config.qat_warm_start else {}),
            "train_loss": loss_sum / examples,
            "examples": int(examples),
            "val_auc": val_metrics["auc"],
            "val_logloss": val_metrics["logloss"],
            "seconds": time.perf_counter() - started,
            "health": {
                "norms": embedding_health(model, plan, val_rows, val_weights),
                "gradient_per_feature": gradient,
                "gradient_share_per_table": shares,
            },
        }
        history.append(entry)
        for table, feature, share in dominant:
            # Once per run for each (table, feature): the share itself drifts from epoch to epoch.
            if (table, feature) not in warned:
                warned.add((table, feature))
                message = f"epoch {epoch + 1}: feature {feature!r} carries {share:.0%} of the gradient into shared table {table!r}"
                warnings.append(message)
                if echo_warnings and distributed.is_writer():
                    print(f"warning: {message}", file=sys.stderr)
        if progress:
            print(
                f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f}  val AUC {val_metrics['auc']:.4f}"
                f"  val LogLoss {val_metrics['logloss']:.4f}  ({entry['seconds']:.1f}s)",
                file=sys.stderr,
            )
        improved = val_metrics["auc"] > best_auc
        if improved:
            best_auc, best_epoch, stale = val_metrics["auc"], epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, val_metrics["auc"])
        if resume_path is not None:
            distributed.save_checkpoint(resume_path, {
                "key": resume_key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                "history": history, "warnings": warnings, "warned": sorted(warned), "best_state": best_state,
                "best_auc": best_auc, "best_epoch": best_epoch, "stale": stale, "train_seconds": train_seconds,
                "examples": examples_trained, "quantised_from": quantised_from})  # fmt: skip
    model.load_state_dict(best_state)
    test_metrics = {"auc": None, "logloss": None}
    if test_set is not None:
        test_rows, test_weights = plan.encode(test_set.columns)
        test_metrics = evaluate_shared(model, test_set.labels, test_rows, test_weights)
    metrics = {
        "dataset": train_set.name,
        "embedding": config.embedding,
        "test_auc": test_metrics["auc"],
        "test_logloss": test_metrics["logloss"],
        "best_epoch": best_epoch,
        "best_val_auc": best_auc,
        "epochs_run": len(history),
        "stopped": (f"float32 for {quantised_from} epochs, then fake-quantised ({config.qat}) at {config.qat_fine_tune_lr_scale:g}x "
                    "the learning rate: " if config.qat and config.qat_warm_start else "")
                   + stop_reason(len(history), last_epoch, best_epoch, best_auc, config.patience),
        **({"qat_warm_start_epochs": quantised_from} if config.qat and config.qat_warm_start else {}),
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(len(history), 1),
        **throughput(examples_trained, examples_trained // distributed.world_size(), train_seconds),
        **distributed.replica_check(model),
        "budget_rows": plan.budget_rows,
        "embedding_parameters": plan.embedding_parameters,
        "embedding_bytes": plan.embedding_bytes(),
        "dense_parameters": dense_parameters(model),
        "tables": {t.name: {"rows": t.rows, "dim": t.dim} for t in plan.tables},
        "warnings": warnings,
        "history": history,
    }
    if method_spec(plan.method).search:
        search = {"dataset": train_set.name, "budget_rows": plan.budget_rows, "seed": config.seed,
                  "search_multiplier": config.search_multiplier, "adjust_hash_buckets": config.adjust_hash_buckets,
                  "down_projection": config.down_projection, "temperature": config.temperature,
                  "test_auc": test_metrics["auc"]}  # fmt: skip
        metrics["policy"] = search_policy(model, plan, config, search).to_dict()
    getattr(model.embedding, "base", model.embedding).sparse = False
    result = TrainResult(model=model, plan=plan, metrics=metrics, warnings=warnings)
    if run_dir is not None:
        if distributed.is_writer():
            save_run(run_dir, config, plan, model, metrics, train_set, val_set, test_set)
            if resume_path is not None:
                resume_path.unlink(missing_ok=True)
        result.run_dir = run_dir
    return result


def evaluate_shared(model: RankingModel, labels: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """AUC and LogLoss over every rank's share of the examples (all of them with one process)."""
    share = distributed.eval_share(len(labels))
    return evaluate(*distributed.gather_predictions(labels[share], predict(model, rows[share], weights[share])))


def throughput(examples: int, own_examples: int, seconds: float) -> dict:
    """The run's examples/s in all and each rank's (``own_examples``: this rank's), and the world size."""
    per_rank = distributed.gather_objects(own_examples / max(seconds, 1e-9))
    return {"world_size": distributed.world_size(), "train_examples": examples,
            "examples_per_second": examples / max(seconds, 1e-9), "examples_per_second_per_rank": per_rank}  # fmt: skip


def save_run(
    run_dir: Path,
    config: TrainConfig,
    plan: EmbeddingPlan,
    model: RankingModel,
    metrics: dict,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset,
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_doc = {
        "train": config.to_dict(),
        "dataset": {"name": train_set.name, "spec": train_set.spec.to_dict()},
        "split": {"train": len(train_set), "validation": len(val_set), "test": len(test_set)},
        "source": train_set.source,
        # A few real training values per feature: the export's hashing test vectors use them.
        "sample_values": {
            name: [v.decode("utf-8", "surrogateescape") for v in sorted(column.present_values())[:3]]
            for name, column in train_set.columns.items()
        },
        # Hybrid tables: a few head and tail values per feature with a head, for the export's test vectors of both.
        "head_samples": head_samples(plan, train_set.columns),
    }
    (run_dir / "config.json").write_text(json.dumps(config_doc, indent=2))
    (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    np.savez(run_dir / "vocabularies.npz", **plan.vocabularies)
    if plan.heads:
        np.savez(run_dir / "heads.npz", **plan.heads)
    # Which values training saw, per feature: the export puts them in the bundle so the service can count unseen ones.
    save_known_values(run_dir / "known_values.npz", training_keys(train_set.columns))
    # Which training values share a row, per feature (uembed/contract/collisions.py): printed, and carried into the bundle.
    save_report(run_dir / "collisions.json", collision_report(plan, training_value_counts(train_set.columns)))
    torch.save(model.state_dict(), run_dir / "checkpoint.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if metrics.get("policy"):
        ChunkPolicy.from_dict(metrics["policy"]).save(run_dir / "policy.json")
    return run_dir


def head_samples(plan: EmbeddingPlan, columns, count: int = 2) -> dict[str, list[str]]:
    """``count`` head values and ``count`` tail values of each feature with a head (the smallest, as bytes)."""
    out = {}
    for feature in plan.features:
        if feature.name in plan.heads:
            values = sorted(columns[feature.name].present_values())
            inside = np.isin(hash_canonical(values, feature.lookups[0].seed, count=len(values)), plan.heads[feature.name])
            chosen = [v for v, h in zip(values, inside) if h][:count] + [v for v, h in zip(values, inside) if not h][:count]
            out[feature.name] = [v.decode("utf-8", "surrogateescape") for v in chosen]
    return out


def load_run(run_dir: Path) -> tuple[TrainConfig, EmbeddingPlan, RankingModel, dict]:
    """Rebuild a trained model from its run directory (no pickle: tensors only)."""
    doc = json.loads((run_dir / "config.json").read_text())
    raw = doc["train"]
    raw["hidden"] = tuple(raw["hidden"])
    raw["exact_features"] = tuple(raw.get("exact_features", ()))
    config = TrainConfig(**raw)
    with np.load(run_dir / "vocabularies.npz", allow_pickle=False) as stored:
        vocabularies = {name: stored[name] for name in stored.files}
    heads = {}
    if (run_dir / "heads.npz").exists():
        with np.load(run_dir / "heads.npz", allow_pickle=False) as stored:
            heads = {name: stored[name] for name in stored.files}
    plan = EmbeddingPlan.from_dict(json.loads((run_dir / "plan.json").read_text()), vocabularies, heads)
    # Built on the meta device and given the checkpoint's tensors, memory-mapped: the tables are never
    # initialised, copied or read whole (an export of a table as large as memory streams it from the file).
    with torch.device("meta"):
        model = build_model(plan, config)
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True, mmap=True), assign=True)
    model.eval()
    return config, plan, model, doc


def fit_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
              data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], order: torch.Tensor, batches, batch_size: int) -> float:  # fmt: skip
    """One pass over encoded examples (rows, weights, labels) in ``order``, a batch at each start of ``batches``;
    returns the mean training loss."""
    rows, weights, labels = data
    loss_sum = 0.0
    for start in batches:
        index = order[start : start + batch_size]
        loss = loss_fn(model(rows[index], weights[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(index)
    return loss_sum / max(len(order), 1)


def continue_training(
    run_dir: Path,
    train_set: Dataset,
    epochs: int,
    out_dir: Path,
    after_epoch: Callable[[RankingModel, EmbeddingPlan, int], None] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train a run's embedding tables further on new data, everything else frozen, into a new run directory.

    Only the tables move: the network (and feature biases) stay as trained, so replicas serving the run's bundle
    reach the new model by row updates alone, and a bundle exported from ``out_dir`` scores as they do.
    ``after_epoch(model, plan, epoch)`` runs after each epoch (``--publish-updates`` publishes the changed rows
    there). The base run's plan, learning rate and batch size are kept; ``out_dir`` gets its config (with
    ``continued_from``), plan, vocabularies and known values, and the new checkpoint and metrics.
    """
    import shutil

    config, plan, model, doc = load_run(run_dir)
    if not isinstance(model.embedding, PlanEmbedding):
        raise ValueError(f"{run_dir} is an SEO search run: continue training the Applier run instead")
    for parameter in model.parameters():  # load_run maps the checkpoint read-only: train on a copy
        parameter.data = parameter.data.clone()
        parameter.requires_grad_(False)
    table = model.embedding.weight
    table.requires_grad_(True)
    optimizer = torch.optim.Adam([table], lr=config.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rows, weights = (torch.from_numpy(a) for a in plan.encode(train_set.columns))
    labels = torch.from_numpy(train_set.labels)
    rng = np.random.default_rng(seed)
    model.eval()  # the network is frozen: no training-mode behaviour anywhere
    history = []
    for epoch in range(epochs):
        started = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(train_set)))
        batches = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False,
                       file=sys.stderr)  # fmt: skip
        loss = fit_epoch(model, optimizer, loss_fn, (rows, weights, labels), order, batches, config.batch_size)
        history.append({"epoch": epoch + 1, "train_loss": loss, "seconds": time.perf_counter() - started})
        if progress:
            print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f} ({history[-1]['seconds']:.1f}s)", file=sys.stderr)
        if after_epoch is not None:
            after_epoch(model, plan, epoch + 1)
    table.requires_grad_(False)
    base_metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    metrics = {**{k: base_metrics.get(k) for k in ("dataset", "embedding", "budget_rows", "embedding_parameters", "embedding_bytes",
                                                   "dense_parameters", "tables")},  # fmt: skip
               "continued_from": str(run_dir), "train_examples": len(train_set), "epochs_run": epochs, "history": history,
               "test_auc": None, "test_logloss": None}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({**doc, "continued_from": str(run_dir)}, indent=2))
    for name in ("plan.json", "vocabularies.npz", "heads.npz", "known_values.npz"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / name)
    save_report(out_dir / "collisions.json", collision_report(plan, training_value_counts(train_set.columns)))  # of the new data
    torch.save(model.state_dict(), out_dir / "checkpoint.pt")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(model=model, plan=plan, metrics=metrics, run_dir=out_dir)
