"""Secure aggregation by pairwise masks (fedoap.privacy.secagg), with real cryptography.

What the design promises, checked on whole rounds: the unmasked sum is the weighted sum within the quantization step
(complete graph and k-neighbour graph), a site's masked vector alone looks uniform, sites that drop after sharing their
keys are recovered exactly, too many dropouts fail closed, replayed or swapped keys are refused by sites and server,
sites refuse unmask requests that would single out a site, and everything the server receives in a round does not
let it rebuild one site's update.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedoap.privacy.secagg import (
    CIPHERTEXT_BYTES,
    SHARE_BYTES,
    SecAggConfig,
    SecAggError,
    ServerSecAgg,
    SiteSecAgg,
    _mask_seed,
    check_message,
    dequantize,
    max_abs_value,
    neighbour_graph,
    prg,
    quantize,
    shamir_combine,
    shamir_split,
    threshold,
)

JOB = "job-7f3a"
FRAC = SecAggConfig().frac_bits
_IDENTITIES: dict[str, Ed25519PrivateKey] = {}


def identities(n: int) -> tuple[list[str], dict[str, Ed25519PrivateKey], dict[str, bytes]]:
    names = [f"site-{i:02d}" for i in range(n)]
    for name in names:
        _IDENTITIES.setdefault(name, Ed25519PrivateKey.generate())
    ids = {s: _IDENTITIES[s] for s in names}
    return names, ids, {s: k.public_key().public_bytes_raw() for s, k in ids.items()}


@dataclass
class Round:
    """One round run end to end, with everything the server received on the way."""

    names: list[str]
    values: dict[str, np.ndarray]
    sites: dict[str, SiteSecAgg]
    server: ServerSecAgg
    sent: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    total: np.ndarray | None = None
    view: dict = field(default_factory=dict)


def run_round(n: int, n_values: int = 2000, k: int = 0, drop: tuple[str, ...] = (), rnd: int = 1,
              values: dict[str, np.ndarray] | None = None, seed: int = 0, ring_bits: int = 64) -> Round:
    """A full round; the sites in ``drop`` share their keys, then never send a masked input nor answer unmask."""
    names, ids, roster = identities(n)
    config = SecAggConfig(neighbours=k, ring_bits=ring_bits)
    if values is None:
        rng = np.random.default_rng(seed)
        weights = {s: float(100 + 37 * i) for i, s in enumerate(names)}
        values = {s: weights[s] * rng.normal(0, 0.05, n_values) for s in names}
    sites = {s: SiteSecAgg(s, ids[s], roster, JOB, rnd, config) for s in names}
    server = ServerSecAgg(JOB, rnd, roster, n_values, config)
    advertised = {s: site.advertise() for s, site in sites.items()}
    relayed = server.receive_keys(advertised)
    shares = {s: site.share_keys(relayed) for s, site in sites.items()}
    routed = server.route_shares(shares)
    masked = {}
    for s in names:
        masked[s] = sites[s].masked_input(values[s], routed[s], server.survivors)
        if s not in drop:
            server.add_masked(s, masked[s])
    sent, dropped = server.unmask_request()
    reveals = {s: sites[s].unmask(sent, dropped) for s in sent}
    view = {"advertised": advertised, "shares": shares, "masked": {s: masked[s] for s in sent}, "reveals": reveals}
    total = server.finish(reveals)
    return Round(names, values, sites, server, sent, dropped, total, view)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def bit_frequencies(words: np.ndarray) -> np.ndarray:
    """How often each of the 64 bits is set."""
    bits = np.unpackbits(np.ascontiguousarray(words, dtype=np.uint64).view(np.uint8).reshape(-1, 8), axis=1)
    return bits.mean(axis=0)


def assert_looks_uniform(words: np.ndarray, against: np.ndarray) -> None:
    n = words.size
    assert abs(pearson(words.view(np.int64), against)) < 8 / np.sqrt(n)
    assert np.all(np.abs(bit_frequencies(words) - 0.5) < 8 * 0.5 / np.sqrt(n))


# ------------------------------------------------------------------------------------------------ building blocks


def test_quantize_round_trips_negative_values_and_refuses_values_beyond_the_headroom():
    values = np.array([-3.25, -1e-7, 0.0, 2.5, -1000.0, 1234.5678])
    q = quantize(values, FRAC, 10)
    assert q.dtype == np.uint64
    assert np.all(np.abs(dequantize(q, FRAC) - values) <= 2.0 ** -(FRAC + 1))
    assert np.allclose(dequantize(q.view(np.int64), FRAC), values, atol=2.0**-FRAC)
    bound = max_abs_value(FRAC, 10)
    assert bound == 2.0**62 / 2**FRAC / 10
    quantize(np.array([np.nextafter(bound, 0)]), FRAC, 10)
    with pytest.raises(SecAggError, match=re.escape(f"largest |value| allowed is below {bound:.6g}")):
        quantize(np.array([0.0, -bound]), FRAC, 10)
    with pytest.raises(SecAggError, match="NaN or infinity"):
        quantize(np.array([1.0, np.nan]), FRAC, 2)
    # the sum of n values at the bound still decodes (no wrap-around)
    near = np.full(4, -0.999 * max_abs_value(FRAC, 8))
    total = sum(quantize(near, FRAC, 8) for _ in range(8))
    assert np.allclose(dequantize(total, FRAC), 8 * near)


def test_prg_is_the_chacha20_stream_of_its_seed():
    seed = bytes(range(32))
    a, b = prg(seed, 3_000_001), prg(seed, 10)
    assert a.dtype == np.uint64 and a.size == 3_000_001 and a.flags.writeable
    assert np.array_equal(a[:10], b)
    assert not np.array_equal(prg(bytes(31) + b"\x01", 10), b)
    assert prg(seed, 0).size == 0
    with pytest.raises(ValueError, match="32 bytes"):
        prg(b"short", 4)


def test_shamir_any_t_shares_rebuild_fewer_fail_closed_and_wrong_ones_are_caught():
    secret = b"\x00\x00" + bytes(range(30))  # leading zeros survive
    holders = [1, 2, 5, 7, 9]
    shares = shamir_split(secret, 3, holders)
    assert set(shares) == set(holders) and all(len(s) == SHARE_BYTES for s in shares.values())
    for subset in ([1, 2, 5], [9, 7, 2], [1, 5, 7, 9], holders):
        assert shamir_combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(SecAggError, match="fewer than t shares"):
        shamir_combine({1: shares[1], 2: shares[2]}, 3)
    bad = dict(shares)
    bad[7] = (int.from_bytes(bad[7], "big") ^ 1).to_bytes(SHARE_BYTES, "big")
    with pytest.raises(SecAggError, match="disagree"):
        shamir_combine(bad, 3)
    assert shamir_split(secret, 3, holders) != shares  # fresh random coefficients
    with pytest.raises(ValueError, match="distinct"):
        shamir_split(secret, 2, [1, 1, 2])


def test_neighbour_graph_is_symmetric_regular_and_fixed_by_the_seed():
    sites = [f"s{i}" for i in range(12)]
    graph = neighbour_graph(sites, 4, b"a" * 32)
    assert all(len(v) == 4 and s not in v for s, v in graph.items())
    assert all(s in graph[v] for s, vs in graph.items() for v in vs)
    assert graph == neighbour_graph(list(reversed(sites)), 4, b"a" * 32)
    assert graph != neighbour_graph(sites, 4, b"b" * 32)
    complete = {s: tuple(sorted(v for v in sites if v != s)) for s in sites}
    assert neighbour_graph(sites, 0, b"") == complete == neighbour_graph(sites, 12, b"x")
    with pytest.raises(ValueError, match="even"):
        neighbour_graph(sites, 3, b"")
    with pytest.raises(ValueError, match="even"):
        SecAggConfig(neighbours=3)
    with pytest.raises(ValueError, match="frac_bits"):
        SecAggConfig(frac_bits=60)
    assert [threshold(m) for m in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]


# ------------------------------------------------------------------------------------------------------ the sum


@pytest.mark.parametrize("n, k", [(3, 0), (5, 0), (10, 4)])
def test_unmasked_sum_is_the_weighted_sum_within_the_quantization_step(n, k):
    r = run_round(n, k=k)
    expected = sum(r.values[s] for s in r.names)
    assert r.sent == r.names and r.dropped == []
    assert r.total.dtype == np.uint64
    assert np.max(np.abs(dequantize(r.total, FRAC) - expected)) <= n * 2.0 ** -(FRAC + 1) + 1e-9
    if k:
        assert all(len(r.sites[s].neighbours) == k for s in r.names)
        assert all(len(r.view["shares"][s]) == k for s in r.names)  # shares go to the k neighbours only


def test_the_32_bit_ring_sums_shares_of_a_common_scale_at_the_bytes_of_float32():
    """What a job sends by default: each site's update times its share w/S of a common scale, in Z_2^32 (4 bytes a
    value, as float32 plaintext); one dropout recovered; a value beyond the headroom is refused with the bound."""
    n, n_values = 5, 4000
    rng = np.random.default_rng(3)
    weights = {f"site-{i:02d}": float(10 + 7 * i) for i in range(n)}
    scale = sum(weights.values())
    updates = {s: rng.normal(0, 0.2, n_values) for s in weights}
    values = {s: updates[s] * weights[s] / scale for s in weights}
    r = run_round(n, n_values, values=values, drop=("site-03",), ring_bits=32)
    assert r.total.dtype == np.uint32 and r.view["masked"]["site-00"].nbytes == 4 * n_values
    survivors = [s for s in weights if s != "site-03"]
    got = dequantize(r.total, FRAC) * scale / sum(weights[s] for s in survivors)
    expected = sum(weights[s] * updates[s] for s in survivors) / sum(weights[s] for s in survivors)
    assert np.max(np.abs(got - expected)) < n * 2.0**-FRAC
    bound = max_abs_value(FRAC, 1, ring_bits=32)
    assert bound == 2.0 ** (30 - FRAC)
    q = quantize(np.array([-0.5 * bound, 1.0]), FRAC, 1, ring_bits=32)
    assert q.dtype == np.uint32 and np.allclose(dequantize(q, FRAC), [-0.5 * bound, 1.0])
    with pytest.raises(SecAggError, match=r"largest \|value\| allowed is below"):
        quantize(np.array([bound]), FRAC, 1, ring_bits=32)
    with pytest.raises(ValueError, match="ring_bits"):
        SecAggConfig(ring_bits=16)


def test_a_masked_vector_alone_looks_uniform_and_fresh_keys_change_it_every_round():
    n_values = 200_000
    structured = np.linspace(-2.0, 2.0, n_values) + np.sin(np.arange(n_values) / 50.0)
    constant = np.full(n_values, 0.75)
    values = {"site-00": structured, "site-01": constant, "site-02": structured}
    first = run_round(3, n_values, values=values, rnd=4)
    masked = first.view["masked"]
    assert_looks_uniform(masked["site-00"], structured)
    assert np.all(np.abs(bit_frequencies(masked["site-01"]) - 0.5) < 8 * 0.5 / np.sqrt(n_values))
    # the quantized input itself is far from uniform: what hides it is the mask
    assert abs(pearson(quantize(structured, FRAC, 3).view(np.int64), structured)) > 0.99
    second = run_round(3, n_values, values=values, rnd=5)
    again = second.view["masked"]["site-00"]
    assert np.mean(again == masked["site-00"]) < 1e-4
    assert abs(pearson(again.view(np.int64), masked["site-00"].view(np.int64))) < 8 / np.sqrt(n_values)
    assert first.view["advertised"]["site-00"]["s_pk"] != second.view["advertised"]["site-00"]["s_pk"]
    for r in (first, second):
        assert np.allclose(dequantize(r.total, FRAC), 2 * structured + constant, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ dropouts


@pytest.mark.parametrize("n, k, drop", [(3, 0, ("site-01",)), (5, 0, ("site-03",)), (5, 0, ("site-00", "site-04")),
                                        (10, 4, ("site-02", "site-07"))])
def test_sites_that_drop_after_sharing_keys_are_recovered_exactly(n, k, drop):
    r = run_round(n, k=k, drop=drop)
    assert r.dropped == sorted(drop) and set(r.sent) == set(r.names) - set(drop)
    expected = sum(quantize(r.values[s], FRAC, n) for s in r.sent)  # exact in the ring
    assert np.array_equal(r.total, expected)
    assert np.allclose(dequantize(r.total, FRAC), sum(r.values[s] for s in r.sent), atol=n * 2.0**-FRAC)


def test_more_dropouts_than_the_threshold_allows_fail_closed():
    names, ids, roster = identities(5)  # complete graph: t = 3, so at most 2 may drop
    sites = {s: SiteSecAgg(s, ids[s], roster, JOB, 2) for s in names}
    server = ServerSecAgg(JOB, 2, roster, 100)
    relayed = server.receive_keys({s: x.advertise() for s, x in sites.items()})
    routed = server.route_shares({s: x.share_keys(relayed) for s, x in sites.items()})
    for s in names[:2]:
        server.add_masked(s, sites[s].masked_input(np.ones(100), routed[s], server.survivors))
    sent, dropped = server.unmask_request()
    assert len(dropped) == 3
    assert "fewer than t=3" in server.unmask_problem() and "fails closed" in server.unmask_problem()
    reveals = {}
    for s in sent:
        with pytest.raises(SecAggError, match="fewer than t=3"):
            sites[s].unmask(sent, dropped)
    with pytest.raises(SecAggError, match="fewer than t=3 shares.*fails closed"):
        server.finish(reveals)


def test_a_sum_cannot_be_unmasked_with_fewer_than_t_reveals():
    names, ids, roster = identities(5)
    sites = {s: SiteSecAgg(s, ids[s], roster, JOB, 2) for s in names}
    server = ServerSecAgg(JOB, 2, roster, 50)
    relayed = server.receive_keys({s: x.advertise() for s, x in sites.items()})
    routed = server.route_shares({s: x.share_keys(relayed) for s, x in sites.items()})
    for s in names:
        server.add_masked(s, sites[s].masked_input(np.ones(50), routed[s], server.survivors))
    sent, dropped = server.unmask_request()
    reveals = {s: sites[s].unmask(sent, dropped) for s in names[:2]}  # three sites vanish before unmasking
    with pytest.raises(SecAggError, match="2 shares of the self-mask seed of site-00, fewer than t=3"):
        server.finish(reveals)
    with pytest.raises(SecAggError, match="already called"):
        server.finish(reveals)


# -------------------------------------------------------------------------------------------------- active attacks


def _fresh(n: int = 3, rnd: int = 1, job: str = JOB):
    names, ids, roster = identities(n)
    sites = {s: SiteSecAgg(s, ids[s], roster, job, rnd) for s in names}
    return names, ids, roster, sites


def test_replayed_advertisements_are_refused_by_sites_and_server():
    names, ids, roster = identities(3)
    old = SiteSecAgg("site-01", ids["site-01"], roster, JOB, 1).advertise()  # last round's keys
    other_job = SiteSecAgg("site-01", ids["site-01"], roster, "another-job", 2).advertise()
    for replay, what in ((old, "for round 1, not 2: a replayed key"), (other_job, "for job 'another-job'")):
        sites = {s: SiteSecAgg(s, ids[s], roster, JOB, 2) for s in names}
        relayed = {s: x.advertise() for s, x in sites.items()}
        relayed["site-01"] = replay
        with pytest.raises(SecAggError, match=what):
            sites["site-00"].share_keys(relayed)
        server = ServerSecAgg(JOB, 2, roster, 10)
        kept = server.receive_keys(relayed)
        assert "site-01" not in kept and what in server.rejected["site-01"]


def test_swapped_keys_are_refused_by_sites_and_server():
    names, ids, roster = identities(3)
    attacker_x25519 = X25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    attacker_identity = Ed25519PrivateKey.generate()

    def with_server_key(ads):  # the server puts its own key in site-01's place
        ads["site-01"] = {**ads["site-01"], "s_pk": attacker_x25519}

    def under_other_name(ads):  # site-02's advertisement relayed as site-01's
        ads["site-01"] = dict(ads["site-02"])

    def renamed(ads):  # site-02's keys and signature, with site-01's name written in
        ads["site-01"] = {**ads["site-02"], "site": "site-01"}

    def resigned(ads):  # the server signs its own key with its own identity
        forged = SiteSecAgg("site-01", attacker_identity, {"site-01": attacker_identity.public_key()
                                                          .public_bytes_raw()}, JOB, 1).advertise()
        ads["site-01"] = forged

    def stranger(ads):  # a site the roster does not know
        forged = SiteSecAgg("site-99", attacker_identity, {"site-99": attacker_identity.public_key()
                                                          .public_bytes_raw()}, JOB, 1).advertise()
        ads["site-99"] = forged

    cases = [(with_server_key, "site-01", "does not verify"), (under_other_name, "site-01", "signed for site"),
             (renamed, "site-01", "does not verify"), (resigned, "site-01", "does not verify"),
             (stranger, "site-99", "not in the roster")]
    for tamper, victim, why in cases:
        sites = {s: SiteSecAgg(s, ids[s], roster, JOB, 1) for s in names}
        ads = {s: x.advertise() for s, x in sites.items()}
        tamper(ads)
        with pytest.raises(SecAggError, match=why):
            sites["site-00"].share_keys(ads)
        server = ServerSecAgg(JOB, 1, roster, 10)
        kept = server.receive_keys(ads)
        assert victim not in kept and why in server.rejected[victim], tamper.__name__
    # a site's own advertisement altered on its way
    sites = {s: SiteSecAgg(s, ids[s], roster, JOB, 1) for s in names}
    ads = {s: x.advertise() for s, x in sites.items()}
    ads["site-00"] = {**ads["site-00"], "c_pk": attacker_x25519}
    with pytest.raises(SecAggError, match="own advertisement was altered"):
        sites["site-00"].share_keys(ads)
    with pytest.raises(ValueError, match="not this site's identity"):
        SiteSecAgg("site-00", attacker_identity, roster, JOB, 1)


def test_shares_sealed_for_another_site_or_altered_do_not_open():
    names, ids, roster, sites = _fresh(3)
    server = ServerSecAgg(JOB, 1, roster, 10)
    relayed = server.receive_keys({s: x.advertise() for s, x in sites.items()})
    routed = server.route_shares({s: x.share_keys(relayed) for s, x in sites.items()})
    misrouted = {"site-01": routed["site-02"]["site-01"], "site-02": routed["site-00"]["site-02"]}
    with pytest.raises(SecAggError, match="shares from site-01 do not decrypt"):
        sites["site-00"].masked_input(np.zeros(10), misrouted, server.survivors)
    flipped = dict(routed["site-01"])
    text = flipped["site-00"]
    flipped["site-00"] = text[:-1] + ("0" if text[-1] != "0" else "1")
    with pytest.raises(SecAggError, match="shares from site-00 do not decrypt"):
        sites["site-01"].masked_input(np.zeros(10), flipped, server.survivors)


def test_sites_refuse_unmask_requests_that_would_expose_one_site():
    def masked_round(n=5):
        names, ids, roster, sites = _fresh(n)
        server = ServerSecAgg(JOB, 1, roster, 10)
        relayed = server.receive_keys({s: x.advertise() for s, x in sites.items()})
        routed = server.route_shares({s: x.share_keys(relayed) for s, x in sites.items()})
        for s in names:
            sites[s].masked_input(np.ones(10), routed[s], server.survivors)
        return names, sites

    names, sites = masked_round()
    with pytest.raises(SecAggError, match="both the self-mask share and the mask-key share of site-02"):
        sites["site-00"].unmask(names, ["site-02"])
    with pytest.raises(SecAggError, match="already answered"):  # a refused request ends the round too
        sites["site-00"].unmask(names, [])
    reply = sites["site-01"].unmask(names[:4], names[4:])
    assert set(reply["b"]) == set(names[:4]) and set(reply["sk"]) == {"site-04"}
    with pytest.raises(SecAggError, match="already answered"):
        sites["site-01"].unmask(names[:4], names[4:])
    # "everybody else dropped": a sum of fewer than t sites would single out site-00
    with pytest.raises(SecAggError, match="only 2 of this site's holders sent, fewer than t=3"):
        sites["site-02"].unmask(["site-00", "site-02"], ["site-01", "site-03", "site-04"])
    with pytest.raises(SecAggError, match="says this site dropped"):
        sites["site-03"].unmask(names[:3], names[3:])
    with pytest.raises(SecAggError, match="partition|together be"):
        sites["site-04"].unmask(names, ["site-99"])
    _, ids, roster = identities(5)
    with pytest.raises(SecAggError, match="before masked_input"):
        SiteSecAgg("site-00", ids["site-00"], roster, JOB, 1).unmask(names, [])


def test_a_site_does_not_mask_for_too_few_survivors_nor_share_keys_alone():
    names, ids, roster, sites = _fresh(5)
    server = ServerSecAgg(JOB, 1, roster, 10)
    relayed = server.receive_keys({s: x.advertise() for s, x in sites.items()})
    routed = server.route_shares({s: x.share_keys(relayed) for s, x in sites.items()})
    # a server that tells site-00 only one other site survived would leave it with one pairwise mask
    few = {"site-01": routed["site-00"]["site-01"]}
    with pytest.raises(SecAggError, match="only 2 of the 5 holders.*fewer than t=3: not masking"):
        sites["site-00"].masked_input(np.ones(10), few, ["site-00", "site-01"])
    with pytest.raises(SecAggError, match="share_keys was already called"):
        sites["site-01"].share_keys(relayed)
    alone = SiteSecAgg("site-00", ids["site-00"], roster, JOB, 1)
    with pytest.raises(SecAggError, match="at least 2"):
        alone.share_keys({"site-00": alone.advertise()})
    with pytest.raises(SecAggError, match="at least 2"):
        ServerSecAgg(JOB, 1, roster, 10).receive_keys({"site-00": alone.advertise()})


def test_the_server_view_of_a_round_does_not_rebuild_one_site_update():
    """Everything the server receives in a round with one dropout; its best attempt at site-00's update leaves a
    vector uncorrelated with it, while the sum comes out right."""
    n_values = 100_000
    rng = np.random.default_rng(3)
    base = np.linspace(-1.0, 1.0, n_values)
    values = {f"site-{i:02d}": (100 + 10 * i) * (base + 0.01 * rng.normal(size=n_values)) for i in range(5)}
    r = run_round(5, n_values, drop=("site-04",), values=values)
    view, target = r.view, "site-00"
    assert np.allclose(dequantize(r.total, FRAC), sum(values[s] for s in r.sent), atol=1e-5)
    # what the server can rebuild: b of every site that sent, the mask key of every site that dropped
    x = {s: i + 1 for i, s in enumerate(sorted(view["advertised"]))}  # public: the holders' x-coordinates
    t = {s: threshold(len(r.server.holders(s))) for s in r.names}
    rebuilt_b = {s: shamir_combine({x[h]: bytes.fromhex(view["reveals"][h]["b"][s]) for h in r.sent}, t[s])
                 for s in r.sent}
    sk_dropped = shamir_combine({x[h]: bytes.fromhex(view["reveals"][h]["sk"]["site-04"]) for h in r.sent},
                                t["site-04"])
    key04 = X25519PrivateKey.from_private_bytes(sk_dropped)
    assert key04.public_key().public_bytes_raw().hex() == view["advertised"]["site-04"]["s_pk"]
    # best attempt: strip the self mask and the pairwise mask with the dropped site
    attempt = view["masked"][target] - prg(rebuilt_b[target], n_values)
    s_pk00 = bytes.fromhex(view["advertised"][target]["s_pk"])
    attempt = attempt - prg(_mask_seed(JOB, 1, key04, s_pk00, "site-04", target), n_values)
    assert_looks_uniform(attempt, values[target])
    # the attempt is the right one: with the other senders' mask keys (which no message carries; taken from the
    # sites' memory here) it would give site-00's quantized update exactly
    oracle = attempt.copy()
    for other in ("site-01", "site-02", "site-03"):
        oracle -= prg(_mask_seed(JOB, 1, r.sites[other]._s_sk, s_pk00, other, target), n_values)
    assert np.array_equal(oracle, quantize(values[target], FRAC, 5))
    # the masks with the other sites that sent need their mask keys, of which the server holds no share: every
    # share it received of site-00 is a self-mask share, and combining them gives b, not the mask key
    for reply in view["reveals"].values():
        assert set(reply["sk"]) == {"site-04"} and target in reply["b"]
    as_key = X25519PrivateKey.from_private_bytes(rebuilt_b[target])
    assert as_key.public_key().public_bytes_raw() != s_pk00
    # the share ciphertexts are all of one size: sealed pairs of shares, nothing in clear
    assert all(len(ct) == 2 * CIPHERTEXT_BYTES for m in view["shares"].values() for ct in m.values())


# ------------------------------------------------------------------------------------------------------ messages


def test_check_message_accepts_the_protocol_and_names_what_is_malformed():
    names, ids, roster, sites = _fresh(3)
    ad = sites["site-00"].advertise()
    assert check_message("advertise", ad) is None
    relayed = {s: x.advertise() for s, x in sites.items()}
    shares = sites["site-00"].share_keys(relayed)
    assert check_message("shares", shares) is None
    assert check_message("reveal", {"b": {"site-00": "ab" * SHARE_BYTES}, "sk": {}}) is None
    assert "unknown ['weights']" in check_message("advertise", {**ad, "weights": "00"})
    assert "missing ['sig']" in check_message("advertise", {k: v for k, v in ad.items() if k != "sig"})
    assert "c_pk is not 32 bytes" in check_message("advertise", {**ad, "c_pk": ad["c_pk"][:-2]})
    assert "c_pk is not 32 bytes" in check_message("advertise", {**ad, "c_pk": "zz" * 32})
    assert "round" in check_message("advertise", {**ad, "round": "1e3"})
    assert "not a site name" in check_message("advertise", {**ad, "site": "../etc"})
    assert "ciphertexts" in check_message("shares", {"site-01": "00" * (CIPHERTEXT_BYTES + 1)})
    assert "entries" in check_message("shares", {f"s{i}": "00" * CIPHERTEXT_BYTES for i in range(5)}, max_sites=4)
    assert "entries" in check_message("shares", {})
    assert "exactly the fields" in check_message("reveal", {"b": {}, "sk": {}, "values": [1.0]})
    assert "shares" in check_message("reveal", {"b": {"site-00": "ab" * (SHARE_BYTES - 1)}, "sk": {}})
    assert "mapping" in check_message("reveal", [1, 2])
    with pytest.raises(ValueError, match="kind"):
        check_message("masked", {})


def test_server_keeps_only_well_formed_share_sets_and_masked_vectors():
    names, ids, roster, sites = _fresh(4)
    server = ServerSecAgg(JOB, 1, roster, 10)
    relayed = server.receive_keys({s: x.advertise() for s, x in sites.items()})
    shares = {s: x.share_keys(relayed) for s, x in sites.items()}
    shares["site-03"].pop("site-00")  # leaves out one holder
    routed = server.route_shares(shares)
    assert server.survivors == names[:3] and "holders" in server.rejected["site-03"]
    assert set(routed) == set(names[:3]) and all("site-03" not in m for m in routed.values())
    y = sites["site-00"].masked_input(np.ones(10), routed["site-00"], server.survivors)
    with pytest.raises(SecAggError, match="not among the survivors"):
        server.add_masked("site-03", y)
    with pytest.raises(SecAggError, match="flat uint64 vector of 10"):
        server.add_masked("site-00", y[:5])
    with pytest.raises(SecAggError, match="flat uint64 vector of 10"):
        server.add_masked("site-00", y.astype(np.float64))
    server.add_masked("site-00", y.view(np.int64))
    with pytest.raises(SecAggError, match="second masked input"):
        server.add_masked("site-00", y)
    assert server.unmask_request() == (["site-00"], ["site-01", "site-02"])
    with pytest.raises(SecAggError, match="after the unmask request"):
        server.add_masked("site-01", y)


def test_wrong_revealed_shares_are_caught_not_used():
    names, ids, roster, sites = _fresh(5)
    server = ServerSecAgg(JOB, 1, roster, 20)
    relayed = server.receive_keys({s: x.advertise() for s, x in sites.items()})
    routed = server.route_shares({s: x.share_keys(relayed) for s, x in sites.items()})
    for s in names:
        y = sites[s].masked_input(np.ones(20), routed[s], server.survivors)
        if s != "site-04":
            server.add_masked(s, y)
    sent, dropped = server.unmask_request()
    reveals = {s: sites[s].unmask(sent, dropped) for s in sent}
    share = reveals["site-00"]["sk"]["site-04"]
    reveals["site-00"]["sk"]["site-04"] = share[:-1] + ("0" if share[-1] != "0" else "1")
    with pytest.raises(SecAggError, match="disagree"):
        server.finish(reveals)


# ------------------------------------------------------------------------------------------------------ the bench


def test_bench_secagg_rows_are_measured_for_each_graph_and_dropout(capsys):
    from fedoap.bench_privacy import _print_secagg, secagg_neighbours, secagg_rows

    assert [secagg_neighbours(n) for n in (3, 10, 12, 30)] == [0, 8, 8, 10]
    shared = np.linspace(-0.5, 0.5, 500)
    rows = secagg_rows(shared, sites=(3, 12), dropouts=(0, 1, 2), plaintext_bytes=2000, he_bytes=12_000,
                       training_round_s=2.0)
    assert [(r["sites"], r["graph"], r["dropped"]) for r in rows] == [
        (n, g, d) for n in (3, 12) for g in ("complete", "k=2ceil(log2 n)") for d in (0, 1, 2)]
    for r in rows:
        assert r["neighbours"] == (8 if (r["sites"], r["graph"]) == (12, "k=2ceil(log2 n)") else r["sites"] - 1)
        if r["sites"] == 3 and r["dropped"] == 2:  # t = 2 of 3: one site left cannot be unmasked
            assert r["ok"] is False and "fails closed" in r["error"] and r["site_s"] is None
            continue
        assert r["ok"], r
        assert r["max_abs_error"] <= r["sites"] * 2.0**-FRAC  # the fixed point's step, per site
        assert r["ring_bits"] == 32 and r["site_upload_bytes"] > 4 * 500 and r["site_upload_over_plaintext"] > 1
        assert r["site_upload_over_packed_he"] == pytest.approx(r["site_upload_bytes"] / 12_000)
        assert r["site_s"] > 0 and r["server_s"] > 0
        assert r["site_s_over_training_round"] == pytest.approx(r["site_s"] / 2.0)
    k_rows = [r for r in rows if r["sites"] == 12 and r["dropped"] == 0]
    assert k_rows[1]["site_upload_bytes"] < k_rows[0]["site_upload_bytes"]  # shares to 8 neighbours, not 11
    _print_secagg(rows, 2.0)
    table = capsys.readouterr().out
    assert "fails closed (t=2)" in table and "x train" in table
