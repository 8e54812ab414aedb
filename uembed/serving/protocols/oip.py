"""The Open Inference Protocol (KServe "v2"), apart from its transports: tensors in, columns out.

The REST routes (:mod:`~uembed.serving.protocols.oip_rest`) and the gRPC servicer
(:mod:`~uembed.serving.protocols.oip_grpc`) only translate their messages into :class:`InputTensor`
and call one :class:`InferencePlane`. The plane resolves the request to its model version once (a
routing rule's sticky feature read from the first example's tensor), checks the tensors against that
version's features, decodes them into columns of the values ``/v1/score`` would be sent, and scores
them through the same engine and batcher. So a value is checked, canonicalised and hashed by the one
encoding path (``uembed/serving/pipeline/canonical.py``, column by column) whatever the front, and
limits and errors are decided once. A tensor sent in binary goes to that path as its bytes (a ``RawColumn``), where
compiled readers make most columns' canonical bytes straight from them; its values are decoded only where a column
needs more than they check, or a routing rule or a shadow version reads them.

A model's inputs are its features, one tensor each, all of them required; its output is
``score`` (FP32, shape [N]: the click probability per example). N, the first dimension of
every input, is the batch (1 to ``max_examples``)::

    feature kind   datatypes accepted (first: the one metadata states)   shape
    categorical    BYTES (UTF-8), INT64, INT32                            [N] or [N, 1]
    numeric        FP32, FP64, INT64, INT32, BYTES (a decimal string)     [N] or [N, 1]
    multivalent    BYTES                                                  [N, W]: one value per element, "" pads
                                                                          [N]: the values joined by the feature's
                                                                               separator ("Crime|Film-Noir")

An integer id scores as its decimal string (INT64 196 is BYTES "196", as JSON 196 and "196"
are in ``/v1``). A missing value is "" in a BYTES tensor and NaN in an FP tensor (``/v1``'s
null); infinities are refused. A numeric feature compares the value it is sent with its
bucket boundaries in float64, so an FP32 value is its float32 (3.7 arrives as 3.7000000477):
send FP64 where a value may sit on a boundary.

An error about one value names the tensor and its element (``input 'price' element 0: ...``; in an
[N, W] tensor its row, ``input 'genres' row 1: ...``), not ``/v1``'s ``examples[i].feature``.

Data comes as JSON ``data`` (flat or nested row-major, at most MAX_DATA_DEPTH lists), as binary (the REST binary-data
extension, gRPC ``raw_input_contents``: little-endian, BYTES elements each a 4-byte
little-endian length and the bytes), or as gRPC typed ``contents``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from functools import partial
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import numpy as np

from uembed.contract.errors import ExampleError, TensorError
from uembed.contract.features import FeatureSpec
from uembed.contract.hashing import compiled_extension
from uembed.serving.engine import ScoringEngine
from uembed.serving.pipeline.canonical import CanonicalExamples, ExampleColumns, ValueRefused
from uembed.serving.pipeline.column_readers import RawColumn
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.protocols.tensors import (
    ACCEPTED,
    ELEMENT_TYPES,
    FIXED_SIZE,
    FLOATS,
    InputTensor,
    check_shape,
    column,
    multivalent_rows,
    tensor_values,
    value_name,
)
from uembed.serving.settings import ServiceSettings

OUTPUT = "score"
OUTPUT_DATATYPE = "FP32"
PLATFORM = "uembed"
# Exactly what is implemented of the protocol's (Triton's) extensions: server metadata lists these.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")

def columns_from_inputs(runtime: ModelRuntime, inputs: list[InputTensor], max_examples: int) -> ExampleColumns:
    """The examples that one tensor per feature holds, as columns: feature -> the value ``/v1/score`` would be sent,
    per example (what :meth:`~uembed.serving.pipeline.canonical.Canonicaliser.canonicalise_columns` takes).

    >>> columns_from_inputs(runtime, [InputTensor("user_id", "BYTES", [2], ["196", "186"]),
    ...                               InputTensor("genres", "BYTES", [2, 2], ["Comedy", "", "Crime", "Drama"]), ...], 1024)  # doctest: +SKIP
    ExampleColumns(columns={"user_id": ["196", "186"], "genres": [["Comedy"], ["Crime", "Drama"]], ...}, count=2)
    """
    compiled = compiled_extension()
    if compiled is not None:
        examples = raw_columns(compiled, feature_plan(runtime), inputs, max_examples)
        if examples is not None:
            return examples
    specs = runtime.bundle.feature_specs
    given: dict[str, InputTensor] = {}
    for tensor in inputs:
        if tensor.name not in specs:
            raise TensorError(f"input {tensor.name!r}: model {runtime.name} has no such input; its inputs are {', '.join(specs)}")
        if tensor.name in given:
            raise TensorError(f"input {tensor.name!r}: given twice")
        given[tensor.name] = tensor
    missing = [name for name in specs if name not in given]
    if missing:
        raise TensorError(f"inputs: missing features: {', '.join(missing)}; model {runtime.name} takes one tensor per feature "
                          f"({', '.join(specs)}); send \"\" (BYTES) or NaN (FP32) for a missing value")  # fmt: skip
    batch, first = None, None
    columns = {}
    for name, spec in specs.items():
        try:
            columns[name], batch, first = tensor_column(compiled, spec, given[name], batch, first, max_examples)
        except TensorError:
            decode_raw_columns(columns)  # an earlier tensor that cannot be decoded is named first, as it was read first
            raise
    return ExampleColumns(columns, batch)


# Per runtime, each feature's spec, the datatypes its tensor may have and whether it takes a list: what
# raw_columns checks a tensor against.
feature_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def feature_plan(runtime: ModelRuntime) -> dict[str, tuple[FeatureSpec, frozenset, bool]]:
    plan = feature_plans.get(runtime)
    if plan is None:
        plan = feature_plans[runtime] = {name: (spec, frozenset(ACCEPTED[spec.kind]), spec.multivalent)
                                         for name, spec in runtime.bundle.feature_specs.items()}  # fmt: skip
    return plan


def raw_columns(compiled, plan: dict[str, tuple[FeatureSpec, frozenset, bool]], inputs: list[InputTensor],
                max_examples: int) -> ExampleColumns | None:  # fmt: skip
    """The usual request's columns in one pass: one binary tensor per feature, each of an accepted datatype and
    shape, all of one batch, each with its shape's count of elements (what :func:`tensor_column` checks one call at
    a time, and where those checks pass, the same columns). None: anything else, for the checked path to read (or
    to name what is wrong)."""
    if len(inputs) != len(plan):
        return None
    given = {tensor.name: tensor for tensor in inputs}  # one given twice leaves a feature without its tensor
    columns = {}
    batch = None
    for name, (spec, accepted, multivalent) in plan.items():
        tensor = given.get(name)
        if tensor is None:
            return None
        datatype, shape, data = tensor.datatype, tensor.shape, tensor.data
        if datatype not in accepted or type(data) is list or type(shape) is not list:
            return None
        if len(shape) == 1:
            count, width = shape[0], None
        elif len(shape) == 2:
            count, width = shape
            if type(width) is not int or width < 0 or (width != 1 and not multivalent):
                return None
        else:
            return None
        # the sizes are checked before they are multiplied: a client's shape could make the product a huge object
        if type(count) is not int or count != (batch if batch is not None else count) or not 1 <= count <= max_examples:
            return None
        batch = count
        elements = count if width is None else count * width
        if datatype == "BYTES":
            if compiled.framed_count(data) != elements:
                return None
        elif len(data) != elements * FIXED_SIZE[datatype].itemsize:
            return None
        columns[name] = RawColumn(data, datatype, count, width, multivalent, partial(decoded_column, tensor, spec))
    return ExampleColumns(columns, batch)


def tensor_column(compiled, spec: FeatureSpec, tensor: InputTensor, batch: int | None, first: str | None,
                  max_examples: int) -> tuple[list | RawColumn, int, str]:  # fmt: skip
    """One feature's tensor checked and read as its column, with the request's batch size (set by its first
    tensor, named ``first``)."""
    name = spec.name
    if tensor.datatype not in ACCEPTED[spec.kind]:
        raise TensorError(f"input {name!r}: datatype {tensor.datatype!r}; feature {name} ({spec.kind.value}) "
                          f"takes {', '.join(ACCEPTED[spec.kind])}")  # fmt: skip
    check_shape(tensor, spec)
    if batch is None:
        batch, first = tensor.shape[0], name
        if not 1 <= batch <= max_examples:
            raise TensorError(f"input {name!r}: a batch of {batch} examples; a request holds 1 to {max_examples}")
    elif tensor.shape[0] != batch:
        raise TensorError(f"input {name!r}: batch size {tensor.shape[0]}, but input {first!r} has {batch}")
    elements = math.prod(tensor.shape)
    if compiled is not None and type(tensor.data) is not list and raw_count(compiled, tensor) == elements:
        # its bytes go to the canonicaliser as they are: its compiled readers take most columns without the
        # values (str, int) decoded here, which are decoded only where asked for
        width = tensor.shape[1] if len(tensor.shape) == 2 else None
        raw = RawColumn(tensor.data, tensor.datatype, batch, width, spec.multivalent, partial(decoded_column, tensor, spec))
        return raw, batch, first
    values = tensor_values(tensor)
    if len(values) != elements:
        raise TensorError(f"input {name!r}: shape {tensor.shape} holds {elements} elements, its data {len(values)}")
    return column(tensor, spec, values), batch, first


def raw_count(compiled, tensor: InputTensor) -> int:
    """How many elements a tensor's binary data holds; -1 where its framing or size is broken (its values' decoding
    then names what is wrong)."""
    if tensor.datatype == "BYTES":
        return compiled.framed_count(tensor.data)
    itemsize = FIXED_SIZE[tensor.datatype].itemsize
    return -1 if len(tensor.data) % itemsize else len(tensor.data) // itemsize


def decoded_column(tensor: InputTensor, spec: FeatureSpec) -> list:
    """A tensor's column of values as ``/v1/score`` would be sent them (for a :class:`RawColumn`, when asked for)."""
    return column(tensor, spec, tensor_values(tensor))


class FirstExample(Mapping):
    """The first example's values, each decoded from its tensor only when asked for: what a routing rule's sticky
    feature reads to choose the version, before the tensors can be checked against that version's features. A
    value that cannot be read is left out (the request then has no routing key; the version's checks name the
    tensor)."""

    def __init__(self, inputs: list[InputTensor]) -> None:
        self.tensors = {tensor.name: tensor for tensor in inputs}

    def __getitem__(self, name: str) -> object:
        tensor = self.tensors[name]
        shape = tensor.shape
        if not shape or len(shape) > 2 or any(type(d) is not int or d < 1 for d in shape) or tensor.datatype not in ELEMENT_TYPES:
            raise KeyError(name)
        width = shape[1] if len(shape) == 2 else 1
        try:
            values = tensor_values(tensor, limit=width)
        except TensorError:
            raise KeyError(name) from None
        if len(values) != width:
            raise KeyError(name)
        if tensor.datatype in FLOATS:
            values = [None if math.isnan(value) else value for value in values]
        return values[0] if width == 1 else multivalent_rows(values, 1, width)[0]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


MAX_COUNTED = 1 << 32


def elements(inputs) -> int:
    """About how many values the tensors hold, to choose where they are decoded: a shape of one or two whole
    numbers counts as their product (capped), any other shape as nothing (it is refused when the tensors are read,
    and a client's shape must not cost the loop a big product)."""
    total = 0
    for tensor in inputs:
        shape = list(tensor.shape[:3])
        if 1 <= len(shape) <= 2 and all(type(size) is int and 0 <= size < MAX_COUNTED for size in shape):
            total += math.prod(shape)
    return min(total, MAX_COUNTED)


def check_outputs(names: list[str], parameters: list[list[str]] | None = None, allowed: frozenset = frozenset()) -> None:
    """The requested outputs exist, and each asks only for ``allowed`` parameters: one the service would not act on
    (``classification``, Triton's class_count; shared memory) is refused rather than silently ignored."""
    for index, name in enumerate(names):
        if name != OUTPUT:
            raise TensorError(f"output {name!r}: no such output; the model's one output is {OUTPUT!r}")
        refused = [key for key in (parameters[index] if parameters else ()) if key not in allowed]
        if refused:
            also = f"; it takes only {', '.join(sorted(allowed))}" if allowed else ""
            raise TensorError(f"output {name!r}: parameter {refused[0]!r} is not supported{also}")


def input_shape(runtime: ModelRuntime, spec: FeatureSpec) -> list[int]:
    """The shape metadata states for a feature's tensor, the batch first: [-1, 1] for one value per example, [-1, W]
    for a list (W: its trained width; longer lists are cut to it, shorter ones padded with ""). Every input has a
    non-batch dimension, so tools that size tensors from metadata (perf_analyzer) can batch them. The model
    configuration states the same shape without the batch (``oip_config.py``)."""
    return [-1, runtime.encoder.widths[spec.name] if spec.multivalent else 1]


def server_version() -> str:
    try:
        return package_version("uembed")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class InferencePlane:
    """Liveness, readiness, metadata and inference of one engine, for every transport of the protocol.

    Errors are rows of the error table (``uembed/contract/errors.py``); each transport renders them its way.
    """

    def __init__(self, engine: ScoringEngine, settings: ServiceSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.max_examples = settings.max_examples

    @staticmethod
    def server_metadata() -> dict:
        return {"name": PLATFORM, "version": server_version(), "extensions": list(EXTENSIONS)}

    async def ready(self) -> None:
        """Returns when every model is ready: row files checked and one example through the batcher."""
        await self.engine.ready()

    def loaded(self, name: str, version: str | None) -> ModelRuntime:
        """The loaded ``version`` of ``name``, or its primary when no version is asked for (row checks aside)."""
        return self.engine.registry.find(name, version or None)

    def ready_model(self, name: str, version: str | None) -> ModelRuntime:
        """As :meth:`loaded`, and ready to score (NotReady while its row files are being checked)."""
        self.loaded(name, version)
        return self.engine.registry.runtime(name, version or None)

    def model_metadata(self, name: str, version: str | None) -> dict:
        runtime = self.loaded(name, version)
        inputs = []
        for feature, spec in runtime.bundle.feature_specs.items():
            inputs.append({"name": feature, "datatype": ACCEPTED[spec.kind][0], "shape": input_shape(runtime, spec)})
        return {"name": runtime.name, "versions": list(self.engine.registry.versions[name]), "platform": PLATFORM, "inputs": inputs,
                "outputs": [{"name": OUTPUT, "datatype": OUTPUT_DATATYPE, "shape": [-1]}]}  # fmt: skip

    async def infer(self, name: str, version: str | None, inputs: list[InputTensor],
                    values: int | None = None) -> tuple[np.ndarray, ModelRuntime]:  # fmt: skip
        """Scores (float32 [N]) of the examples the inputs hold, through the engine's batcher: by the version asked
        for, else as the model's routing rule (keyed by its sticky feature) or its primary decides. The request is
        resolved to its version once; the tensors are checked against that version's features and decoded
        straight into the columns its canonicaliser takes. ``values``: :func:`elements` of the inputs, where the
        front has counted them already."""
        self.loaded(name, version)  # an unknown model or version: 404, as the metadata routes answer it
        target = self.engine.registry.resolve(name, version or None, None, [FirstExample(inputs)], None)  # shutting down: after the tensors' checks
        values = elements(inputs) if values is None else values
        examples, canonical = await self.engine.decoded(values, self.decode, target.runtime, inputs)
        return await self.engine.score_resolved(target, examples, canonical=canonical), target.runtime

    def decode(self, runtime: ModelRuntime, inputs: list[InputTensor]) -> tuple[ExampleColumns, CanonicalExamples]:
        """The examples the tensors hold, as columns and canonicalised by ``runtime``."""
        return decode_inputs(runtime, inputs, self.max_examples)


def decode_inputs(runtime: ModelRuntime, inputs: list[InputTensor], max_examples: int) -> tuple[ExampleColumns, CanonicalExamples]:
    """The examples the tensors hold, as columns (:func:`columns_from_inputs`) and canonicalised by ``runtime``. A
    request at fault is refused for what it would be if every tensor were decoded before any value is checked: a
    tensor that cannot be decoded first (in the features' order), then the first value refused."""
    examples = columns_from_inputs(runtime, inputs, max_examples)
    try:
        return examples, runtime.encoder.canonicalise_columns(examples.columns, examples.count)
    except ExampleError as exc:
        decode_raw_columns(examples.columns)
        if not isinstance(exc, ValueRefused):
            raise
        # named as /v1 names it (examples[i].feature): named here as the tensor's
        tensor = next(tensor for tensor in inputs if tensor.name == exc.feature)
        raise TensorError(f"{value_name(tensor, exc.index)}: {exc.reason}") from None


def decode_raw_columns(columns: Mapping[str, list | RawColumn]) -> None:
    """Decode each column still in its tensor's bytes, in order, so that the first that cannot be decoded raises."""
    for read in columns.values():
        if type(read) is RawColumn:
            read.values
