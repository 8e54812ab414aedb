"""BYTES tensors' framing read in one pass (``bytes_elements``) against the element-by-element reader that names the
element at fault (``checked_elements``): the same elements from any framing, the same error from a broken one; read by
the compiled extension and by Python alike."""

import random

import pytest

from uembed.contract import hashing
from uembed.contract.errors import TensorError
from uembed.serving.protocols.tensors import (
    InputTensor,
    bytes_elements,
    checked_elements,
    multivalent_rows,
    tensor_values,
    text_elements,
)


@pytest.fixture(autouse=True, params=[b for b in hashing.BACKENDS if b == "python" or hashing.compiled_available()])
def backend(request):
    """Every test on both readers: the extension's one C pass (compiled) and Python's."""
    before = hashing.hashing_backend()
    hashing.use_backend(request.param)
    yield request.param
    hashing.use_backend(before)


def framed(elements: list[bytes]) -> bytes:
    return b"".join(len(element).to_bytes(4, "little") + element for element in elements)


def random_elements(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.choice([0, 1, 3, 20])) for _ in range(rng.randrange(0, 40))]


@pytest.mark.parametrize("seed", range(20))
def test_a_framed_tensor_reads_as_its_elements_whole_or_its_first_ones(seed):
    rng = random.Random(seed)
    elements = random_elements(rng)
    data = framed(elements)
    assert bytes_elements("t", data) == elements == checked_elements("t", data)
    limit = rng.randrange(0, len(elements) + 2)
    assert bytes_elements("t", data, limit) == elements[:limit]
    assert bytes_elements("t", memoryview(data)) == elements  # REST's binary data may come as a view
    assert all(type(element) is bytes for element in bytes_elements("t", bytearray(data)))


@pytest.mark.parametrize("seed", range(20))
def test_a_broken_framing_names_the_element_the_checked_reader_names(seed):
    """Cut anywhere (a length cut off, or a length running past the end), or a length grown past the data."""
    rng = random.Random(seed)
    data = framed(random_elements(rng) + [b"last"])
    broken = [data[: rng.randrange(1, len(data))], data + b"\x01\x02", data[:-4] + (999).to_bytes(4, "little")]
    for data in broken:
        try:
            expected = checked_elements("genres", data)
        except TensorError as exc:
            with pytest.raises(TensorError) as refused:
                bytes_elements("genres", data)
            assert str(refused.value) == str(exc) and str(exc).startswith("input 'genres' element ")
        else:  # a cut on an element's boundary is a shorter tensor, not a broken one
            assert bytes_elements("genres", data) == expected


def test_an_element_not_in_utf8_is_named_by_its_index():
    data = framed([b"Comedy", b"", b"Dr\xffama", b"Crime"])
    with pytest.raises(TensorError, match=r"^input 'genres' element 2: not UTF-8 \(invalid start byte at byte 2\)$"):
        tensor_values(InputTensor("genres", "BYTES", [4], data))
    assert tensor_values(InputTensor("genres", "BYTES", [2], framed(["Comédie".encode(), b""]))) == ["Comédie", ""]


@pytest.mark.parametrize("seed", range(10))
def test_a_text_tensor_reads_as_each_element_decoded(seed):
    """ASCII text is decoded once and sliced; a length of 128 or more (a prefix byte past ASCII), or text past ASCII,
    decodes each element: the same strings either way, and a broken framing names its element."""
    rng = random.Random(seed)
    words = ["", "196", "Film-Noir", "x" * 130, "Comédie", "東京"]
    elements = [rng.choice(words[: 3 + seed % 4]).encode() for _ in range(rng.randrange(1, 30))]
    data = framed(elements)
    assert text_elements("t", data) == [element.decode() for element in elements]
    assert text_elements("t", memoryview(data)) == [element.decode() for element in elements]
    with pytest.raises(TensorError, match=r"^input 't' element \d+: "):
        text_elements("t", data + b"\x05\x00\x00\x00ab")


def test_an_n_by_w_tensor_reads_as_its_rows_without_padding():
    values = ["Comedy", "", "", "Crime", "Drama", "", "", "", "", "Film-Noir", "War", "Western"]
    assert multivalent_rows(values, 4, 3) == [["Comedy"], ["Crime", "Drama"], [], ["Film-Noir", "War", "Western"]]
    assert multivalent_rows([], 0, 3) == []
