"""The dense network's first layer split in two by feature group: the context's columns and the others'.

A ranking request's candidates share its context (the user's features), so the context's part of the first layer,
``context_embeddings @ W_context``, is the same for every candidate. A bundle exported with a context split carries
the dense network as two ONNX models that compute it that way for every request, flat or ranking::

    dense_context.onnx   context_embeddings [batch, E_c] -> context_partial [batch, H]     (MatMul by W's context rows)
    dense_rest.onnx      own_embeddings [batch, E_o], context_partial [batch, H] -> probability [batch]
                         (MatMul by W's other rows, plus context_partial, then the rest of dense.onnx unchanged)

A flat request runs both on every example. A ranking request whose context is the split's feature group runs the
first once a request and the second on its candidates, with the partial repeated to each: the same floats as the
flat form, because each output row of a matrix product depends on its input row alone (tested). The two parts sum
the first layer in another order than ``dense.onnx``: their scores differ from its by float rounding (about 1e-7),
and ``dense.onnx`` stays in the bundle for the other runtimes (CUDA, the export check's torch comparison).

Needs ``onnx`` (the train extra): run at export time, never by the service.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.format import file_entry
from model.errors import UembedError

CONTEXT_FILE, REST_FILE = "dense_context.onnx", "dense_rest.onnx"
CONTEXT_INPUT, OWN_INPUT, PARTIAL = "context_embeddings", "own_embeddings", "context_partial"


def context_columns(layout: Sequence[dict], features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the dense network's input that ``features`` fill, and the others', each in input order."""
    unknown = set(features) - {entry["feature"] for entry in layout}
    if unknown:
        raise UembedError(f"context split: {', '.join(sorted(unknown))} not among the model's features")
    chosen = set(features)
    context = [np.arange(e["start"], e["stop"]) for e in layout if e["feature"] in chosen]
    own = [np.arange(e["start"], e["stop"]) for e in layout if e["feature"] not in chosen]
    if not context or not own:
        raise UembedError("context split: the context must leave some features to the candidates, and take some")
    return np.sort(np.concatenate(context)), np.sort(np.concatenate(own))


def write_context_split(folder: Path, dense_file: str, layout: Sequence[dict], features: Sequence[str]) -> dict:
    """Write the two parts of ``folder/dense_file`` split by ``features`` next to it; returns the manifest entry
    (``dense.context_split``).

    The split layer is the network's one matrix product of its input by a weight matrix: ``MatMul(embeddings, W)``
    (an MLP's first layer) or ``Gemm(embeddings, W, b)`` (torch's Linear; a DCN's first cross layer). Other nodes
    may read the input too (a cross network multiplies by it): the rest part then takes the whole input as well,
    and only that product is computed once a request. Anything else is refused with the reason."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / dense_file))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    (graph_input,) = [i for i in graph.input if i.name not in weights]
    consumers = [node for node in graph.node if graph_input.name in node.input]
    linear = [node for node in consumers if _linear_weight(node, graph_input.name, weights) is not None]
    if len(linear) != 1:
        raise UembedError(
            f"context split: {dense_file} must multiply its input by one weight matrix (MatMul, or Gemm with alpha 1, "
            f"beta 1 and the input not transposed); its input feeds {', '.join(n.op_type for n in consumers) or 'nothing'}"
        )
    (first,) = linear
    matrix = _linear_weight(first, graph_input.name, weights)
    context, own = context_columns(layout, features)
    if matrix.shape[0] != len(context) + len(own):
        raise UembedError(f"context split: the weight matrix is {matrix.shape}, the input has {len(context) + len(own)} columns")
    width = matrix.shape[1]
    opsets = list(model.opset_import)

    def save(nodes, inputs, outputs, initialisers, name, file):
        part = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initialisers), opset_imports=opsets,
                                 producer_name="uembed-context-split")  # fmt: skip
        part.ir_version = model.ir_version
        onnx.checker.check_model(part)
        onnx.save(part, str(folder / file))

    float_input = lambda name, columns: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", columns])  # noqa: E731
    save([helper.make_node("MatMul", [CONTEXT_INPUT, "w_context"], [PARTIAL])], [float_input(CONTEXT_INPUT, len(context))],
         [float_input(PARTIAL, width)], [numpy_helper.from_array(np.ascontiguousarray(matrix[context]), "w_context")],
         "dense_context", CONTEXT_FILE)  # fmt: skip
    biased = len(first.input) > 2 and bool(first.input[2])
    product = "first_layer_product" if biased else first.output[0]
    rest_nodes = [helper.make_node("MatMul", [OWN_INPUT, "w_own"], ["own_partial"]),
                  helper.make_node("Add", ["own_partial", PARTIAL], [product])]  # fmt: skip
    if biased:  # Gemm's bias, added after the product
        rest_nodes.append(helper.make_node("Add", [product, first.input[2]], [first.output[0]]))
    rest_nodes += [node for node in graph.node if node is not first]
    kept = [t for t in graph.initializer if t.name != first.input[1]]
    takes_input = any(graph_input.name in node.input for node in graph.node if node is not first)
    inputs = [float_input(OWN_INPUT, len(own)), float_input(PARTIAL, width)] + ([graph_input] if takes_input else [])
    save(rest_nodes, inputs, list(graph.output), [*kept, numpy_helper.from_array(np.ascontiguousarray(matrix[own]), "w_own")],
         "dense_rest", REST_FILE)  # fmt: skip
    return {"features": list(features), "width": int(width), "rest_takes_embeddings": takes_input,
            "context": file_entry(folder, CONTEXT_FILE), "rest": file_entry(folder, REST_FILE)}  # fmt: skip


def _linear_weight(node, input_name: str, weights: dict) -> np.ndarray | None:
    """The [inputs, outputs] matrix ``node`` multiplies ``input_name`` by, if it is such a product; else None."""
    from onnx import helper, numpy_helper

    if node.op_type not in ("MatMul", "Gemm") or list(node.input[:1]) != [input_name] or node.input[1] not in weights:
        return None
    matrix = numpy_helper.to_array(weights[node.input[1]])
    if node.op_type == "Gemm":
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0 or attributes.get("transA", 0):
            return None
        if len(node.input) > 2 and node.input[2] and node.input[2] not in weights:
            return None
        matrix = matrix.T if attributes.get("transB", 0) else matrix
    return matrix if matrix.ndim == 2 else None
