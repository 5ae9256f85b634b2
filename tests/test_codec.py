"""The log-prob codecs on known values: exact codes and decoded numbers, not a tolerance.

The expected numbers are written out by hand from the formulas in docs/shard-format.md
(``code = round(255 * p ** (1/3))``, ``logp = 3 * ln(code / 255)``), so a codec that
drifts from its documented formula (a 254 for a 255, a square root for a cube root) fails
here even when its KL to the exact distribution would still look small.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from distillcache.shared.codec import (
    canonical_topk,
    codec_kl_estimate,
    decode_logprobs,
    encode_logprobs,
)

# code -> 3 * ln(code / 255), and code 0 -> 3 * ln(0.25 / 255), computed in float64.
CBRT_DECODED = {
    255: 0.0,
    254: -0.011787834419668651,
    202: -0.6989875432716643,
    128: -2.067699843716427,
    1: -16.623790635475277,
    0: -20.78267371883495,
}

# p -> round(255 * p ** (1/3)): 0.9 -> 246.2, 0.5 -> 202.39, 0.3 -> 170.71, 1e-6 -> 2.55,
# 1e-9 -> 0.255.
CBRT_ENCODED = {1.0: 255, 0.9: 246, 0.5: 202, 0.3: 171, 1e-6: 3, 1e-9: 0}


def test_cbrt_u8_decodes_known_codes_to_their_formula_values():
    codes = np.array(list(CBRT_DECODED), dtype=np.uint8)
    got = decode_logprobs(codes, "cbrt-u8")
    assert got.dtype == np.float32
    want = np.array(list(CBRT_DECODED.values()), dtype=np.float32)
    np.testing.assert_array_equal(got, want)


def test_cbrt_u8_encodes_known_probabilities_to_their_codes():
    lps = np.log(np.array(list(CBRT_ENCODED), dtype=np.float64)).astype(np.float32)
    got = encode_logprobs(lps, "cbrt-u8")
    assert got.dtype == np.uint8
    assert got.tolist() == list(CBRT_ENCODED.values())


def test_cbrt_u8_every_code_survives_decode_then_encode():
    codes = np.arange(1, 256, dtype=np.uint8)
    assert np.array_equal(encode_logprobs(decode_logprobs(codes, "cbrt-u8"), "cbrt-u8"), codes)


def test_cbrt_u8_decoded_probability_is_within_half_a_step_of_the_input():
    # |p^(1/3) - code/255| <= 0.5/255 for every p the code can represent.
    p = np.geomspace(1e-8, 1.0, 2001)
    code = encode_logprobs(np.log(p).astype(np.float32), "cbrt-u8").astype(np.float64)
    assert np.all(np.abs(np.cbrt(p) - code / 255) <= 0.5 / 255 + 1e-6)


@pytest.mark.parametrize("codec", ["float16", "float32"])
def test_float_codecs_keep_representable_values_bit_for_bit(codec):
    values = np.array([0.0, -0.5, -2.0, -10.25, -0.0009765625, -65504.0], dtype=np.float32)
    stored = encode_logprobs(values, codec)
    assert stored.dtype == np.dtype(codec)
    np.testing.assert_array_equal(decode_logprobs(stored, codec), values)


def test_float32_codec_is_exact_for_arbitrary_values():
    values = np.array([-math.pi, -1e-30, -123.456789], dtype=np.float32)
    assert decode_logprobs(encode_logprobs(values, "float32"), "float32").tobytes() == (
        values.tobytes()
    )


def test_canonical_order_sorts_ids_and_carries_each_value_with_its_id():
    ids = np.array([[7, 3, 500_000, 0]], dtype=np.int32)
    codes = np.array([[10, 200, 255, 1]], dtype=np.uint8)
    got_ids, got_codes = canonical_topk(ids, codes)
    assert got_ids.tolist() == [[0, 3, 7, 500_000]]
    assert got_codes.tolist() == [[1, 200, 10, 255]]
    floats = np.array([[-0.25, -1.5, -3.0, -7.0]], dtype=np.float32)
    got_ids, got_floats = canonical_topk(ids, floats)
    assert got_ids.tolist() == [[0, 3, 7, 500_000]]
    assert got_floats.tolist() == [[-7.0, -1.5, -0.25, -3.0]]


@pytest.mark.parametrize("codec", ["cbrt-u8", "float16"])
def test_the_codec_kl_estimate_agrees_with_the_kl_measured_on_exact_values(codec):
    rng = np.random.default_rng(4)
    logits = rng.standard_t(df=2, size=(4000, 300)) * 2.5
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    exact = -np.sort(-logprobs, axis=1)[:, :32]
    decoded = decode_logprobs(encode_logprobs(exact.astype(np.float32), codec), codec)
    log_p = exact - np.logaddexp.reduce(exact, axis=1, keepdims=True)
    d = decoded.astype(np.float64)
    log_q = d - np.logaddexp.reduce(d, axis=1, keepdims=True)
    measured = np.sum(np.exp(log_p) * (log_p - log_q), axis=1).mean()
    estimated = codec_kl_estimate(decoded, codec).mean()
    assert measured > 0
    assert 0.8 < estimated / measured < 1.25, (estimated, measured)
    assert codec_kl_estimate(exact, "float32").max() == 0
