"""Structured dimension pruning: a trained run's tables narrowed to ``keep`` of their columns, with fine-tuning.

A table's column ``c`` feeds the dense network at ``g * dim + c`` for every (feature, lookup) group ``g`` that reads
that table (one group per feature of a unified table, several per feature of a multi-size one). A column's
contribution is its norm over the table's rows times the norm of the first layer's weights reading it, over all
those inputs (an MLP's first linear layer; a DCN's first cross layer and the first layer of its MLP, which both read
the embeddings). Pruning masks the embedding output (feature biases included) in the columns it removes, a share of
them at the start of each epoch until ``keep`` remain, and fine-tunes the whole model between.

A masked column is zero at the network's input, so removing it changes no score: the matching input columns of the
first layer go (and a cross layer's rows as well, whose output in that column stays zero), and each table keeps its
own ``keep`` columns. The result is a normal run directory whose plan has dim ``keep``: export and serving see a
narrower model and need no special case.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from uembed.contract.errors import UembedError
from uembed.contract.plan import EmbeddingPlan, method_spec
from uembed.model.data import Dataset
from uembed.model.embeddings import PlanEmbedding
from uembed.model.networks import MLP, DCNv2, RankingModel, build_network
from uembed.model.train import TrainConfig, TrainResult, evaluate, fit_epoch, load_run, predict

RUN_FILES = ("vocabularies.npz", "heads.npz", "known_values.npz", "collisions.json")  # unchanged by pruning: rows are not
TABLE_NORM_CHUNK_ROWS = 1 << 16


class PruneError(UembedError):
    kind = "prune"


class MaskedEmbedding(nn.Module):
    """A plan embedding whose output is zero in the pruned columns: ``mask`` float32 ``[output_dim]``."""

    def __init__(self, base: PlanEmbedding) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("mask", torch.ones(base.pooling.shape[0] * base.dim))

    def forward(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.base(rows, weights) * self.mask


def check_prune_options(run_dir: Path, keep: int, epochs: int) -> dict:
    """Refuse what cannot be pruned before any data is read; returns the run's config document."""
    if not (run_dir / "checkpoint.pt").is_file() or not (run_dir / "plan.json").is_file():
        raise PruneError(f"{run_dir} is not a training run directory (no checkpoint.pt and plan.json)")
    doc = json.loads((run_dir / "config.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    if (doc.get("source") or {}).get("streaming"):
        raise PruneError(f"{run_dir} is a streamed run: pruning fine-tunes in memory, on a run trained in memory")
    if method_spec(plan["method"]).search:
        raise PruneError(f"{run_dir} is an SEO search run: prune the Applier run trained from its policy instead")
    if doc.get("train", {}).get("qat") == "pq":
        raise PruneError(f"{run_dir} was trained with --qat pq: its codebooks are as wide as its rows, so it is not pruned")
    dim = int(plan["dim"])
    if dim < 2:
        raise PruneError(f"{run_dir}'s tables have dim {dim}: there is no column to remove")
    if keep < 1 or keep >= dim:
        raise PruneError(f"--keep must be between 1 and {dim - 1} (the run's tables have dim {dim}), got {keep}")
    if epochs < 1:
        raise PruneError(f"--epochs must be at least 1, got {epochs}")
    return doc


def group_tables(plan: EmbeddingPlan) -> list[int]:
    """Index into ``plan.tables`` of each (feature, lookup) group, in output order."""
    position = {t.name: i for i, t in enumerate(plan.tables)}
    return [position[lookup.table] for f in plan.features for lookup in f.lookups]


def first_layer_weights(network: nn.Module) -> list[torch.Tensor]:
    """The weight matrices ``[out, input_dim]`` that read the embeddings directly."""
    if isinstance(network, MLP):
        return [network.layers[0].weight]
    if isinstance(network, DCNv2):
        return [network.cross[0].linear.weight, network.layers[0].weight] if len(network.cross) else [network.layers[0].weight]
    raise PruneError(f"pruning knows the MLP and DCN-v2 networks, not {type(network).__name__}")


def table_column_norms(weight: torch.Tensor) -> np.ndarray:
    """Each column's L2 norm over the rows, a chunk of rows at a time (a large table is never copied whole)."""
    squares = torch.zeros(weight.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, weight.shape[0], TABLE_NORM_CHUNK_ROWS):
            squares += weight[start : start + TABLE_NORM_CHUNK_ROWS].double().square().sum(dim=0)
    return squares.sqrt().numpy()


def column_scores(base: PlanEmbedding, network: nn.Module, plan: EmbeddingPlan) -> list[np.ndarray]:
    """Per table, float64 ``[dim]``: the column's norm over the table's rows times the norm of the first layer's
    weights reading it, over every group that reads the table."""
    with torch.no_grad():
        inputs = sum(w.double().square().sum(dim=0) for w in first_layer_weights(network)).numpy()  # [output_dim]
    reading = np.zeros((len(plan.tables), plan.dim))
    for group, table in enumerate(group_tables(plan)):
        reading[table] += inputs[group * plan.dim : (group + 1) * plan.dim]
    tables = base.table_weights()
    return [table_column_norms(tables[t.name]) * np.sqrt(reading[i]) for i, t in enumerate(plan.tables)]


def keep_schedule(dim: int, keep: int, steps: int) -> list[int]:
    """Columns kept after each of ``steps`` pruning steps: an even share removed each step, ``keep`` at the last."""
    return [dim - (dim - keep) * (step + 1) // steps for step in range(steps)]


def prune_step(kept: list[np.ndarray], scores: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Each table's kept columns (a bool mask) narrowed to its ``count`` best-scoring ones still kept."""
    out = []
    for mask, score in zip(kept, scores):
        ranked = np.argsort(-np.where(mask, score, -np.inf), kind="stable")
        narrowed = np.zeros_like(mask)
        narrowed[ranked[:count]] = True
        out.append(narrowed)
    return out


def output_mask(plan: EmbeddingPlan, kept: list[np.ndarray]) -> np.ndarray:
    """bool ``[output_dim]``: the embedding output's columns that stay (each group's table's kept columns)."""
    return np.concatenate([kept[table] for table in group_tables(plan)])


def narrow_plan(plan: EmbeddingPlan, keep: int) -> EmbeddingPlan:
    """The plan with every table ``keep`` columns wide; rows, heads and vocabularies as they were."""
    return replace(plan, dim=keep, tables=tuple(replace(t, dim=keep) for t in plan.tables), vocabularies=dict(plan.vocabularies),
                   heads=dict(plan.heads))  # fmt: skip


def slot_columns(plan: EmbeddingPlan, kept: list[np.ndarray]) -> torch.Tensor:
    """bool ``[S, dim]``: the columns each slot's table keeps (what a QAT run's quantiser may look at)."""
    return torch.from_numpy(np.stack([kept[table] for table in plan.slot_tables()]))


def narrow_network(network: nn.Module, config: TrainConfig, columns: torch.Tensor) -> nn.Module:
    """The network reading only the input ``columns``: the first layer's columns (and a cross layer's rows) go."""
    narrow = build_network(config.network, len(columns), config.hidden, config.cross_layers)
    state = {name: value.clone() for name, value in network.state_dict().items()}
    state["layers.0.weight"] = state["layers.0.weight"][:, columns]
    for index in range(len(getattr(network, "cross", ()))):
        weight, bias = f"cross.{index}.linear.weight", f"cross.{index}.linear.bias"
        state[weight], state[bias] = state[weight][columns][:, columns], state[bias][columns]
    narrow.load_state_dict(state)
    return narrow


def narrow_model(model: RankingModel, plan: EmbeddingPlan, config: TrainConfig, kept: list[np.ndarray]) -> tuple[RankingModel, EmbeddingPlan]:
    """The model with each table's kept columns only, scoring as the masked model does."""
    keep = int(kept[0].sum())
    base = model.embedding.base
    narrow = narrow_plan(plan, keep)
    embedding = PlanEmbedding(narrow)
    embedding.qat_bits = base.qat_bits  # a QAT run stays one: its narrower rows are quantised as the kept columns were
    stays = output_mask(plan, kept)
    with torch.no_grad():
        tables = base.table_weights()
        embedding.weight.copy_(torch.cat([tables[t.name][:, torch.from_numpy(np.flatnonzero(m))] for t, m in zip(plan.tables, kept)]))
        embedding.bias.copy_(base.bias[torch.from_numpy(stays[plan.bias_columns()])])
    return RankingModel(embedding, narrow_network(model.network, config, torch.from_numpy(np.flatnonzero(stays)))), narrow


def prune_run(
    run_dir: Path,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset,
    keep: int,
    epochs: int,
    out_dir: Path,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Prune ``run_dir``'s tables to ``keep`` columns over ``epochs`` epochs of fine-tuning into the run ``out_dir``.

    Epoch ``e`` of the first ``max(epochs - 1, 1)`` removes a share of the columns before it trains; the epochs after
    train at ``keep`` columns, and the one with the best validation AUC among them is kept. ``out_dir`` gets the
    narrowed plan, config and checkpoint, the run's other files, and metrics with the AUC before and after.
    """
    check_prune_options(run_dir, keep, epochs)
    config, plan, model, doc = load_run(run_dir)
    for parameter in model.parameters():  # load_run maps the checkpoint read-only: fine-tune a copy
        parameter.data = parameter.data.clone()
    torch.manual_seed(seed)
    masked = RankingModel(MaskedEmbedding(model.embedding), model.network)
    encoded = {name: plan.encode(split.columns) for name, split in (("train", train_set), ("validation", val_set), ("test", test_set))}
    before = evaluate(test_set.labels, predict(masked, *encoded["test"]))
    optimizer = torch.optim.Adam(masked.parameters(), lr=config.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    rows, weights = (torch.from_numpy(a) for a in encoded["train"])
    labels = torch.from_numpy(train_set.labels)
    rng = np.random.default_rng(seed)
    steps = keep_schedule(plan.dim, keep, max(epochs - 1, 1))
    kept = [np.ones(plan.dim, dtype=bool) for _ in plan.tables]
    history, best = [], None
    for epoch in range(epochs):
        started = time.perf_counter()
        if epoch < len(steps):
            kept = prune_step(kept, column_scores(masked.embedding.base, masked.network, plan), steps[epoch])
            masked.embedding.mask.copy_(torch.from_numpy(output_mask(plan, kept).astype(np.float32)))
            # QAT: a row's scale and bias come from its kept columns alone, as the narrowed table's rows will.
            masked.embedding.base.qat_columns = slot_columns(plan, kept)
        masked.train()
        order = torch.from_numpy(rng.permutation(len(labels)))
        loss = fit_epoch(masked, optimizer, loss_fn, (rows, weights, labels), order, range(0, len(order), config.batch_size), config.batch_size)
        val = evaluate(val_set.labels, predict(masked, *encoded["validation"]))
        entry = {"epoch": epoch + 1, "kept": int(kept[0].sum()), "train_loss": loss,
                 "val_auc": val["auc"], "val_logloss": val["logloss"], "seconds": time.perf_counter() - started}  # fmt: skip
        history.append(entry)
        if progress:
            print(f"prune epoch {epoch + 1}: {entry['kept']} of {plan.dim} columns, train loss {entry['train_loss']:.4f}, "
                  f"val AUC {val['auc']:.4f} ({entry['seconds']:.1f}s)", file=sys.stderr)  # fmt: skip
        if entry["kept"] == keep and (best is None or val["auc"] > best[0]):
            best = (val["auc"], epoch + 1, copy.deepcopy(masked.state_dict()))
    masked.load_state_dict(best[2])
    narrow, narrow_plan_ = narrow_model(masked, plan, config, kept)
    # The removed columns were zero at the network's input: the narrower model must score as the masked one did.
    gap = np.abs(predict(narrow, *narrow_plan_.encode(val_set.columns)) - predict(masked, *encoded["validation"])).max(initial=0.0)
    if gap > 1e-5:
        raise PruneError(f"the narrowed model scores {gap:.2g} away from the pruned one; not written")
    after = evaluate(test_set.labels, predict(narrow, *narrow_plan_.encode(test_set.columns)))
    metrics = pruned_metrics(run_dir, plan, narrow_plan_, narrow, kept, before, after, best[1], history)
    save_pruned_run(run_dir, out_dir, doc, config, narrow_plan_, plan, narrow, metrics)
    return TrainResult(model=narrow, plan=narrow_plan_, metrics=metrics, run_dir=out_dir)


def pruned_metrics(run_dir: Path, plan: EmbeddingPlan, narrow: EmbeddingPlan, model: RankingModel, kept: list[np.ndarray],
                   before: dict, after: dict, best_epoch: int, history: list[dict]) -> dict:  # fmt: skip
    base = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return {
        **{k: base.get(k) for k in ("dataset", "embedding", "budget_rows")},
        "test_auc": after["auc"],
        "test_logloss": after["logloss"],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "embedding_parameters": narrow.embedding_parameters,
        "embedding_bytes": narrow.embedding_bytes(),
        "dense_parameters": sum(p.numel() for p in model.network.parameters()),
        "tables": {t.name: {"rows": t.rows, "dim": t.dim} for t in narrow.tables},
        "pruning": {
            "from": str(run_dir),
            "dim": plan.dim,
            "kept": narrow.dim,
            "columns": {t.name: np.flatnonzero(m).tolist() for t, m in zip(plan.tables, kept)},
            "test_auc_before": before["auc"],
            "test_logloss_before": before["logloss"],
            "test_auc_after": after["auc"],
            "test_logloss_after": after["logloss"],
            "embedding_bytes_before": plan.embedding_bytes(),
        },
        "history": history,
    }


def save_pruned_run(run_dir: Path, out_dir: Path, doc: dict, config: TrainConfig, narrow: EmbeddingPlan, plan: EmbeddingPlan,
                    model: RankingModel, metrics: dict) -> None:  # fmt: skip
    """``out_dir`` as a run directory of the narrowed model; the run's data files are copied unchanged."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The config's dim is the model's width per feature; a chunk plan's tables are chunk_dim wide, and both shrink alike.
    chunked = config.dim != plan.dim
    policy = {**config.policy, "dim": config.policy["dim"] * narrow.dim // plan.dim, "chunk_dim": narrow.dim} if config.policy else None
    train = replace(config, dim=config.dim * narrow.dim // plan.dim, chunk_dim=narrow.dim if chunked else config.chunk_dim, policy=policy)
    config_doc = {**doc, "train": train.to_dict(), "pruned_from": str(run_dir)}
    (out_dir / "config.json").write_text(json.dumps(config_doc, indent=2))
    (out_dir / "plan.json").write_text(json.dumps(narrow.to_dict(), indent=2))
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / name)
    torch.save(model.state_dict(), out_dir / "checkpoint.pt")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
