import numpy as np
import pytest
import torch
from torch import nn

from uembed.contract.plan import METHODS, build_plan
from uembed.contract.seo import ChunkPolicy
from uembed.model.embeddings import PlanEmbedding
from uembed.model.networks import RankingModel, build_network
from uembed.model.qat import fake_quantise


def reference_assembly(plan, embedding, rows, weights):
    """Per feature, per lookup: weighted sum of looked-up rows, concatenated; plus biases."""
    tables = {name: w.detach().numpy() for name, w in embedding.table_weights().items()}
    out, slot = [], 0
    for feature in plan.features:
        for lookup in feature.lookups:
            block = tables[lookup.table][rows[:, slot : slot + feature.width]]
            out.append((block * weights[:, slot : slot + feature.width, None]).sum(axis=1))
            slot += feature.width
    assembled = np.concatenate(out, axis=1)
    assembled[:, plan.bias_columns()] += embedding.bias.detach().numpy()
    return assembled


@pytest.mark.parametrize("method", METHODS)
def test_module_matches_a_plain_reference(tiny_dataset, method):
    torch.manual_seed(0)
    # Appliers need a policy: here features read different numbers of 2-wide chunks.
    names = [f.name for f in tiny_dataset.spec.features]
    policy = ChunkPolicy(2, 4, 4, {n: tuple(range(1 + i % 3)) for i, n in enumerate(names)})
    plan = build_plan(method, tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=70, policy=policy)
    embedding = PlanEmbedding(plan)
    with torch.no_grad():
        embedding.bias.normal_()
    rows, weights = plan.encode(tiny_dataset.columns)
    got = embedding(torch.from_numpy(rows), torch.from_numpy(weights)).detach().numpy()
    assert got.shape == (len(tiny_dataset), plan.output_dim)
    np.testing.assert_allclose(got, reference_assembly(plan, embedding, rows, weights), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in embedding.parameters()) == plan.embedding_parameters


@pytest.mark.parametrize("network", ["mlp", "dcn"])
def test_model_is_scriptable_with_identical_outputs(tiny_dataset, network):
    plan = build_plan("semantic-group", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=70)
    model = RankingModel(PlanEmbedding(plan), build_network(network, plan.output_dim, (16,), 2)).eval()
    rows, weights = (torch.from_numpy(a) for a in plan.encode(tiny_dataset.columns))
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(rows, weights), model(rows, weights))


def test_an_example_alone_equals_it_inside_a_batch(tiny_dataset):
    plan = build_plan("multi-size-unified", tiny_dataset.spec, tiny_dataset.columns, 4, budget_rows=70)
    model = RankingModel(PlanEmbedding(plan), build_network("dcn", plan.output_dim, (16,), 1)).eval()
    rows, weights = (torch.from_numpy(a) for a in plan.encode(tiny_dataset.columns))
    with torch.no_grad():
        batch = model(rows, weights)
        alone = torch.cat([model(rows[i : i + 1], weights[i : i + 1]) for i in range(0, len(rows), 37)])
    torch.testing.assert_close(alone, batch[::37], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pruned", [False, True])
def test_a_qat_lookup_quantises_each_distinct_row_once_as_every_slot_would(tiny_dataset, pruned):
    """QAT quantises the distinct rows a batch gathers, then places them: the same floats as quantising each slot's
    row, with the straight-through gradient reaching each looked-up row once a slot."""
    plan = build_plan("multi-size-unified", tiny_dataset.spec, tiny_dataset.columns, 8, budget_rows=70)
    embedding = PlanEmbedding(plan)
    embedding.qat_bits = 2
    if pruned:  # each slot's table keeps its own columns (what a pruned QAT run's quantiser sees)
        kept = np.random.default_rng(0).random((len(plan.tables), 8)) < 0.6
        embedding.qat_columns = torch.from_numpy(kept[plan.slot_tables()])
    rows, weights = (torch.from_numpy(a) for a in plan.encode(tiny_dataset.columns))
    ids = rows + embedding.slot_offset
    assert len(torch.unique(ids)) < ids.numel()  # rows repeat across the batch
    looked_up = embedding.quantised_lookup(ids)
    gathered = nn.functional.embedding(ids, embedding.weight)
    torch.testing.assert_close(looked_up, fake_quantise(gathered, 2, embedding.qat_columns), rtol=0, atol=0)
    looked_up.sum().backward()
    counts = torch.bincount(ids.reshape(-1), minlength=len(embedding.weight)).float()
    torch.testing.assert_close(embedding.weight.grad, counts[:, None].expand_as(embedding.weight), rtol=0, atol=0)
