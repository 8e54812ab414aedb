"""What computing a ranking request's context half of the first dense layer once would save, in process.

    .venv/bin/python scripts/context-factored-dense.py scale-work/criteo-scale/1

The service scores a ranking request's candidates with the bundle's whole dense network, every candidate's
first layer over all 416 inputs, so the scores are the flat form's floats exactly (issue #13 asks for identical
scores). The alternative measured here: the first layer's context rows (the inputs of the context's slots)
multiplied once per request, ``x_ctx @ W_ctx + b``, and only the candidates' own inputs per candidate,
``relu(x_own @ W_own + that)``; the rest of the network as before. Both run on ONNX Runtime, one thread. The
scores then differ from the flat form's in the last bits (the sums are taken in another order): the script
prints by how much. Needs the ``onnx`` package (the train extra) and a bundle whose dense network is a
MatMul/Add/Relu MLP, as synthetic bundles have. Not used by the service: a measurement for deciding whether
bitwise parity is worth this much.
"""

import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from loadtest.scale_bench import request_bodies
from service.engine import ScoringEngine
from service.settings import load_settings


def best_ms(work, repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def factored_session(model: onnx.ModelProto, own_columns: np.ndarray) -> ort.InferenceSession:
    """The bundle's network with its first MatMul taking only ``own_columns`` of the input, and its first Add
    taking a per-request row (the context's half and the bias) instead of the bias."""
    graph = model.graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    first_matmul, first_add = graph.node[0], graph.node[1]
    if first_matmul.op_type != "MatMul" or first_add.op_type != "Add":
        raise SystemExit("this script needs a dense network that starts MatMul, Add (a synthetic bundle's MLP)")
    w_own = numpy_helper.from_array(weights[first_matmul.input[1]][own_columns], "w_own")
    nodes = [helper.make_node("MatMul", ["own", "w_own"], [first_matmul.output[0]]),
             helper.make_node("Add", [first_matmul.output[0], "context_row"], [first_add.output[0]]),
             *graph.node[2:]]  # fmt: skip
    used = {name for node in nodes for name in node.input}
    initializers = [w_own] + [i for i in graph.initializer if i.name in used and i.name != "w_own"]
    out_dim = weights[first_matmul.input[1]].shape[1]
    inputs = [helper.make_tensor_value_info("own", onnx.TensorProto.FLOAT, ["batch", len(own_columns)]),
              helper.make_tensor_value_info("context_row", onnx.TensorProto.FLOAT, [1, out_dim])]  # fmt: skip
    factored = helper.make_model(helper.make_graph(nodes, "factored", inputs, list(graph.output), initializers),
                                 opset_imports=model.opset_import, ir_version=model.ir_version)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(factored.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(bundle: str) -> None:
    runtime = ScoringEngine(load_settings(max_examples=1024)).open(bundle)
    model = onnx.load(f"{bundle}/dense.onnx")
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w0, b0 = weights[model.graph.node[0].input[1]], weights[model.graph.node[1].input[1]]
    bodies = [json.loads(b) for b in request_bodies(1.05, 500, 64, 20)["ranking"]]
    dim = runtime.plan.dim
    figures = {"whole network": [], "context half once": [], "assemble, every slot": [], "assemble, own slots": []}
    differences = []
    session = None
    for body in bodies:
        split = runtime.hash_split([runtime.canonicalise(body["candidates"], context=body["context"])])
        rows, own_positions, context_positions = runtime.lookup_split(split)
        embeddings = runtime.assemble_split(split, rows, own_positions, context_positions)
        # assembly too: the candidates' own rows only, against every slot's (the context's repeated 500 times)
        figures["assemble, every slot"].append(best_ms(lambda: runtime.assemble_split(split, rows, own_positions, context_positions)))
        figures["assemble, own slots"].append(best_ms(lambda: np.take(rows, own_positions, axis=0)))
        own_columns = (split.slots[:, None] * dim + np.arange(dim)).ravel()
        context_columns = (split.context_slots[:, None] * dim + np.arange(dim)).ravel()
        if session is None:
            session, session_columns = factored_session(model, own_columns), own_columns
        assert np.array_equal(own_columns, session_columns), "every request must split its features the same way"
        own = np.ascontiguousarray(embeddings[:, own_columns])  # what assemble would write instead: own slots only
        context = embeddings[:1, context_columns]

        def factored():
            row = (context @ w0[context_columns] + b0).astype(np.float32)
            return session.run(None, {"own": own, "context_row": row})[0]

        whole = runtime.dense(embeddings)
        differences.append(float(np.abs(factored().reshape(-1) - whole.reshape(-1)).max()))
        figures["whole network"].append(best_ms(lambda: runtime.dense(embeddings)))
        figures["context half once"].append(best_ms(factored))
    out = {name: round(float(np.median(values)), 3) for name, values in figures.items()}
    out["saved_ms_a_request"] = round(out["whole network"] - out["context half once"]
                                      + out["assemble, every slot"] - out["assemble, own slots"], 3)
    out["max_abs_score_difference"] = max(differences)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
