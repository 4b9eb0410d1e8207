"""What keeper refuses before contacting anything (S10)."""

from __future__ import annotations

import pytest

from rbee.errors import RbeeError

from rbee_keeper.validation import (
    validate_address,
    validate_backend,
    validate_device,
    validate_hive_address,
    validate_sampling,
)


def sampling(**kw):
    return validate_sampling(**{"prompt": "hi", "max_tokens": "8", **kw})


def test_accepts_a_full_set_of_knobs():
    args = sampling(temperature="0.7", top_p="0.9", top_k="40", seed="1", stop=["\n"], raw_prompt=True)
    assert (args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed) == (8, 0.7, 0.9, 40, 1)
    assert args.stop == ("\n",) and args.raw_prompt


@pytest.mark.parametrize(
    "kw, option",
    [
        ({"max_tokens": "0"}, "--max-tokens"),
        ({"max_tokens": "-3"}, "--max-tokens"),
        ({"max_tokens": "ten"}, "--max-tokens"),
        ({"max_tokens": "2147483648"}, "--max-tokens"),
        ({"temperature": "-0.1"}, "--temperature"),
        ({"temperature": "2.5"}, "--temperature"),
        ({"temperature": "nan"}, "--temperature"),
        ({"temperature": "warm"}, "--temperature"),
        ({"top_p": "0"}, "--top-p"),
        ({"top_p": "1.01"}, "--top-p"),
        ({"top_k": "0"}, "--top-k"),
        ({"seed": "-1"}, "--seed"),
        ({"prompt": "   "}, "--prompt"),
        ({"prompt": None}, "--prompt"),
    ],
)
def test_bad_sampling_values_name_the_option(kw, option):
    with pytest.raises(RbeeError) as caught:
        sampling(**kw)
    err = caught.value
    assert err.code == "INVALID_ARGUMENT"
    assert err.details["option"] == option
    assert option in err.message and err.suggestions


def test_temperature_bounds_are_inclusive():
    assert sampling(temperature="0").temperature == 0.0
    assert sampling(temperature="2").temperature == 2.0


# The one address check, as --worker and as --hive.
ADDRESS_OPTIONS = pytest.mark.parametrize(
    "validate, option, example",
    [(validate_address, "--worker", "127.0.0.1:7910"), (validate_hive_address, "--hive", "127.0.0.1:7900")],
    ids=["worker", "hive"],
)


@ADDRESS_OPTIONS
@pytest.mark.parametrize(
    "text, expected",
    [("127.0.0.1:7910", "127.0.0.1:7910"), ("localhost:80", "localhost:80"), ("[::1]:7910", "[::1]:7910"),
     (" 127.0.0.1:0065535 ", "127.0.0.1:65535"), (" localhost:07900 ", "localhost:7900")],
)  # fmt: skip
def test_addresses(validate, option, example, text, expected):
    assert validate(text) == expected


@ADDRESS_OPTIONS
@pytest.mark.parametrize(
    "text",
    ["127.0.0.1", "127.0.0.1:", ":7910", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http", "::1:7910", "bad host:1", "[::1:7900"],
)
def test_bad_addresses(validate, option, example, text):
    with pytest.raises(RbeeError) as caught:
        validate(text)
    err = caught.value
    assert err.code == "INVALID_ARGUMENT" and err.details == {"option": option, "value": text}
    assert err.message.startswith(f"{option} ") and err.suggestions == [f"Give the {option[2:]} as HOST:PORT, e.g. {option} {example}"]


def test_backends():
    assert validate_backend("CUDA") == "cuda" and validate_backend(None) is None
    with pytest.raises(RbeeError) as caught:
        validate_backend("rocm")
    assert caught.value.code == "INVALID_BACKEND"
    assert "cpu, cuda, metal" in caught.value.message


def test_devices():
    assert validate_device("1") == 1 and validate_device(None) is None
    for bad in ("-1", "gpu0"):
        with pytest.raises(RbeeError) as caught:
            validate_device(bad)
        assert caught.value.code == "INVALID_DEVICE"
