"""The dense network's first layer split in two by feature group: the context's columns and the others'.

A ranking request's candidates share its context (the user's features), so the context's part of the first layer,
``context_embeddings @ W_context``, is the same for every candidate. A bundle exported with a context split carries
the dense network as two ONNX models that compute it that way for every request, flat or ranking::

    dense_context.onnx   context_embeddings [batch, E_c] -> context_partial [batch, H]     (MatMul by W's context rows)
    dense_rest.onnx      own_embeddings [batch, E_o], context_partial [batch, H] -> probability [batch]
                         (MatMul by W's other rows, plus context_partial, then the rest of dense.onnx unchanged)

A flat request runs both on every example; where the export also wrote ``dense_flat.onnx`` (the two parts in one
model: the input's columns cut by slices, then the same nodes), the service runs that one model instead, with
the same floats and one call of ONNX Runtime rather than two. A ranking request whose context is the split's feature group runs the
first once a request and the second on its candidates, with the partial repeated to each: the same floats as the
flat form, because each output row of a matrix product depends on its input row alone (ONNX Runtime's CPU product
with constant weights; tested, and checked again when a bundle loads). The two parts sum the first layer in another
order than ``dense.onnx``: their scores differ from its by float rounding (about 1e-7; the export checks 1e-5 on
random inputs), and ``dense.onnx`` stays in the bundle for the runtimes that do not use the parts (CUDA, TorchScript).

Needs ``onnx`` (the train extra): run at export time, never by the service.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from uembed.bundle.format import file_entry
from uembed.contract.errors import UembedError

log = logging.getLogger("uembed.bundle")
CONTEXT_FILE, REST_FILE, FLAT_FILE = "dense_context.onnx", "dense_rest.onnx", "dense_flat.onnx"
CONTEXT_INPUT, OWN_INPUT, PARTIAL = "context_embeddings", "own_embeddings", "context_partial"


def context_columns(layout: Sequence[dict], features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the dense network's input that ``features`` fill, and the others', each in input order."""
    names = [entry["feature"] for entry in layout]
    unknown = sorted(set(features) - set(names))
    if unknown:
        raise UembedError(f"context split: {', '.join(unknown)} not among the model's features ({', '.join(names)})")
    chosen = set(features)
    context = [np.arange(e["start"], e["stop"]) for e in layout if e["feature"] in chosen]
    own = [np.arange(e["start"], e["stop"]) for e in layout if e["feature"] not in chosen]
    if not context:
        raise UembedError("context split: no context features given")
    if not own:
        raise UembedError("context split: every feature is in the context; the candidates need some of their own")
    return np.sort(np.concatenate(context)), np.sort(np.concatenate(own))


def layout_of(plan) -> list[dict]:
    """The dense input's layout as a manifest records it: each feature's columns."""
    return [{"feature": f, "start": a, "stop": b} for f, (a, b) in plan.feature_columns().items()]


def add_context_split(folder: Path, manifest: dict, features: Sequence[str]) -> None:
    """Write the parts of the bundle's ``dense.onnx`` split by ``features`` into ``folder`` and record them in
    ``manifest["dense"]["context_split"]``."""
    dense = manifest["dense"]
    dense["context_split"] = write_context_split(folder, dense["file"], dense["layout"], features)


def write_context_split(folder: Path, dense_file: str, layout: Sequence[dict], features: Sequence[str]) -> dict:
    """Write the two parts of ``folder/dense_file`` split by ``features`` next to it; returns the manifest entry
    (``dense.context_split``), once both parts have scored random inputs as the whole network does (1e-5). Also
    ``dense_flat.onnx``, the two parts in one model, where it gives their floats (``flat`` in the entry; optional).

    The split layer is the network's one matrix product of its input by a weight matrix: ``MatMul(embeddings, W)``
    (an MLP's first layer) or ``Gemm(embeddings, W, b)`` (torch's Linear; a DCN's first cross layer). Other nodes
    may read the input too (a cross network multiplies by it): the rest part then takes the whole input as well,
    and only that product is computed once a request. Anything else is refused with the reason."""
    import onnx
    from onnx import helper, numpy_helper

    context, own = context_columns(layout, features)
    model = onnx.load(str(folder / dense_file))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise UembedError(f"context split: {dense_file} takes {len(inputs)} inputs; a split needs one (the embeddings)")
    (graph_input,) = inputs
    if graph_input.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UembedError(f"context split: {dense_file}'s input is not float32")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node for a in node.attribute):
        raise UembedError(f"context split: {dense_file} has subgraphs (If, Loop, Scan), which the split does not follow")
    consumers = [node for node in graph.node if graph_input.name in node.input]
    reasons = [_linear_refusal(node, graph_input.name, weights) for node in consumers]
    linear = [node for node, reason in zip(consumers, reasons) if reason is None]
    if len(linear) > 1:
        names = ", ".join(f"{node.op_type} {node.name!r}" for node in linear)
        raise UembedError(f"context split: {dense_file} multiplies its input by {len(linear)} weight matrices ({names}); "
                          "the split takes one")  # fmt: skip
    if not linear:
        found = "; ".join(f"{node.op_type} {node.name!r}: {reason}" for node, reason in zip(consumers, reasons)) or "nothing"
        raise UembedError(f"context split: {dense_file} must multiply its input by a weight matrix (MatMul, or Gemm "
                          f"with alpha 1, beta 1, the input not transposed); its input feeds {found}")  # fmt: skip
    (first,) = linear
    if any(first.input[1] in node.input for node in graph.node if node is not first):
        raise UembedError(f"context split: {dense_file}'s weight {first.input[1]} is used by other nodes too")
    matrix = numpy_helper.to_array(weights[first.input[1]])
    if first.op_type == "Gemm" and _attributes(first).get("transB", 0):
        matrix = matrix.T
    if matrix.shape[0] != len(context) + len(own):
        raise UembedError(f"context split: the weight matrix is {matrix.shape}, the input has {len(context) + len(own)} columns")
    width = matrix.shape[1]
    biased = len(first.input) > 2 and bool(first.input[2])
    product = "uembed_first_product" if biased else first.output[0]
    cuts = {name: _column_cuts(graph_input.name, name, columns) for name, columns in ((CONTEXT_INPUT, context), (OWN_INPUT, own))}
    added = {CONTEXT_INPUT, OWN_INPUT, PARTIAL, "uembed_w_context", "uembed_w_own", "uembed_own_partial", "uembed_first_product",
             *(t.name for nodes, constants in cuts.values() for t in constants),
             *(name for nodes, _ in cuts.values() for node in nodes for name in node.output)}  # fmt: skip
    taken = {name for node in graph.node for name in (*node.input, *node.output)} | set(weights) | {graph_input.name}
    if added & taken:
        raise UembedError(f"context split: {dense_file} already has tensors named {', '.join(sorted(added & taken))}")
    opsets = list(model.opset_import)

    def save(nodes, part_inputs, outputs, initialisers, name, file):
        part = helper.make_model(helper.make_graph(nodes, name, part_inputs, outputs, initialisers), opset_imports=opsets,
                                 producer_name="uembed-context-split", functions=list(model.functions))  # fmt: skip
        part.ir_version = model.ir_version
        try:
            onnx.checker.check_model(part)
        except onnx.checker.ValidationError as exc:
            raise UembedError(f"context split: the {name} part of {dense_file} is not a valid model: {exc}") from exc
        onnx.save(part, str(folder / file))

    float_input = lambda name, columns: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", columns])  # noqa: E731
    context_nodes = [helper.make_node("MatMul", [CONTEXT_INPUT, "uembed_w_context"], [PARTIAL])]
    context_weight = numpy_helper.from_array(np.ascontiguousarray(matrix[context]), "uembed_w_context")
    save(context_nodes, [float_input(CONTEXT_INPUT, len(context))], [float_input(PARTIAL, width)], [context_weight],
         "dense_context", CONTEXT_FILE)  # fmt: skip
    rest_nodes = [helper.make_node("MatMul", [OWN_INPUT, "uembed_w_own"], ["uembed_own_partial"]),
                  helper.make_node("Add", ["uembed_own_partial", PARTIAL], [product])]  # fmt: skip
    if biased:  # Gemm's bias, added after the product
        rest_nodes.append(helper.make_node("Add", [product, first.input[2]], [first.output[0]]))
    rest_nodes += [node for node in graph.node if node is not first]
    kept = [t for t in graph.initializer if t.name != first.input[1]]
    takes_input = any(graph_input.name in node.input for node in graph.node if node is not first)
    rest_inputs = [float_input(OWN_INPUT, len(own)), float_input(PARTIAL, width)] + ([graph_input] if takes_input else [])
    rest_initialisers = [*kept, numpy_helper.from_array(np.ascontiguousarray(matrix[own]), "uembed_w_own")]
    # Both parts in one model for flat batches: the input's columns cut into the parts' inputs, then the parts' nodes.
    cut_nodes = [node for nodes, _ in cuts.values() for node in nodes]
    cut_constants = [t for _, constants in cuts.values() for t in constants]
    try:
        save(rest_nodes, rest_inputs, list(graph.output), rest_initialisers, "dense_rest", REST_FILE)
        _check_parts(folder, dense_file, graph_input.name, context, own, takes_input)
    except BaseException:
        for file in (CONTEXT_FILE, REST_FILE):  # no half-written split beside the network
            (folder / file).unlink(missing_ok=True)
        raise
    entry = {"features": list(dict.fromkeys(features)), "width": int(width), "of": file_entry(folder, dense_file)["sha256"],
             "context": file_entry(folder, CONTEXT_FILE), "rest": file_entry(folder, REST_FILE)}  # fmt: skip
    # Both parts in one model for flat batches: the input's columns cut into the parts' inputs, then the parts' nodes.
    # An optional file: where it cannot be written or scores otherwise than the parts, the export goes on without it.
    cut_nodes = [node for nodes, _ in cuts.values() for node in nodes]
    cut_constants = [t for _, constants in cuts.values() for t in constants]
    try:
        save([*cut_nodes, *context_nodes, *rest_nodes], [graph_input], list(graph.output),
             [*cut_constants, context_weight, *rest_initialisers], "dense_flat", FLAT_FILE)  # fmt: skip
        refused = None if _flat_gives_parts_floats(folder, graph_input.name, context, own, takes_input) else (
            "it scores random inputs other than the two parts do")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - ONNX's checker, ONNX Runtime: the parts stand without it
        refused = str(exc)
    except BaseException:
        (folder / FLAT_FILE).unlink(missing_ok=True)
        raise
    if refused is None:
        entry["flat"] = file_entry(folder, FLAT_FILE)
    else:  # flat batches then run the two parts
        log.warning("context split: not writing %s, %s's parts in one model: %s", FLAT_FILE, dense_file, refused)
        (folder / FLAT_FILE).unlink(missing_ok=True)
    return entry


def _column_cuts(source: str, name: str, columns: np.ndarray) -> tuple[list, list]:
    """Nodes that cut ``columns`` (sorted) of the flat model's input ``source`` into the tensor ``name``: a Slice a run of
    consecutive columns, then one Concat (the columns' copies by runs, cheaper than a Gather along the column axis),
    and their constants."""
    from onnx import helper, numpy_helper

    breaks = np.flatnonzero(np.diff(columns) != 1) + 1
    nodes, constants, pieces = [], [], []
    for run, (first, stop) in enumerate(zip(np.concatenate(([0], breaks)), np.concatenate((breaks, [len(columns)])))):
        bounds = [f"uembed_{name}_{edge}_{run}" for edge in ("start", "stop", "axis")]
        values = (int(columns[first]), int(columns[stop - 1]) + 1, 1)
        constants += [numpy_helper.from_array(np.array([value], dtype=np.int64), bound) for bound, value in zip(bounds, values)]
        pieces.append(f"uembed_{name}_run_{run}")
        nodes.append(helper.make_node("Slice", [source, *bounds], [pieces[-1]]))
    nodes.append(helper.make_node("Concat", pieces, [name], axis=1))
    return nodes, constants


def _check_parts(folder: Path, dense_file: str, input_name: str, context: np.ndarray, own: np.ndarray, takes_input: bool) -> None:
    """Score random inputs through the two parts and through the whole network: the same scores up to rounding."""
    import onnxruntime as ort

    session = lambda file: ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])  # noqa: E731
    embeddings = np.random.default_rng(0).standard_normal((64, len(context) + len(own))).astype(np.float32)
    try:
        whole = session(dense_file).run(None, {input_name: embeddings})[0]
        parts = _parts_scores(folder, input_name, context, own, takes_input, embeddings)
    except Exception as exc:  # ONNX Runtime's own errors (a fixed batch size, an op it cannot run)
        raise UembedError(f"context split: ONNX Runtime could not score {dense_file}'s parts: {exc}") from exc
    worst = float(np.abs(parts - whole).max())
    if not worst <= 1e-5:
        raise UembedError(f"context split: the two parts score random inputs up to {worst:.2g} away from {dense_file}")


def _parts_scores(folder: Path, input_name: str, context: np.ndarray, own: np.ndarray, takes_input: bool,
                  embeddings: np.ndarray) -> np.ndarray:  # fmt: skip
    import onnxruntime as ort

    session = lambda file: ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])  # noqa: E731
    partial = session(CONTEXT_FILE).run(None, {CONTEXT_INPUT: embeddings[:, context]})[0]
    feeds = {OWN_INPUT: embeddings[:, own], PARTIAL: partial} | ({input_name: embeddings} if takes_input else {})
    return session(REST_FILE).run(None, feeds)[0]


def _flat_gives_parts_floats(folder: Path, input_name: str, context: np.ndarray, own: np.ndarray, takes_input: bool) -> bool:
    """Whether the parts in one model (``FLAT_FILE``) score random inputs with the two parts' very floats."""
    import onnxruntime as ort

    embeddings = np.random.default_rng(1).standard_normal((64, len(context) + len(own))).astype(np.float32)
    flat = ort.InferenceSession(str(folder / FLAT_FILE), providers=["CPUExecutionProvider"]).run(None, {input_name: embeddings})[0]
    return bool(np.array_equal(flat, _parts_scores(folder, input_name, context, own, takes_input, embeddings)))


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _linear_refusal(node, input_name: str, weights: dict) -> str | None:
    """Why ``node`` is not a product of ``input_name`` by a weight matrix the split can cut; None if it is one."""
    from onnx import numpy_helper

    if node.op_type not in ("MatMul", "Gemm"):
        return "not a matrix product"
    if list(node.input[:1]) != [input_name]:
        return "the input is its second operand"
    if node.input[1] not in weights or numpy_helper.to_array(weights[node.input[1]]).ndim != 2:
        return "its weight is not a 2-D initializer"
    if node.op_type == "Gemm":
        attributes = _attributes(node)
        if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0 or attributes.get("transA", 0):
            return "a Gemm with alpha or beta other than 1, or the input transposed"
        if len(node.input) > 2 and node.input[2] and node.input[2] not in weights:
            return "a Gemm whose bias is not an initializer"
    return None
