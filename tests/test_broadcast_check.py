"""A site refuses a broadcast it must not train on (``SitePrivacy.incoming``): other keys than its shared ones, other
shapes, non-numeric dtypes, NaN or Inf, in clear or after decrypting the encrypted sum; the error names the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedoap.networks import FedOAPNet
from fedoap.privacy.he import create_contexts, encrypt_update, load_context, to_params
from fedoap.site.broadcast_check import check_broadcast, expected_shapes
from fedoap.site.privacy import SitePrivacy


@pytest.fixture(scope="module")
def shared():
    torch.manual_seed(0)
    return FedOAPNet(channels=[4, 8, 8, 16], bottleneck_channels=16).shared_state_dict()


@pytest.fixture(scope="module")
def client_context(tmp_path_factory):
    _, client = create_contexts()
    path = tmp_path_factory.mktemp("keys") / "client"
    path.write_bytes(client)
    return load_context(path)


def _poisoned(shared, change):
    key = sorted(shared)[0]
    params = {k: v.clone() for k, v in shared.items()}
    return key, change(params, key)


CASES = {
    "NaN": (lambda p, k: {**p, k: torch.full_like(p[k], float("nan"))}, "contains NaN or Inf"),
    "Inf": (lambda p, k: {**p, k: p[k].index_fill(0, torch.tensor([0]), float("inf"))}, "contains NaN or Inf"),
    "an unexpected key": (lambda p, k: {**p, "head.conv.weight": torch.zeros(1)}, "does not share, e.g. 'head.conv"),
    "a missing key": (lambda p, k: {key: v for key, v in p.items() if key != k}, "lacks 1 shared key"),
    "a wrong shape": (lambda p, k: {**p, k: torch.zeros(3, 3)}, r"has shape \(3, 3\), this site.s is"),
    "a string": (lambda p, k: {**p, k: "0.0"}, "is a str, not a tensor"),
    "a list": (lambda p, k: {**p, k: p[k].tolist()}, "is a list, not a tensor"),
    "a text array": (lambda p, k: {**p, k: np.array(["a"])}, "not real numbers"),
    "a bool tensor": (lambda p, k: {**p, k: torch.ones_like(p[k], dtype=torch.bool)}, "not dense real numbers"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_poisoned_plaintext_broadcast_is_refused_naming_the_key(case, shared):
    change, message = CASES[case]
    key, poisoned = _poisoned(shared, change)
    privacy = SitePrivacy(expected=shared)
    with pytest.raises(ValueError, match=message) as err:
        privacy.incoming(poisoned)
    if case not in ("an unexpected key", "a missing key"):
        assert repr(key) in str(err.value)
    assert set(privacy.incoming(shared)) == set(shared)  # the honest broadcast passes


def test_without_expected_shapes_types_and_values_are_still_checked(shared):
    key, poisoned = _poisoned(shared, CASES["NaN"][0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        SitePrivacy().incoming(poisoned)
    assert SitePrivacy().incoming({**shared, "anything": torch.zeros(2)})  # no shapes to compare with
    privacy = SitePrivacy()
    privacy.expect(shared)  # what session.py's one line does, once the trainer exists
    with pytest.raises(ValueError, match="does not share"):
        privacy.incoming({**shared, "anything": torch.zeros(2)})
    with pytest.raises(ValueError, match="must be a dict"):
        privacy.incoming([1, 2])
    assert SitePrivacy(expected={}).incoming({}) == {}  # a method that shares nothing: the empty broadcast


def test_an_encrypted_broadcast_is_checked_after_decryption(shared, client_context):
    privacy = SitePrivacy(he_context=client_context, expected=shared)
    honest = to_params(encrypt_update(shared, 3.0, client_context))
    clear = privacy.incoming(honest)
    key = sorted(shared)[0]
    assert set(clear) == set(shared) and np.allclose(clear[key], shared[key].numpy(), atol=1e-2)
    other = {k: (torch.zeros(2, 2) if k == key else v) for k, v in shared.items()}  # a layout of other shapes
    with pytest.raises(ValueError, match=f"{key!r} has shape \\(2, 2\\)"):
        privacy.incoming(to_params(encrypt_update(other, 3.0, client_context)))
    fewer = {k: v for k, v in shared.items() if k != key}
    with pytest.raises(ValueError, match="lacks 1 shared key"):
        privacy.incoming(to_params(encrypt_update(fewer, 3.0, client_context)))


def test_check_broadcast_alone():
    expected = expected_shapes({"w": torch.zeros(2, 3), "b": np.zeros(2)})
    assert expected == {"w": (2, 3), "b": (2,)}
    check_broadcast({"w": np.zeros((2, 3), np.float16), "b": torch.zeros(2, dtype=torch.int64)}, expected)
    with pytest.raises(ValueError, match="'b' has dtype complex128"):
        check_broadcast({"w": np.zeros((2, 3)), "b": np.zeros(2, complex)}, expected)
