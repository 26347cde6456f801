"""Secure aggregation by pairwise masks: the server learns the sum of the sites' updates and nothing about one site's.

The protocol of one round, after Bonawitz et al. (Practical Secure Aggregation for Privacy-Preserving Machine
Learning, CCS 2017) and, for the neighbour graph, Bell et al. (Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead, CCS 2020, "SecAgg+"). Written for this project from the papers; only ``cryptography``
(X25519, Ed25519, HKDF-SHA256, ChaCha20, AES-GCM), numpy and Python integers are used. The server only relays.

1. **Advertise** (:meth:`SiteSecAgg.advertise`). Every site makes two fresh X25519 key pairs for the round: ``c`` to
   encrypt key shares to other sites, ``s`` to agree pairwise mask seeds. It signs both public keys, with the job and
   round, by its Ed25519 identity key, which every site knows from a roster installed out of band: the server cannot
   substitute its own keys (it would then hold every pairwise seed) nor replay another round's.
2. **Share keys** (:meth:`SiteSecAgg.share_keys`). Each site verifies every relayed advertisement, derives the
   neighbour graph from a hash of all advertised keys (complete, or k-regular, so that no party picks it), draws a
   self-mask seed ``b`` and Shamir-splits ``b`` and its ``s`` secret key among its *holders* (its neighbours and
   itself), with threshold ``t = floor(m / 2) + 1`` for ``m`` holders. Each holder's pair of shares is sealed with
   AES-GCM under a key only sender and holder can derive (X25519 of their ``c`` keys, HKDF), the job, round, sender
   and recipient bound as associated data. The sites whose shares cover all their holders are the survivors ``U2``.
3. **Masked input** (:meth:`SiteSecAgg.masked_input`). The site sends
   ``y = q(x) + PRG(b) + sum_{v in N(u) & U2} +-PRG(s_uv)`` in the ring ``Z_2^r`` (``r`` = 64, or 32 for the float32
   bytes of the plaintext: :attr:`SecAggConfig.ring_bits`): ``q`` is fixed-point quantization
   (:func:`quantize`), ``s_uv`` the seed both ``u`` and ``v`` derive from ``X25519(s_u, s_v)``, ``+`` if ``u < v``
   else ``-``, so the pairwise masks cancel in the sum. One site's ``y`` alone is uniformly distributed.
4. **Unmask** (:meth:`SiteSecAgg.unmask`, :meth:`ServerSecAgg.finish`). Given which survivors sent (``sent``) and
   which did not (``dropped``), each site still there reveals its share of ``b`` for every site that sent and of the
   ``s`` key for every site that dropped, never both for one site. The server rebuilds them from ``t`` shares, removes
   the self masks of the sites that sent and the pairwise masks they added with the dropped ones, and gets the sum.

Why the threshold is more than half the holders: each honest holder reveals one kind of share per site, so a server
that tells some holders "u sent" and others "u dropped" cannot collect ``t`` shares of both kinds for ``u``. A site
also refuses a request in which fewer than ``t`` of its holders sent (with the complete graph: fewer than ``t`` sites
in the sum), so the server cannot single out one site by declaring the others dropped.

What it does not protect (the limits): a server that relays *different* advertisement sets or survivor lists to
different sites is not detected; it breaks the sum (the round fails or is wrong), and the per-site rules above bound,
but do not close, what such a server could learn: Bonawitz's extra "consistency check" round (every site signs the
list of sites that sent) is not implemented, so the server is trusted to follow the protocol while being curious
about what it sees (keys cannot be swapped or replayed, shares cannot be read, and no one honest site's value can
be isolated through the unmask requests). Sites that collude with the server see their own masks. The sum itself
(hence the mean) is revealed, as it must be; with two sites each site can compute the other's update from it.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "PROTOCOL",
    "MIN_SITES",
    "KEY_BYTES",
    "SHARE_BYTES",
    "CIPHERTEXT_BYTES",
    "HEADROOM_BITS",
    "RING_BITS",
    "headroom_bits",
    "SecAggError",
    "SecAggConfig",
    "threshold",
    "quantize",
    "dequantize",
    "max_abs_value",
    "prg",
    "shamir_split",
    "shamir_combine",
    "neighbour_graph",
    "check_message",
    "SiteSecAgg",
    "ServerSecAgg",
]

#: protocol tag: first field of everything signed, hashed or key-derived, so no value of another protocol or
#: version can be taken for one of this
PROTOCOL = "fedoap-secagg/1"
#: fewest sites of a round: the sum of one site is its value (with two, no dropout is tolerated: t = 2)
MIN_SITES = 2
#: raw X25519 public/secret keys, self-mask seeds and PRG seeds
KEY_BYTES = 32
_SIG_BYTES = 64
#: Shamir shares are elements of GF(2**521 - 1) (a Mersenne prime), written in 66 bytes, big-endian
_PRIME = 2**521 - 1
SHARE_BYTES = 66
_MAX_SECRET_BYTES = 64  # a marker byte and the secret must stay below the prime (65 bytes = 520 bits)
_NONCE_BYTES, _TAG_BYTES = 12, 16
#: a sealed pair of shares (self-mask seed, mask key): nonce, ciphertext, tag
CIPHERTEXT_BYTES = _NONCE_BYTES + 2 * SHARE_BYTES + _TAG_BYTES
#: the quantized sum must stay below 2**HEADROOM_BITS in absolute value in the 64-bit ring (read back as a signed
#: integer, with a factor 2 for rounding); in a ring of r bits the headroom is r - 2 bits (:func:`headroom_bits`)
#: with a bit to spare for the rounding of every summand
HEADROOM_BITS = 62
#: the rings a job may use: Z_2^64 (ample headroom) or Z_2^32 (the float32 bytes of the plaintext)
RING_BITS = (32, 64)
_RING_DTYPES = {64: (np.int64, np.uint64), 32: (np.int32, np.uint32)}
_MAX_FRAC_BITS = 52  # float64's mantissa: more fraction bits than this add only zeros
_PRG_CHUNK = 1 << 18  # values per cipher call
_ZEROS = memoryview(bytes(8 * _PRG_CHUNK))  # the plaintext of the key stream (2 MB), shared by every call
_MAX_NAME = 128
_MAX_JOB = 256
_SITE_NAME = re.compile(r"[A-Za-z0-9@_][A-Za-z0-9@._-]*")  # NVFlare's site names
_ROUND = re.compile(r"0|[1-9][0-9]{0,9}")
_ADVERT_FIELDS = frozenset({"site", "round", "job", "c_pk", "s_pk", "sig"})
_REVEAL_FIELDS = frozenset({"b", "sk"})


def _hex_re(n_bytes: int) -> re.Pattern:
    return re.compile(f"[0-9a-f]{{{2 * n_bytes}}}")


_KEY_HEX, _SIG_HEX = _hex_re(KEY_BYTES), _hex_re(_SIG_BYTES)
_CT_HEX, _SHARE_HEX = _hex_re(CIPHERTEXT_BYTES), _hex_re(SHARE_BYTES)


class SecAggError(ValueError):
    """A protocol step that must not go on (bad signature, replayed/swapped key, too few shares, headroom, a request
    to reveal both shares of one site, ...); the message is one line naming the site/round."""


@dataclass(frozen=True)
class SecAggConfig:
    """The settings every participant of a job must share.

    Args:
        frac_bits: fixed-point fraction bits: a value ``v`` is sent as ``round(v * 2**frac_bits)`` in ``Z_2^64``
            (absolute error ``2**-(frac_bits + 1)`` per value and site). 24 leaves ``2**38 / n`` for ``|v|`` with
            ``n`` sites (:func:`max_abs_value`), ample for weights times parameters.
        neighbours: 0: every site masks with and shares keys to every other (Bonawitz; cost per site grows with the
            number of sites). ``k > 0``, even: each site does so with ``k`` neighbours of a k-regular ring (Harary)
            graph over a permutation derived from a hash of all advertised keys (SecAgg+; Bell et al. take
            ``k = O(log n)``). ``k >= n - 1`` is the complete graph.
        ring_bits: 64 (``Z_2^64``) or 32 (``Z_2^32``: a masked value costs the bytes of a float32, and
            ``|value| * 2**frac_bits`` must stay below ``2**30`` over the sum: :func:`max_abs_value`).

    Raises:
        ValueError: a value out of range (one line).
    """

    frac_bits: int = 24
    neighbours: int = 0
    ring_bits: int = 64

    def __post_init__(self) -> None:
        if self.ring_bits not in RING_BITS or isinstance(self.ring_bits, bool):
            raise ValueError(f"secure aggregation ring_bits must be one of {RING_BITS}, got {self.ring_bits!r}")
        top = min(_MAX_FRAC_BITS, headroom_bits(self.ring_bits) - 1)
        if not _is_int(self.frac_bits) or not 1 <= self.frac_bits <= top:
            raise ValueError(f"secure aggregation frac_bits must be an integer in 1..{top} for a "
                             f"{self.ring_bits}-bit ring, got {self.frac_bits!r}")
        if not _is_int(self.neighbours) or self.neighbours < 0 or self.neighbours % 2:
            raise ValueError(f"secure aggregation neighbours must be 0 (every site) or an even number >= 2 (a "
                             f"k-regular ring graph needs k even), got {self.neighbours!r}")

    def to_dict(self) -> dict[str, int]:
        """Plain JSON-able values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SecAggConfig:
        unknown = sorted(set(data) - {"frac_bits", "neighbours", "ring_bits"})
        if unknown:
            raise ValueError(f"unknown SecAggConfig field(s): {unknown}")
        return cls(**dict(data))


def threshold(holders: int) -> int:
    """Shares needed to rebuild a secret split among ``holders`` sites: more than half, ``floor(m / 2) + 1``."""
    if not _is_int(holders) or holders < 1:
        raise ValueError(f"the number of share holders must be an integer >= 1, got {holders!r}")
    return holders // 2 + 1


# --------------------------------------------------------------------------------------------------- small parts


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _encode(*fields: bytes | str | int) -> bytes:
    """An unambiguous encoding of the fields (each length-prefixed), for signatures, hashes and key derivation."""
    out = bytearray()
    for field in fields:
        if isinstance(field, str):
            data = field.encode("utf-8")
        elif isinstance(field, int):
            data = field.to_bytes(8, "big")
        else:
            data = bytes(field)
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def _hkdf(secret: bytes, *info: bytes | str | int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_encode(PROTOCOL, *info)).derive(secret)


def _advert_message(job: str, rnd: int, site: str, c_pk: bytes, s_pk: bytes) -> bytes:
    return _encode(PROTOCOL, "advertise", job, rnd, site, c_pk, s_pk)


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _exchange(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise SecAggError(f"{what}: the advertised X25519 key is a low-order point (no shared secret)") from None


def _mask_seed(job: str, rnd: int, private: X25519PrivateKey, public: bytes, a: str, b: str) -> bytes:
    """The pairwise mask seed of sites ``a`` and ``b``: the same from either side (names in sorted order)."""
    lo, hi = sorted((a, b))
    return _hkdf(_exchange(private, public, f"round {rnd}, pair {lo}/{hi}"), "mask", job, rnd, lo, hi)


def _share_aad(job: str, rnd: int, sender: str, recipient: str) -> bytes:
    return _encode(PROTOCOL, "shares", job, rnd, sender, recipient)


def _share_key(job: str, rnd: int, private: X25519PrivateKey, public: bytes, sender: str, recipient: str) -> bytes:
    what = f"round {rnd}, shares {sender} -> {recipient}"
    return _hkdf(_exchange(private, public, what), "share-key", job, rnd, sender, recipient)


def _check_job_round(job_id: object, rnd: object) -> None:
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= _MAX_JOB or not job_id.isprintable():
        raise ValueError(f"job_id must be printable text of 1..{_MAX_JOB} characters, got {job_id!r}")
    if not _is_int(rnd) or not 0 <= rnd < 10**10:
        raise ValueError(f"round must be an integer in 0..{10**10 - 1}, got {rnd!r}")


def _check_roster(roster: object) -> dict[str, bytes]:
    if not isinstance(roster, Mapping) or not roster:
        raise ValueError("roster must map site names to raw 32-byte Ed25519 public keys, got "
                         f"{type(roster).__name__}")
    out = {}
    for name, key in roster.items():
        if not isinstance(name, str) or not _SITE_NAME.fullmatch(name) or len(name) > _MAX_NAME:
            raise ValueError(f"roster: {name!r} is not a site name")
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ValueError(f"roster: the key of {name} must be {KEY_BYTES} raw bytes")
        out[name] = bytes(key)
    return out


def _names(value: object, what: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SecAggError(f"{what} must be a list of site names, got {type(value).__name__}")
    names = list(value)
    if any(not isinstance(n, str) for n in names):
        raise SecAggError(f"{what} must hold site names only")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SecAggError(f"{what} names {', '.join(twice)} twice")
    return names


# ------------------------------------------------------------------------------------------------- fixed point


def headroom_bits(ring_bits: int = 64) -> int:
    """The bits a quantized sum may use in a ring of ``ring_bits`` bits: ``ring_bits - 2`` (sign and rounding)."""
    if ring_bits not in RING_BITS:
        raise ValueError(f"ring_bits must be one of {RING_BITS}, got {ring_bits!r}")
    return ring_bits - 2


def max_abs_value(frac_bits: int, n_summands: float, ring_bits: int = 64) -> float:
    """The bound on ``|value|`` (exclusive) that keeps a sum of ``n_summands`` quantized values inside the ring's
    signed range with room for rounding: ``2**(ring_bits - 2) / (2**frac_bits * n_summands)``. ``n_summands`` may
    be a fraction's inverse: a site whose values are its share ``w`` of a sum whose shares add up to at most 1 passes
    ``1 / w``."""
    if not _is_int(frac_bits) or not 0 <= frac_bits <= _MAX_FRAC_BITS:
        raise ValueError(f"frac_bits must be an integer in 0..{_MAX_FRAC_BITS}, got {frac_bits!r}")
    if isinstance(n_summands, bool) or not isinstance(n_summands, (int, float, np.number)) or not (
            math.isfinite(n_summands) and n_summands >= 1):
        raise ValueError(f"n_summands must be a number >= 1, got {n_summands!r}")
    return 2.0 ** (headroom_bits(ring_bits) - frac_bits) / n_summands


def quantize(values: np.ndarray, frac_bits: int, n_summands: float, ring_bits: int = 64) -> np.ndarray:
    """``round(values * 2**frac_bits)`` as uint64 or uint32 (two's complement: the ring ``Z_2^ring_bits``), same
    shape.

    Raises:
        SecAggError: a value that is not finite, or ``max|v| * 2**frac_bits * n_summands >= 2**(ring_bits - 2)`` (the
            message states the largest ``|value|`` allowed): the sum would wrap around and decode to garbage.
    """
    bound = max_abs_value(frac_bits, n_summands, ring_bits)
    array = np.asarray(values, dtype=np.float64)
    if array.size:
        hi, lo = float(array.max()), float(array.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            raise SecAggError("cannot quantize: the values hold NaN or infinity")
        largest = max(hi, -lo)
        if largest >= bound:
            raise SecAggError(f"cannot quantize: |value| up to {largest:.6g} but with frac_bits={frac_bits} and "
                              f"{n_summands} summands the largest |value| allowed is below {bound:.6g} "
                              f"(2**{headroom_bits(ring_bits)} / 2**{frac_bits} / {n_summands:g}); scale the values or lower "
                              "frac_bits")
    scaled = array * 2.0**frac_bits
    np.rint(scaled, out=scaled)
    signed, unsigned = _RING_DTYPES[ring_bits]
    return scaled.astype(signed).view(unsigned)


def dequantize(total: np.ndarray, frac_bits: int) -> np.ndarray:
    """A quantized sum (uint64 or uint32, or its signed view) back to float64, read as a signed integer of its
    width."""
    max_abs_value(frac_bits, 1)  # checks frac_bits
    array = np.asarray(total)
    signed = {np.dtype(np.uint64): np.int64, np.dtype(np.uint32): np.int32}.get(array.dtype)
    if signed is not None:
        array = array.view(signed)
    elif array.dtype not in (np.int64, np.int32):
        raise ValueError(f"a quantized sum is uint64/uint32 or int64/int32, got {array.dtype}")
    return array.astype(np.float64) * 2.0**-frac_bits


def prg(seed: bytes, n: int, ring_bits: int = 64) -> np.ndarray:
    """``n`` pseudorandom uint64 (or, ``ring_bits=32``, uint32) values: the ChaCha20 key stream under the 32-byte
    ``seed``, little-endian.

    The nonce is fixed (zero): every seed is used for one stream only (a fresh self-mask seed per round; pairwise
    seeds derived from per-round keys with the job, round and both names), and a nonce only matters when a key is
    used twice. The 32-bit block counter allows 2**32 blocks of 64 bytes, i.e. up to 2**35 values.
    """
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != KEY_BYTES:
        raise ValueError(f"a PRG seed is {KEY_BYTES} bytes, got "
                         f"{len(seed) if isinstance(seed, (bytes, bytearray)) else type(seed).__name__}")
    if not _is_int(n) or not 0 <= n <= 2**35:
        raise ValueError(f"n must be an integer in 0..2**35, got {n!r}")
    n = int(n)
    width = headroom_bits(ring_bits) // 8 + 1  # bytes per value: 8 or 4
    stream = Cipher(algorithms.ChaCha20(bytes(seed), bytes(16)), mode=None).encryptor()
    # the key stream is written straight into the result (update_into wants room for one more block)
    raw = np.empty(width * n + 64, dtype=np.uint8)
    for start in range(0, width * n, 8 * _PRG_CHUNK):
        m = min(8 * _PRG_CHUNK, width * n - start)
        stream.update_into(_ZEROS[:m], raw[start:])
    return raw[:width * n].view(f"<u{width}").astype(_RING_DTYPES[ring_bits][1], copy=False)


# ----------------------------------------------------------------------------------------------------- Shamir


def _check_holders(holders: Sequence[int]) -> list[int]:
    xs = list(holders)
    if not xs or any(not _is_int(x) or not 1 <= x < _PRIME for x in xs):
        raise ValueError(f"holders must be integers >= 1 (the x-coordinates of the shares), got {xs!r}")
    if len(set(xs)) != len(xs):
        raise ValueError(f"holders must be distinct, got {xs!r}")
    return [int(x) for x in xs]


def shamir_split(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Shamir's shares of ``secret`` (1..64 bytes) for the x-coordinates ``holders``: any ``threshold`` of them
    rebuild it, fewer tell nothing. Polynomial over GF(2**521 - 1), coefficients from ``secrets``; each share is the
    polynomial's value, 66 bytes big-endian."""
    if not isinstance(secret, (bytes, bytearray)) or not 1 <= len(secret) <= _MAX_SECRET_BYTES:
        raise ValueError(f"a Shamir secret is 1..{_MAX_SECRET_BYTES} bytes")
    xs = _check_holders(holders)
    if not _is_int(threshold) or not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in 1..{len(xs)} (the number of holders), got {threshold!r}")
    # a leading 0x01 byte keeps the secret's length (its leading zero bytes) through the integer
    coefficients = [int.from_bytes(b"\x01" + bytes(secret), "big")]
    coefficients += [secrets.randbelow(_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % _PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange, mod the prime)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % _PRIME
                den = den * (xi - xj) % _PRIME
        total = (total + yi * num * pow(den, -1, _PRIME)) % _PRIME
    return total


def shamir_combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret of :func:`shamir_split` from at least ``threshold`` shares ``{x: share}``; shares beyond the
    threshold are checked to lie on the same polynomial.

    Raises:
        SecAggError: fewer than ``threshold`` shares (the round fails closed), shares that disagree, or shares
            that do not decode to a secret.
    """
    if not _is_int(threshold) or threshold < 1:
        raise ValueError(f"threshold must be an integer >= 1, got {threshold!r}")
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares of a secret with threshold {threshold}: fewer than t shares cannot "
                          "rebuild it (fails closed)")
    xs = _check_holders(list(shares))
    points = []
    for x in sorted(xs):
        share = shares[x]
        if not isinstance(share, (bytes, bytearray)) or len(share) != SHARE_BYTES:
            raise SecAggError(f"the share at x={x} is not {SHARE_BYTES} bytes")
        y = int.from_bytes(share, "big")
        if y >= _PRIME:
            raise SecAggError(f"the share at x={x} is not an element of the field")
        points.append((x, y))
    base, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _interpolate(base, x) != y:
            raise SecAggError(f"the shares disagree (the share at x={x} is not on the polynomial of the others): "
                              "a holder sent a wrong share")
    data = _interpolate(base, 0).to_bytes(SHARE_BYTES, "big").lstrip(b"\x00")
    if not data.startswith(b"\x01") or len(data) < 2:
        raise SecAggError("the shares do not rebuild a secret (wrong or mixed shares)")
    return data[1:]


# ------------------------------------------------------------------------------------------------------ graph


def neighbour_graph(sites: Sequence[str], k: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Who masks with whom: ``site -> sorted neighbours``, symmetric.

    ``k = 0`` or ``k >= n - 1``: the complete graph. Otherwise, even ``k``: the sites are ordered by
    ``SHA-256(seed, name)`` and each is joined to the ``k / 2`` before and after it on that ring (a Harary graph,
    k-regular). The seed is a hash of all advertised keys, so neither the server nor a site picks the graph alone.
    """
    names = _names(sites, "the sites of the graph")
    if not names:
        raise ValueError("a neighbour graph needs at least one site")
    if not _is_int(k) or k < 0 or k % 2:
        raise ValueError(f"k must be 0 or an even number >= 2, got {k!r}")
    n = len(names)
    if k == 0 or k >= n - 1:
        return {s: tuple(sorted(v for v in names if v != s)) for s in names}
    ring = sorted(names, key=lambda s: hashlib.sha256(_encode(PROTOCOL, "graph-order", bytes(seed), s)).digest())
    graph: dict[str, set[str]] = {s: set() for s in names}
    for i, s in enumerate(ring):
        for d in range(1, k // 2 + 1):
            v = ring[(i + d) % n]
            graph[s].add(v)
            graph[v].add(s)
    return {s: tuple(sorted(graph[s])) for s in names}


def _graph_seed(job: str, rnd: int, keys: Mapping[str, tuple[bytes, bytes]]) -> bytes:
    fields: list[bytes | str | int] = [PROTOCOL, "graph-seed", job, rnd]
    for site in sorted(keys):
        fields += [site, *keys[site]]
    return hashlib.sha256(_encode(*fields)).digest()


class _Round:
    """What a site and the server derive alike from the verified advertisements: the order of the sites (x-coordinate
    ``1 + index``), the keys, the neighbour graph, each site's holders and threshold."""

    def __init__(self, job: str, rnd: int, keys: Mapping[str, tuple[bytes, bytes]], k: int) -> None:
        self.sites = sorted(keys)
        self.x = {s: i + 1 for i, s in enumerate(self.sites)}
        self.keys = dict(keys)
        self.graph = neighbour_graph(self.sites, k, _graph_seed(job, rnd, keys))
        self.holders = {s: tuple(sorted((s,) + self.graph[s])) for s in self.sites}
        self.t = {s: threshold(len(self.holders[s])) for s in self.sites}


# ------------------------------------------------------------------------------------------------- messages


def check_message(kind: str, message: Any, max_sites: int = 1000) -> Optional[str]:
    """Why a protocol message is malformed (unknown or missing fields, non-hex, wrong lengths, too many entries), or
    None. The server runs it before touching a message; a site's privacy filter runs it on what the site sends, so
    only key material of the expected sizes leaves it.

    ``kind``: ``"advertise"`` (:meth:`SiteSecAgg.advertise`), ``"shares"`` (:meth:`SiteSecAgg.share_keys`) or
    ``"reveal"`` (:meth:`SiteSecAgg.unmask`).
    """
    if kind == "advertise":
        if not isinstance(message, Mapping):
            return f"an advertisement is a mapping, got {type(message).__name__}"
        fields = set(message)
        if fields != _ADVERT_FIELDS:
            unknown, missing = sorted(map(str, fields - _ADVERT_FIELDS)), sorted(_ADVERT_FIELDS - fields)
            return f"an advertisement has fields {sorted(_ADVERT_FIELDS)}: unknown {unknown}, missing {missing}"
        if not all(isinstance(message[f], str) for f in _ADVERT_FIELDS):
            return "every field of an advertisement is text"
        site, job = message["site"], message["job"]
        if len(site) > _MAX_NAME or not _SITE_NAME.fullmatch(site):
            return f"site {site[:_MAX_NAME]!r} is not a site name"
        if not 1 <= len(job) <= _MAX_JOB or not job.isprintable():
            return f"job is not printable text of 1..{_MAX_JOB} characters"
        if not _ROUND.fullmatch(message["round"]):
            return f"round {message['round'][:20]!r} is not a decimal round number"
        for field in ("c_pk", "s_pk"):
            if not _KEY_HEX.fullmatch(message[field]):
                return f"{field} is not {KEY_BYTES} bytes of lowercase hex"
        if not _SIG_HEX.fullmatch(message["sig"]):
            return f"sig is not {_SIG_BYTES} bytes of lowercase hex"
        return None
    if kind == "shares":
        return _check_site_map(message, _CT_HEX, f"{CIPHERTEXT_BYTES}-byte ciphertexts", max_sites, "shares",
                               allow_empty=False)
    if kind == "reveal":
        if not isinstance(message, Mapping):
            return f"a reveal is a mapping, got {type(message).__name__}"
        if set(message) != _REVEAL_FIELDS:
            return f"a reveal has exactly the fields {sorted(_REVEAL_FIELDS)}, got {sorted(map(str, message))}"
        for field in sorted(_REVEAL_FIELDS):
            why = _check_site_map(message[field], _SHARE_HEX, f"{SHARE_BYTES}-byte shares", max_sites,
                                  f"reveal[{field!r}]", allow_empty=True)
            if why:
                return why
        return None
    raise ValueError(f"kind must be 'advertise', 'shares' or 'reveal', got {kind!r}")


def _check_site_map(message: Any, pattern: re.Pattern, what: str, max_sites: int, name: str,
                    allow_empty: bool) -> Optional[str]:
    if not isinstance(message, Mapping):
        return f"{name} is a mapping of site names to hex, got {type(message).__name__}"
    if len(message) > max_sites or (not allow_empty and not message):
        return f"{name} has {len(message)} entries (1..{max_sites} allowed)"
    for site, value in message.items():
        if not isinstance(site, str) or len(site) > _MAX_NAME or not _SITE_NAME.fullmatch(site):
            return f"{name}: {str(site)[:_MAX_NAME]!r} is not a site name"
        if not isinstance(value, str) or not pattern.fullmatch(value):
            return f"{name}[{site!r}] is not {what} in lowercase hex"
    return None


def _verify_advert(name: str, ad: Any, roster: Mapping[str, bytes], job: str, rnd: int) -> tuple[bytes, bytes]:
    """The advertised ``(c_pk, s_pk)`` of ``name`` once its signature, job and round check out.

    Raises:
        SecAggError: malformed, relayed under another name, not in the roster, another job or round (a replay), or
            a signature that does not verify against the roster's key of ``name`` (a swapped key).
    """
    where = f"round {rnd}: the advertisement of {name!r}"
    why = check_message("advertise", ad)
    if why:
        raise SecAggError(f"{where} is malformed: {why}")
    if ad["site"] != name:
        raise SecAggError(f"{where} is signed for site {ad['site']!r}: a key relayed under another site's name")
    if name not in roster:
        raise SecAggError(f"{where}: {name!r} is not in the roster of identity keys")
    if ad["job"] != job:
        raise SecAggError(f"{where} is for job {ad['job']!r}, not {job!r}: a replayed key")
    if int(ad["round"]) != rnd:
        raise SecAggError(f"{where} is for round {ad['round']}, not {rnd}: a replayed key")
    c_pk, s_pk = bytes.fromhex(ad["c_pk"]), bytes.fromhex(ad["s_pk"])
    try:
        Ed25519PublicKey.from_public_bytes(roster[name]).verify(
            bytes.fromhex(ad["sig"]), _advert_message(job, rnd, name, c_pk, s_pk))
    except InvalidSignature:
        raise SecAggError(f"{where}: the signature does not verify against {name}'s identity key in the roster "
                          "(a key swapped on its way)") from None
    return c_pk, s_pk


def _reused_keys(keys: Mapping[str, tuple[bytes, bytes]]) -> list[str]:
    """Sites whose two advertised keys are equal, or equal to another site's (never the case for fresh keys)."""
    owners: dict[bytes, list[str]] = {}
    reused = set()
    for site, (c_pk, s_pk) in keys.items():
        if c_pk == s_pk:
            reused.add(site)
        for key in {c_pk, s_pk}:
            owners.setdefault(key, []).append(site)
    reused.update(s for sites in owners.values() if len(sites) > 1 for s in sites)
    return sorted(reused)


# ------------------------------------------------------------------------------------------------------- site


class SiteSecAgg:
    """One site's state for ONE round (fresh keys every round: a key revealed for a dropped site in round r is
    worthless later).

    Args:
        site: this site's name (in the roster).
        identity: this site's Ed25519 identity key; the roster must hold its public key for ``site``.
        roster: site name -> raw 32-byte Ed25519 public identity key of every site (trusted, installed out of band).
        job_id, rnd: the job and round every message is bound to.
        config: the job's :class:`SecAggConfig`.

    Raises:
        ValueError: a malformed roster, job or round, or a roster whose key for ``site`` is not ``identity``'s.
    """

    def __init__(self, site: str, identity: Ed25519PrivateKey, roster: Mapping[str, bytes], job_id: str, rnd: int,
                 config: SecAggConfig = SecAggConfig()) -> None:
        self.roster = _check_roster(roster)
        _check_job_round(job_id, rnd)
        if not isinstance(config, SecAggConfig):
            raise ValueError(f"config must be a SecAggConfig, got {type(config).__name__}")
        if not isinstance(identity, Ed25519PrivateKey):
            raise ValueError(f"identity must be an Ed25519 private key, got {type(identity).__name__}")
        if site not in self.roster:
            raise ValueError(f"site {site!r} is not in the roster")
        if identity.public_key().public_bytes_raw() != self.roster[site]:
            raise ValueError(f"the roster's key for {site} is not this site's identity key")
        self.site, self.job_id, self.round, self.config = site, job_id, int(rnd), config
        self._c_sk, self._s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        c_pk, s_pk = _raw_public(self._c_sk), _raw_public(self._s_sk)
        sig = identity.sign(_advert_message(job_id, self.round, site, c_pk, s_pk))
        self._advert = {"site": site, "round": str(self.round), "job": job_id, "c_pk": c_pk.hex(),
                        "s_pk": s_pk.hex(), "sig": sig.hex()}
        self._state: Optional[_Round] = None
        self._b: Optional[bytes] = None
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (share of b, share of s_sk) this site holds
        self._survivors: Optional[list[str]] = None
        self._unmasked = False

    def _where(self) -> str:
        return f"site {self.site}, round {self.round}"

    @property
    def neighbours(self) -> tuple[str, ...]:
        """The sites this one masks with (known after :meth:`share_keys`)."""
        if self._state is None:
            raise SecAggError(f"{self._where()}: the neighbours are known after share_keys")
        return self._state.graph[self.site]

    def advertise(self) -> dict[str, str]:
        """This round's public keys, signed: ``{"site", "round", "job", "c_pk", "s_pk", "sig"}`` (text, hex keys)."""
        return dict(self._advert)

    def share_keys(self, advertised: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Check every site's advertisement; split the self-mask seed and the mask key among this site's holders.

        Args:
            advertised: ``site -> advertisement`` as relayed by the server, this site's own included, unchanged;
                at least :data:`MIN_SITES` sites.

        Returns:
            ``holder -> hex ciphertext`` of that holder's two shares (this site keeps its own shares itself).

        Raises:
            SecAggError: called twice; this site missing or its advertisement altered; any advertisement that does
                not verify (malformed, replayed from another job or round, swapped, not in the roster); keys reused;
                fewer than :data:`MIN_SITES` sites.
        """
        where = self._where()
        if self._state is not None:
            raise SecAggError(f"{where}: share_keys was already called this round")
        if not isinstance(advertised, Mapping):
            raise SecAggError(f"{where}: the advertisements must map site names to advertisements")
        if self.site not in advertised:
            raise SecAggError(f"{where}: the relayed advertisements leave out this site's own")
        own = advertised[self.site]
        if not isinstance(own, Mapping) or dict(own) != self._advert:
            raise SecAggError(f"{where}: this site's own advertisement was altered on its way")
        keys = {name: _verify_advert(name, ad, self.roster, self.job_id, self.round)
                for name, ad in advertised.items()}
        if len(keys) < MIN_SITES:
            raise SecAggError(f"{where}: {len(keys)} site(s) advertised keys; secure aggregation needs at least "
                              f"{MIN_SITES} (the sum of one site is its update)")
        reused = _reused_keys(keys)
        if reused:
            raise SecAggError(f"{where}: sites {', '.join(reused)} advertise the same public key: refusing")
        state = _Round(self.job_id, self.round, keys, self.config.neighbours)
        holders, t = state.holders[self.site], state.t[self.site]
        self._b = secrets.token_bytes(KEY_BYTES)
        xs = [state.x[h] for h in holders]
        b_shares = shamir_split(self._b, t, xs)
        sk_shares = shamir_split(self._s_sk.private_bytes_raw(), t, xs)
        out = {}
        for holder in holders:
            pair = (b_shares[state.x[holder]], sk_shares[state.x[holder]])
            if holder == self.site:
                self._held[holder] = pair
                continue
            key = _share_key(self.job_id, self.round, self._c_sk, keys[holder][0], self.site, holder)
            nonce = secrets.token_bytes(_NONCE_BYTES)
            sealed = AESGCM(key).encrypt(nonce, pair[0] + pair[1],
                                         _share_aad(self.job_id, self.round, self.site, holder))
            out[holder] = (nonce + sealed).hex()
        self._state = state
        return out

    def masked_input(self, values: np.ndarray, received: Mapping[str, str], survivors: Sequence[str],
                     summands: Optional[float] = None) -> np.ndarray:
        """This site's masked vector: ``quantize(values) + PRG(b) + sum +-PRG(pairwise seed)`` in
        ``Z_2^ring_bits``.

        Args:
            values: the flat float64 vector, already times the site's aggregation weight.
            received: ``sender -> hex ciphertext`` addressed to this site (the shares it holds for its neighbours).
            survivors: the sites that completed share_keys (``U2``): this site among them, all advertised.
            summands: the headroom check's ``n_summands`` (:func:`quantize`); default: the number of survivors.
                A site whose values are its share ``w`` (<= 1) of a common scale passes ``1 / w``.

        Raises:
            SecAggError: out of order or a second call; survivors that leave out this site, name unknown sites, or
                hold fewer than ``t`` of this site's holders (its shares could not be rebuilt); a missing share of a
                surviving neighbour, a share from a site that is not one, or one that does not decrypt; a vector
                that is not flat or does not fit the headroom.
        """
        where = self._where()
        state = self._state
        if state is None:
            raise SecAggError(f"{where}: masked_input before share_keys")
        if self._survivors is not None:
            raise SecAggError(f"{where}: masked_input was already called this round")
        alive = _names(survivors, f"{where}: survivors")
        if self.site not in alive:
            raise SecAggError(f"{where}: the survivors leave out this site")
        unknown = sorted(set(alive) - set(state.sites))
        if unknown:
            raise SecAggError(f"{where}: survivors {', '.join(unknown)} advertised no keys this round")
        live_holders = [h for h in state.holders[self.site] if h in alive]
        t = state.t[self.site]
        if len(live_holders) < t:
            raise SecAggError(f"{where}: only {len(live_holders)} of the {len(state.holders[self.site])} holders of "
                              f"this site's shares survived the key sharing, fewer than t={t}: not masking")
        if not isinstance(received, Mapping):
            raise SecAggError(f"{where}: the received shares must map senders to hex ciphertexts")
        expected = {v for v in state.graph[self.site] if v in alive}
        extra = sorted(set(received) - expected)
        if extra:
            raise SecAggError(f"{where}: shares from {', '.join(map(str, extra))}, which are not surviving "
                              "neighbours of this site")
        missing = sorted(expected - set(received))
        if missing:
            raise SecAggError(f"{where}: no shares from surviving neighbour(s) {', '.join(missing)}")
        array = np.asarray(values)
        if array.ndim != 1 or array.dtype.kind not in "fiu":
            raise SecAggError(f"{where}: values must be a flat real vector, got {array.dtype} of shape "
                              f"{array.shape}")
        held = {}
        for sender in sorted(expected):
            text = received[sender]
            if not isinstance(text, str) or not _CT_HEX.fullmatch(text):
                raise SecAggError(f"{where}: the shares from {sender} are not a {CIPHERTEXT_BYTES}-byte hex ciphertext")
            data = bytes.fromhex(text)
            key = _share_key(self.job_id, self.round, self._c_sk, state.keys[sender][0], sender, self.site)
            try:
                plain = AESGCM(key).decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:],
                                            _share_aad(self.job_id, self.round, sender, self.site))
            except InvalidTag:
                raise SecAggError(f"{where}: the shares from {sender} do not decrypt (altered, or sealed for another "
                                  "site, job or round)") from None
            held[sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
        ring = self.config.ring_bits
        masked = quantize(array, self.config.frac_bits, len(alive) if summands is None else summands, ring)
        n = masked.size
        np.add(masked, prg(self._b, n, ring), out=masked)
        for v in sorted(expected):
            mask = prg(_mask_seed(self.job_id, self.round, self._s_sk, state.keys[v][1], self.site, v), n, ring)
            (np.add if self.site < v else np.subtract)(masked, mask, out=masked)
        self._held.update(held)
        self._survivors = alive
        return masked

    def unmask(self, sent: Sequence[str], dropped: Sequence[str]) -> dict[str, dict[str, str]]:
        """The shares that remove the masks: ``{"b": {site: hex share}, "sk": {site: hex share}}``, of the self-mask
        seed of every site in ``sent`` and of the mask key of every site in ``dropped`` that this site holds shares
        of. Any request, refused or not, ends the round for this site: a server cannot try two stories.

        Raises:
            SecAggError: before masked_input or a second time; a site in both lists (its two shares would unmask it);
                this site in ``dropped``; lists that are not a partition of the survivors this site masked with; or
                fewer than ``t`` of this site's holders in ``sent`` (a server must not learn one site's value by
                claiming the others dropped).
        """
        where = self._where()
        if self._survivors is None:
            raise SecAggError(f"{where}: unmask before masked_input")
        if self._unmasked:
            raise SecAggError(f"{where}: unmask was already answered this round; a second request is refused")
        self._unmasked = True
        state, held = self._state, self._held
        self._b, self._held = None, {}  # this round's secrets are no longer needed, whatever the answer
        sent_list, dropped_list = _names(sent, f"{where}: sent"), _names(dropped, f"{where}: dropped")
        both = sorted(set(sent_list) & set(dropped_list))
        if both:
            raise SecAggError(f"{where}: asked to reveal both the self-mask share and the mask-key share of "
                              f"{', '.join(both)}, which would unmask its update: refusing")
        if self.site in dropped_list:
            raise SecAggError(f"{where}: the request says this site dropped, but it sent its masked input: refusing")
        if set(sent_list) | set(dropped_list) != set(self._survivors):
            raise SecAggError(f"{where}: sent and dropped must together be the {len(self._survivors)} survivors this "
                              "site masked with: refusing")
        t = state.t[self.site]
        sent_holders = [h for h in state.holders[self.site] if h in set(sent_list)]
        if len(sent_holders) < t:
            raise SecAggError(f"{where}: only {len(sent_holders)} of this site's holders sent, fewer than t={t}: a sum "
                              "of so few could single out one site's update: refusing")
        reply = {"b": {s: held[s][0].hex() for s in sent_list if s in held},
                 "sk": {s: held[s][1].hex() for s in dropped_list if s in held}}
        return reply


# ----------------------------------------------------------------------------------------------------- server


class ServerSecAgg:
    """The server's side of one round: relays, sums, removes masks; never holds a secret that unmasks one site that
    sent.

    Args:
        job_id, rnd: the job and round the sites' messages must be bound to.
        roster: site name -> raw 32-byte Ed25519 public identity key of every site.
        n_values: the length of every masked vector.
        config: the job's :class:`SecAggConfig` (the sites must use the same).

    Attributes:
        rejected: ``site -> why`` of every message of this round the server dropped.
    """

    def __init__(self, job_id: str, rnd: int, roster: Mapping[str, bytes], n_values: int,
                 config: SecAggConfig = SecAggConfig()) -> None:
        self.roster = _check_roster(roster)
        _check_job_round(job_id, rnd)
        if not _is_int(n_values) or n_values < 1:
            raise ValueError(f"n_values must be an integer >= 1, got {n_values!r}")
        if not isinstance(config, SecAggConfig):
            raise ValueError(f"config must be a SecAggConfig, got {type(config).__name__}")
        self.job_id, self.round, self.n_values, self.config = job_id, int(rnd), int(n_values), config
        self.rejected: dict[str, str] = {}
        self._state: Optional[_Round] = None
        self._survivors: Optional[list[str]] = None
        self._sum: Optional[np.ndarray] = None
        self._added: list[str] = []
        self._request: Optional[tuple[list[str], list[str]]] = None
        self._finished = False

    def _where(self) -> str:
        return f"server, round {self.round}"

    @property
    def sites(self) -> list[str]:
        """The sites whose advertisements were accepted (``U1``)."""
        return list(self._state.sites) if self._state is not None else []

    @property
    def survivors(self) -> list[str]:
        """The sites whose key shares were accepted (``U2``); empty before :meth:`route_shares`."""
        return list(self._survivors or [])

    def holders(self, site: str) -> tuple[str, ...]:
        """The sites that hold shares of ``site``'s secrets (itself included)."""
        if self._state is None or site not in self._state.holders:
            raise SecAggError(f"{self._where()}: {site!r} advertised no keys this round")
        return self._state.holders[site]

    def receive_keys(self, advertised: Mapping[str, Mapping[str, str]]) -> dict[str, Mapping[str, str]]:
        """Keep the advertisements whose signature verifies against the roster for that site, job and round; return
        them (what to relay to every site). The others go into :attr:`rejected`.

        Raises:
            SecAggError: a second call, or fewer than :data:`MIN_SITES` accepted (the round cannot go on).
        """
        where = self._where()
        if self._state is not None:
            raise SecAggError(f"{where}: receive_keys was already called")
        if not isinstance(advertised, Mapping):
            raise SecAggError(f"{where}: the advertisements must map site names to advertisements")
        keys, accepted = {}, {}
        for name, ad in advertised.items():
            try:
                keys[name] = _verify_advert(str(name), ad, self.roster, self.job_id, self.round)
                accepted[name] = dict(ad)
            except SecAggError as err:
                self.rejected[str(name)] = str(err)
        for site in _reused_keys(keys):
            self.rejected[site] = f"round {self.round}: {site} advertises a public key another advertisement holds"
            keys.pop(site)
            accepted.pop(site)
        if len(keys) < MIN_SITES:
            raise SecAggError(f"{where}: {len(keys)} valid advertisement(s), at least {MIN_SITES} are needed "
                              "(the round cannot go on)")
        self._state = _Round(self.job_id, self.round, keys, self.config.neighbours)
        return accepted

    def route_shares(self, shares: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
        """``sender -> {recipient: ciphertext}`` into ``recipient -> {sender: ciphertext}`` for the survivors: the
        senders whose share set is well formed and covers exactly their holders (others into :attr:`rejected`).

        Raises:
            SecAggError: before receive_keys, a second call, or fewer than :data:`MIN_SITES` survivors.
        """
        where = self._where()
        state = self._state
        if state is None:
            raise SecAggError(f"{where}: route_shares before receive_keys")
        if self._survivors is not None:
            raise SecAggError(f"{where}: route_shares was already called")
        if not isinstance(shares, Mapping):
            raise SecAggError(f"{where}: the shares must map senders to their ciphertexts")
        survivors = []
        for sender, message in shares.items():
            if sender not in state.holders:
                self.rejected[str(sender)] = f"round {self.round}: shares from {sender!r}, which advertised no keys"
                continue
            why = check_message("shares", message)
            if why is None:
                expected = set(state.holders[sender]) - {sender}
                if set(message) != expected:
                    why = (f"the shares go to {sorted(message)}, the holders of {sender}'s secrets are "
                           f"{sorted(expected)}")
            if why:
                self.rejected[sender] = f"round {self.round}: shares of {sender}: {why}"
                continue
            survivors.append(sender)
        survivors.sort()
        if len(survivors) < MIN_SITES:
            raise SecAggError(f"{where}: {len(survivors)} site(s) shared their keys, at least {MIN_SITES} are needed "
                              "(the round cannot go on)")
        self._survivors = survivors
        routed: dict[str, dict[str, str]] = {r: {} for r in survivors}
        for sender in survivors:
            for recipient, ciphertext in shares[sender].items():
                if recipient in routed:
                    routed[recipient][sender] = ciphertext
        return routed

    def add_masked(self, site: str, masked: np.ndarray) -> None:
        """Add one survivor's masked vector (uint64, or its int64 view) to the running sum.

        Raises:
            SecAggError: not a survivor, a second vector from it, after the unmask request, or not a flat vector of
                ``n_values`` uint64/int64.
        """
        where = f"{self._where()}, masked input of {site!r}"
        if self._survivors is None or site not in self._survivors:
            raise SecAggError(f"{where}: the site is not among the survivors of the key sharing")
        if site in self._added:
            raise SecAggError(f"{where}: a second masked input")
        if self._request is not None:
            raise SecAggError(f"{where}: arrived after the unmask request")
        array = np.asarray(masked)
        signed, unsigned = _RING_DTYPES[self.config.ring_bits]
        if array.dtype not in (unsigned, signed) or array.ndim != 1 or array.size != self.n_values:
            raise SecAggError(f"{where}: expected a flat {np.dtype(unsigned).name} vector of {self.n_values} values, "
                              f"got {array.dtype} of shape {array.shape}")
        if self._sum is None:
            self._sum = np.zeros(self.n_values, dtype=unsigned)
        np.add(self._sum, array.view(unsigned), out=self._sum)
        self._added.append(site)

    def unmask_request(self) -> tuple[list[str], list[str]]:
        """``(sent, dropped)``: the survivors whose masked input arrived, and the others. The first call closes the
        intake; later calls return the same lists."""
        if self._survivors is None:
            raise SecAggError(f"{self._where()}: unmask_request before route_shares")
        if self._request is None:
            sent = sorted(self._added)
            self._request = (sent, [s for s in self._survivors if s not in set(sent)])
        return list(self._request[0]), list(self._request[1])

    def unmask_problem(self) -> Optional[str]:
        """Why the masks cannot come off with the current request even if every site that sent answers (a site whose
        holders that sent are fewer than its threshold), or None."""
        sent, dropped = self.unmask_request()
        if not sent:
            return f"round {self.round}: no masked input arrived"
        state, alive = self._state, set(sent)
        for site in sent + dropped:
            n = sum(h in alive for h in state.holders[site])
            if n < state.t[site]:
                return (f"round {self.round}: {n} holders of {site}'s shares sent, fewer than t={state.t[site]}: the "
                        "masks cannot be removed (fails closed)")
        return None

    def finish(self, reveals: Mapping[str, Mapping[str, Mapping[str, str]]]) -> np.ndarray:
        """Rebuild the self-mask seed of every site that sent and the mask key of every site that dropped from the
        revealed shares, remove their masks, and return the uint64 sum of the sent sites' quantized values
        (:func:`dequantize` it). Malformed reveals, or reveals of shares a site does not hold or was not asked for,
        are left out (into :attr:`rejected`).

        Raises:
            SecAggError: before unmask_request, a second call, no masked input, fewer than ``t`` shares for any site
                (fails closed: nothing is returned), shares that disagree, or a rebuilt mask key that is not the
                advertised one.
        """
        where = self._where()
        if self._request is None:
            raise SecAggError(f"{where}: finish before unmask_request")
        if self._finished:
            raise SecAggError(f"{where}: finish was already called")
        self._finished = True
        sent, dropped = self._request
        if not sent or self._sum is None:
            raise SecAggError(f"{where}: no masked input arrived; nothing to unmask")
        if not isinstance(reveals, Mapping):
            raise SecAggError(f"{where}: the reveals must map sites to their unmask replies")
        state = self._state
        wanted = {"b": set(sent), "sk": set(dropped)}
        collected: dict[str, dict[str, dict[int, bytes]]] = {"b": {s: {} for s in sent}, "sk": {s: {} for s in dropped}}
        for revealer, reply in reveals.items():
            if revealer not in wanted["b"]:
                self.rejected[str(revealer)] = f"round {self.round}: a reveal from {revealer!r}, which did not send"
                continue
            why = check_message("reveal", reply)
            if why is None:
                for kind in ("b", "sk"):
                    stray = sorted(s for s in reply[kind]
                                   if s not in wanted[kind] or revealer not in state.holders[s])
                    if stray:
                        why = f"{kind} shares of {stray}, which it was not asked for or does not hold"
                        break
            if why:
                self.rejected[revealer] = f"round {self.round}: the reveal of {revealer}: {why}"
                continue
            for kind in ("b", "sk"):
                for owner, text in reply[kind].items():
                    collected[kind][owner][state.x[revealer]] = bytes.fromhex(text)
        for kind, label in (("b", "self-mask seed"), ("sk", "mask key")):
            for owner, shares in collected[kind].items():
                if len(shares) < state.t[owner]:
                    raise SecAggError(f"{where}: {len(shares)} shares of the {label} of {owner}, fewer than "
                                      f"t={state.t[owner]} shares: the masks cannot be removed, the round fails closed")
        seeds = {}
        for owner in sent:
            seed = shamir_combine(collected["b"][owner], state.t[owner])
            if len(seed) != KEY_BYTES:
                raise SecAggError(f"{where}: the self-mask seed of {owner} rebuilt to {len(seed)} bytes")
            seeds[owner] = seed
        keys = {}
        for owner in dropped:
            raw = shamir_combine(collected["sk"][owner], state.t[owner])
            try:
                key = X25519PrivateKey.from_private_bytes(raw)
            except ValueError:
                key = None
            if key is None or _raw_public(key) != state.keys[owner][1]:
                raise SecAggError(f"{where}: the mask key of {owner} rebuilt from its shares is not the key it "
                                  "advertised (wrong shares)")
            keys[owner] = key
        total = self._sum.copy()
        for owner in sent:
            np.subtract(total, prg(seeds[owner], self.n_values, self.config.ring_bits), out=total)
        alive = set(sent)
        for owner in dropped:
            for v in state.graph[owner]:
                if v not in alive:
                    continue
                mask = prg(_mask_seed(self.job_id, self.round, keys[owner], state.keys[v][1], owner, v),
                           self.n_values, self.config.ring_bits)
                # v added +mask if v < owner, else -mask: take back what it added
                (np.subtract if v < owner else np.add)(total, mask, out=total)
        return total
