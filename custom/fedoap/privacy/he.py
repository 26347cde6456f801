"""Homomorphic encryption (TenSEAL CKKS) of the shared update, for a server that only adds.

Protocol. Client ``k`` packs its shared tensors into one flat vector, multiplies it by its weight ``n_k`` (sample
count, sent in clear) and encrypts it in slot-size chunks (:func:`encrypt_update`). The server adds the ciphertexts
chunk by chunk with a context that holds no secret key (:func:`add_encrypted`), so it learns nothing but the weights.
Every client decrypts the sum and divides it by ``sum(n_k)`` (:func:`decrypt_average`).

Why this is smaller than NVFlare's stock HE (``HEModelEncryptor`` + HEBuilder, 14.4x the float32 bytes):

- the server never multiplies, so no ciphertext needs a spare prime for a rescale: with coefficient moduli
  ``(40, 30)`` a ciphertext carries one 40-bit prime (the last prime is the key-switching prime, never part of a
  ciphertext), about 5.8x the float32 bytes after TenSEAL's built-in compression;
- all tensors go into as few CKKS vectors as the slot count allows, instead of one vector (at least one whole
  ciphertext, 0.1-0.24 MB) per tensor.

Precision is absolute, not relative: CKKS adds noise of about ``2**12 / 2**global_scale_bits`` to the decrypted
weighted sum (measured maximum over 30 summed ciphertexts; fresh symmetric encryption is about 2**10), and
``|sum_k n_k * w|`` must stay below :attr:`HEConfig.max_abs_sum`, otherwise the sum wraps around modulo the
ciphertext modulus and decrypts to garbage. To catch that (and a client that used another key pair), every client
appends one check value, its weight, to the packed vector; :func:`decrypt_average` raises unless that slot decrypts
to the total weight. See :class:`HEConfig` for the chosen trade-off.

Security notes: the client context is the same for every client (as NVFlare's provisioning makes it), so any client
that saw another's ciphertext could decrypt it; only the server is kept blind. A decrypted CKKS result carries the
encryption noise, from which an attacker who also holds the ciphertext can learn about the key (Li and Micciancio,
EUROCRYPT 2021): never send decrypted values (before local training changed them) back to the server.

Transport: NVFlare's PyTorch Client API carries only tensors and arrays in ``FLModel.params``, so
:func:`to_params`/:func:`from_params` turn an :class:`EncryptedUpdate` into uint8/float64 arrays and back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import tenseal as ts

from fedoap.files import write_atomic

__all__ = [
    "SERVER_CONTEXT_FILE",
    "CLIENT_CONTEXT_FILE",
    "HE_KEY_PREFIX",
    "HEConfig",
    "PackedLayout",
    "EncryptedUpdate",
    "create_contexts",
    "write_contexts",
    "load_context",
    "pack",
    "unpack",
    "encrypt_update",
    "add_encrypted",
    "load_ciphertexts",
    "decrypt_average",
    "encrypt_per_layer",
    "to_params",
    "from_params",
    "is_encrypted",
]

#: file names of the contexts (NVFlare's ``HEBuilder`` names; the sites' key ceremony, ``fedoap.privacy.he_keys``,
#: writes them into each participant's ``local/`` folder)
SERVER_CONTEXT_FILE = "server_context.tenseal"
CLIENT_CONTEXT_FILE = "client_context.tenseal"

#: prefix of every key :func:`to_params` puts into ``FLModel.params``
HE_KEY_PREFIX = "__he__."
_HEADER_KEY = HE_KEY_PREFIX + "header"
_WEIGHT_KEY = HE_KEY_PREFIX + "weight"
_CHUNK_PREFIX = HE_KEY_PREFIX + "ct."
_FORMAT = "fedoap-he-ckks/1"

#: largest total coefficient-modulus bits that keep 128-bit security (HomomorphicEncryption.org standard, as SEAL)
_MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: below this scale the CKKS noise (about 2**12 after summing 30 ciphertexts) swamps values of order 1
_MIN_SCALE_BITS = 14

ContextLike = Union[ts.Context, bytes]

@dataclass(frozen=True)
class HEConfig:
    """CKKS parameters for a server that only adds ciphertexts.

    The defaults were measured for this project's value range (weights 1e-3..~4, ``n_k`` up to 1000, up to 30
    clients). ``(40, 30)``: a ciphertext carries one 40-bit prime, 5.8x the float32 bytes (``(41, 30)`` is 5.9x
    before the padding of the last chunk, ``(60, 40)`` 8.0x). ``global_scale_bits=21`` leaves
    ``max_abs_sum = 2**(40 - 2 - 21) = 131072`` for ``|sum_k n_k * w|`` (30 clients x 1000 samples x ``|w|`` up to
    4.4) while the decrypted sum keeps an absolute error of at most about ``2**(12 - 21) = 2e-3``, i.e.
    ``2e-3 / sum(n_k)`` on the average. The budget is fixed (``max_abs_sum`` over the error is about ``2**26``), so
    the scale only places the window: a federation that knows its total weight is small, or passes normalized
    weights (``n_k / U`` with a unit ``U`` agreed in clear, e.g. the last round's total), can raise
    ``global_scale_bits`` for precision; one with larger totals must lower it.

    Args:
        poly_modulus_degree: ring dimension N; a ciphertext holds N / 2 values. Power of two, 1024..32768.
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes. All but the last are carried by every
            ciphertext (they set its size and headroom); the last one is only used for key switching.
        global_scale_bits: values are encoded times ``2**global_scale_bits``.

    Raises:
        ValueError: parameters TenSEAL would reject, that break 128-bit security, or that leave no headroom.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (40, 30)
    global_scale_bits: int = 21

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in _MAX_COEFF_BITS_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(_MAX_COEFF_BITS_128)}, got {n!r}")
        sizes = tuple(int(b) for b in self.coeff_mod_bit_sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", sizes)
        if len(sizes) < 2:
            raise ValueError(
                f"coeff_mod_bit_sizes needs at least 2 primes (data primes + the key-switching prime), got {sizes}"
            )
        if any(not 20 <= b <= 60 for b in sizes):
            raise ValueError(f"every coefficient-modulus prime must have 20..60 bits, got {sizes}")
        if sum(sizes) > _MAX_COEFF_BITS_128[n]:
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes} total {sum(sizes)} bits, more than the {_MAX_COEFF_BITS_128[n]} bits "
                f"that keep 128-bit security at poly_modulus_degree {n}"
            )
        s = self.global_scale_bits
        if not _MIN_SCALE_BITS <= s <= self.data_bits - 2:
            raise ValueError(
                f"global_scale_bits must be in {_MIN_SCALE_BITS}..{self.data_bits - 2} for ciphertexts of "
                f"{self.data_bits} bits (noise below, no headroom above), got {s!r}"
            )

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext carries (all primes but the key-switching one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def slots(self) -> int:
        """Values per CKKS vector."""
        return self.poly_modulus_degree // 2

    @property
    def max_abs_sum(self) -> float:
        """Bound on ``|weight * value|`` per client and on ``|sum_k weight_k * value|``, the total weight included.

        Below it a value always encodes, and a sum always decrypts, since a ciphertext modulus of ``b`` bits
        exceeds ``2**(b - 1)`` and decoding is exact up to half of it.
        """
        return 2.0 ** (self.data_bits - 2 - self.global_scale_bits)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HEConfig:
        unknown = sorted(set(data) - {"poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits"})
        if unknown:
            raise ValueError(f"unknown HEConfig field(s): {unknown}")
        d = dict(data)
        if "coeff_mod_bit_sizes" in d:
            d["coeff_mod_bit_sizes"] = tuple(d["coeff_mod_bit_sizes"])
        return cls(**d)

# ----------------------------------------------------------------------------------------------------- contexts

def create_contexts(config: HEConfig = HEConfig()) -> tuple[bytes, bytes]:
    """A fresh key pair as serialized TenSEAL contexts: ``(server_context, client_context)``.

    Encryption is symmetric (as NVFlare's HEBuilder makes it): clients hold the secret key anyway, and symmetric
    CKKS encryption has about 8x less noise than public-key encryption, which the tight headroom needs. No
    relinearization or Galois keys are made, since the server only adds; the server context is therefore tiny.
    """
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=config.poly_modulus_degree,
        coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.global_scale = 2.0**config.global_scale_bits
    keys = {"save_public_key": False, "save_galois_keys": False, "save_relin_keys": False}
    return ctx.serialize(save_secret_key=False, **keys), ctx.serialize(save_secret_key=True, **keys)

def _write_new(path: Path, data: bytes, mode: int) -> None:
    write_atomic(path, data, mode)  # a unique temp file with ``mode`` set whatever the umask

def write_contexts(
    out_dir: str | os.PathLike, config: HEConfig = HEConfig(), overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``server_context.tenseal`` and ``client_context.tenseal`` (the client one readable by the owner only).

    Args:
        out_dir: folder to write into (created if missing).
        config: CKKS parameters.
        overwrite: replace existing files. Off by default: a new key pair makes every ciphertext made with the old
            one undecryptable, and clients holding the old client context could no longer join.

    Returns:
        ``(server_path, client_path)``.

    Raises:
        FileExistsError: a context file exists and ``overwrite`` is False (nothing is written then).
    """
    out = Path(out_dir)
    server_path, client_path = out / SERVER_CONTEXT_FILE, out / CLIENT_CONTEXT_FILE
    if not overwrite:
        for p in (server_path, client_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace the key pair")
    out.mkdir(parents=True, exist_ok=True)
    server, client = create_contexts(config)
    _write_new(server_path, server, 0o644)
    _write_new(client_path, client, 0o600)
    return server_path, client_path

def load_context(path: str | os.PathLike) -> ts.Context:
    """Read a serialized TenSEAL context.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a TenSEAL context (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TenSEAL context file {path} does not exist")
    data = path.read_bytes()
    try:
        return ts.context_from(data)
    except Exception as err:  # TenSEAL raises ValueError/RuntimeError from C++
        raise ValueError(f"{path} is not a valid TenSEAL context ({len(data)} bytes): {err}") from err

def _as_context(context: ContextLike) -> ts.Context:
    if isinstance(context, ts.Context):
        return context
    if isinstance(context, (bytes, bytearray, memoryview)):
        try:
            return ts.context_from(bytes(context))
        except Exception as err:
            raise ValueError(f"bytes given as context are not a serialized TenSEAL context: {err}") from err
    raise TypeError(f"context must be a tenseal.Context or its serialized bytes, got {type(context).__name__}")

def _slot_count(ctx: ts.Context) -> int:
    return ctx.data.seal_context().first_context_data().parms().poly_modulus_degree() // 2

def _max_abs_sum(ctx: ts.Context) -> float:
    """:attr:`HEConfig.max_abs_sum` of a context: a quarter of the smallest modulus of that many bits, unscaled."""
    bits = ctx.data.seal_context().first_context_data().total_coeff_modulus_bit_count()
    return 2.0 ** (bits - 2) / ctx.global_scale

def _check_tolerance(ctx: ts.Context) -> float:
    """Allowed error of the check slot: 16x the measured noise of 30 summed ciphertexts (grows as sqrt(count))."""
    return 2.0**16 / ctx.global_scale

def _can_encrypt(ctx: ts.Context) -> bool:
    if ctx.has_secret_key():
        return True
    try:
        return bool(ctx.has_public_key())
    except ValueError:  # symmetric context without the secret key
        return False

# ------------------------------------------------------------------------------------------------------ packing

@dataclass
class PackedLayout:
    """Where each tensor lives in the packed vector: tensors in ``keys`` order, each flattened C-order."""

    keys: list[str]
    shapes: list[tuple[int, ...]]

    def __post_init__(self) -> None:
        self.keys = [str(k) for k in self.keys]
        self.shapes = [tuple(int(d) for d in s) for s in self.shapes]
        if len(self.keys) != len(self.shapes):
            raise ValueError(f"layout has {len(self.keys)} keys but {len(self.shapes)} shapes")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("layout keys are not unique")
        if any(d < 0 for s in self.shapes for d in s):
            raise ValueError("layout shapes must not have negative dimensions")

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def n_values(self) -> int:
        return sum(self.sizes)

    def to_json(self) -> str:
        return json.dumps({"keys": self.keys, "shapes": [list(s) for s in self.shapes]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> PackedLayout:
        """Raises ValueError if ``text`` is not a layout written by :meth:`to_json`."""
        try:
            data = json.loads(text)
            shapes = data["shapes"]
            if not all(isinstance(s, list) and all(_is_count(d) for d in s) for s in shapes):
                raise ValueError("every shape must be a list of whole numbers >= 0")
            return cls(keys=list(data["keys"]), shapes=[tuple(s) for s in shapes])
        except (ValueError, TypeError, KeyError, OverflowError) as err:
            raise ValueError(f"not a packed-layout JSON: {err}") from err

def _is_count(value: Any) -> bool:
    """A JSON whole number >= 0 (not a bool, not a float such as ``Infinity``)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        value = value.double() if value.is_floating_point() else value
        value = value.numpy()
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"{key!r} has dtype {arr.dtype}; CKKS encrypts real values only, leave integer buffers out of the "
            "shared set"
        )
    return arr

def pack(params: Mapping[str, Any]) -> tuple[np.ndarray, PackedLayout]:
    """Flatten all tensors (numpy arrays or torch tensors) into one float64 vector, keys sorted.

    Raises:
        ValueError: no tensors, a non-floating dtype, or a NaN/Inf value (named by key).
    """
    if not params:
        raise ValueError("nothing to pack: the parameter mapping is empty")
    keys = sorted(params)
    arrays = [_to_numpy(k, params[k]) for k in keys]
    for k, a in zip(keys, arrays):
        if not np.isfinite(a).all():
            raise ValueError(f"{k!r} contains NaN or Inf")
    layout = PackedLayout(keys=keys, shapes=[a.shape for a in arrays])
    flat = np.concatenate([a.ravel().astype(np.float64, copy=False) for a in arrays])
    return flat, layout

def unpack(flat: np.ndarray, layout: PackedLayout) -> dict[str, np.ndarray]:
    """Split a packed vector back into float32 tensors.

    Raises:
        ValueError: the vector's length does not match the layout.
    """
    flat = np.asarray(flat).ravel()
    if flat.size != layout.n_values:
        raise ValueError(f"packed vector has {flat.size} values, layout expects {layout.n_values}")
    out, start = {}, 0
    for key, shape, size in zip(layout.keys, layout.shapes, layout.sizes):
        out[key] = flat[start : start + size].astype(np.float32).reshape(shape)
        start += size
    return out

# --------------------------------------------------------------------------------------------------- encryption

@dataclass
class EncryptedUpdate:
    """One client's encrypted, weight-multiplied update, or the server's sum of several.

    Args:
        ciphertexts: serialized CKKS vectors, the packed vector in slot-size chunks; the vector holds the
            ``n_values`` parameter values times the weight, then one check value (the weight itself).
        layout: how to unpack the decrypted vector.
        weight: the weight the values were multiplied by (for a sum: the sum of weights); in clear.
        n_values: number of parameter values (``layout.n_values``).
        count: number of client updates summed into this one.
    """

    ciphertexts: list[bytes]
    layout: PackedLayout
    weight: float
    n_values: int
    count: int = 1

    def __post_init__(self) -> None:
        self.weight = float(self.weight)
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be a positive finite number, got {self.weight!r}")
        if self.n_values != self.layout.n_values:
            raise ValueError(f"n_values is {self.n_values} but the layout holds {self.layout.n_values} values")
        if not self.ciphertexts:
            raise ValueError("an encrypted update needs at least one ciphertext")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")

    @property
    def nbytes(self) -> int:
        """Ciphertext bytes (what dominates the upload)."""
        return sum(len(c) for c in self.ciphertexts)

def encrypt_update(params: Mapping[str, Any], weight: float, context: ContextLike) -> EncryptedUpdate:
    """Client side: pack, multiply by ``weight`` (before encryption, so the server need not multiply), encrypt.

    Args:
        params: the shared tensors (numpy arrays or torch tensors).
        weight: the client's aggregation weight, e.g. its number of training samples; sent in clear.
        context: the client context (with the secret key), or its bytes.

    Raises:
        ValueError: bad params or weight, a context that cannot encrypt, or weighted values beyond the
            ciphertext headroom (they would wrap around).
    """
    ctx = _as_context(context)
    if not _can_encrypt(ctx):
        raise ValueError("this context cannot encrypt (no secret or public key): use the client context")
    if not (isinstance(weight, (int, float, np.integer, np.floating)) and math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a positive finite number, got {weight!r}")
    flat, layout = pack(params)
    if flat.size == 0:
        raise ValueError("nothing to encrypt: every tensor is empty")
    n_values = flat.size
    vector = np.append(flat * float(weight), float(weight))  # the last slot is the check value
    limit = _max_abs_sum(ctx)
    peak = float(np.abs(vector).max())
    if peak >= limit:
        raise ValueError(
            f"weight x value reaches {peak:.4g}, beyond the CKKS headroom {limit:.4g} of this context: lower "
            "global_scale_bits or the weight"
        )
    slots = _slot_count(ctx)
    chunks = [ts.ckks_vector(ctx, vector[i : i + slots]).serialize() for i in range(0, vector.size, slots)]
    return EncryptedUpdate(ciphertexts=chunks, layout=layout, weight=float(weight), n_values=n_values)

def _check_same_shape(updates: Sequence[EncryptedUpdate]) -> None:
    first = updates[0]
    for i, u in enumerate(updates[1:], start=1):
        if u.layout != first.layout:
            a, b = first.layout, u.layout
            diff = sorted(set(a.keys) ^ set(b.keys))
            if diff:
                detail = f"key {diff[0]!r} is in one layout only"
            else:
                key = next(
                    (k for k, s, t in zip(a.keys, a.shapes, b.shapes) if s != t), a.keys[0] if a.keys else ""
                )
                detail = f"{key!r} has shape {b.shapes[b.keys.index(key)]}, expected {a.shapes[a.keys.index(key)]}"
            raise ValueError(f"update {i} has a different layout than update 0: {detail}")
        if len(u.ciphertexts) != len(first.ciphertexts):
            raise ValueError(
                f"update {i} has {len(u.ciphertexts)} ciphertext chunks, update 0 has {len(first.ciphertexts)} "
                "(different CKKS slot counts?)"
            )

def add_encrypted(updates: Sequence[EncryptedUpdate], server_context: ContextLike) -> EncryptedUpdate:
    """Server side: the chunk-wise sum of the clients' ciphertexts, and the sum of their (clear) weights.

    Works with the server context, which holds no secret key: the server never sees a plaintext value.

    Raises:
        ValueError: no updates, layouts or chunk counts that differ, or ciphertexts that do not belong to the
            context's parameters (the message names the update and chunk).
    """
    if not updates:
        raise ValueError("no encrypted updates to add")
    ctx = _as_context(server_context)
    _check_same_shape(updates)
    out = []
    for c in range(len(updates[0].ciphertexts)):
        acc = None
        for i, u in enumerate(updates):
            try:
                vec = ts.ckks_vector_from(ctx, u.ciphertexts[c])
                if acc is None:
                    acc = vec
                else:
                    acc.add_(vec)
            except (ValueError, RuntimeError) as err:
                raise ValueError(f"update {i}, chunk {c}: cannot add this ciphertext: {err}") from err
        out.append(acc.serialize())
    first = updates[0]
    return EncryptedUpdate(
        ciphertexts=out,
        layout=first.layout,
        weight=math.fsum(u.weight for u in updates),
        n_values=first.n_values,
        count=sum(u.count for u in updates),
    )

def load_ciphertexts(update: EncryptedUpdate, context: ContextLike) -> list[ts.CKKSVector]:
    """Server side: every chunk of one update as a CKKS vector of ``context``, checked as far as a context without
    the secret key can: each chunk parses, is no larger than a ciphertext of these parameters can be, and holds the
    values the layout puts into it. What passes can be added to other such updates without an error (a random or
    foreign ciphertext fails here, for its sender alone, not when the round's sum is formed).

    Raises:
        ValueError: the wrong number of chunks, an oversized chunk, one that does not parse under ``context``, or one
            with another number of values (the message names the chunk).
    """
    ctx = _as_context(context)
    slots = _slot_count(ctx)
    total = update.n_values + 1  # the values and the check value
    if len(update.ciphertexts) != -(-total // slots):
        raise ValueError(f"{len(update.ciphertexts)} ciphertext chunks for {total} values, expected "
                         f"{-(-total // slots)} at {slots} slots each")
    parms = ctx.data.seal_context().key_context_data()
    # two polynomials of N coefficients, 8 bytes for each prime (at most one per 20 bits), and room for the headers
    limit = 2 * parms.parms().poly_modulus_degree() * 8 * max(1, parms.total_coeff_modulus_bit_count() // 20) + 65536
    vectors = []
    for c, blob in enumerate(update.ciphertexts):
        if len(blob) > limit:
            raise ValueError(f"chunk {c} has {len(blob)} bytes, more than a ciphertext of this context ({limit})")
        try:
            vector = ts.ckks_vector_from(ctx, blob)
            size = vector.size()
        except Exception as err:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError/TypeError from C++
            raise ValueError(f"chunk {c} is not a ciphertext of this context: {err}") from None
        if size != min(slots, total - c * slots):
            raise ValueError(f"chunk {c} holds {size} values, expected {min(slots, total - c * slots)}")
        vectors.append(vector)
    return vectors

def decrypt_average(aggregate: EncryptedUpdate, client_context: ContextLike) -> dict[str, np.ndarray]:
    """Client side: decrypt the sum, divide by the summed weight, unpack into float32 tensors.

    Raises:
        ValueError: a context without the secret key, a chunk that does not decrypt, or a check value that is not
            the total weight, which means the sum wrapped around (weights x values beyond ``max_abs_sum``) or a
            client encrypted with another key pair.
    """
    ctx = _as_context(client_context)
    if not ctx.has_secret_key():
        raise ValueError("this context holds no secret key: decrypting needs the client context")
    parts = []
    for c, blob in enumerate(aggregate.ciphertexts):
        try:
            parts.append(np.asarray(ts.ckks_vector_from(ctx, blob).decrypt(), dtype=np.float64))
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"chunk {c} does not decrypt with this context: {err}") from err
    total = np.concatenate(parts)
    if total.size != aggregate.n_values + 1:
        raise ValueError(
            f"ciphertexts hold {total.size} values, the update declares {aggregate.n_values} plus the check value"
        )
    check = float(total[-1])
    if not abs(check - aggregate.weight) <= _check_tolerance(ctx):
        raise ValueError(
            f"decryption check failed: the check slot reads {check:.6g}, expected the total weight "
            f"{aggregate.weight:.6g}; the weighted sum exceeded the CKKS headroom {_max_abs_sum(ctx):.4g} and wrapped "
            "around (lower global_scale_bits or the weights), or a client used another key pair"
        )
    return unpack(total[:-1] / aggregate.weight, aggregate.layout)

def encrypt_per_layer(params: Mapping[str, Any], context: ContextLike) -> list[bytes]:
    """Baseline for benchmarks: NVFlare's ``HEModelEncryptor`` layout, one CKKS vector per tensor.

    A tensor larger than the slot count costs ``ceil(size / slots)`` ciphertexts, exactly what TenSEAL makes for
    one oversized vector; they are made piecewise here (one bytes each) only to avoid TenSEAL printing a warning
    per tensor. No weighting: only bytes and time are compared.
    """
    ctx = _as_context(context)
    slots = _slot_count(ctx)
    out = []
    for key in sorted(params):
        values = _to_numpy(key, params[key]).ravel().astype(np.float64, copy=False)
        for i in range(0, values.size, slots):
            out.append(ts.ckks_vector(ctx, values[i : i + slots]).serialize())
    return out

# ---------------------------------------------------------------------------------------------------- transport

def to_params(update: EncryptedUpdate) -> dict[str, np.ndarray]:
    """An encrypted update as numpy arrays for ``FLModel.params``.

    Keys: ``__he__.ct.0000``... (uint8, one ciphertext chunk each), ``__he__.header`` (uint8, JSON with the
    layout, ``n_values`` and ``count``) and ``__he__.weight`` (float64, shape ``(1,)``).
    """
    width = max(4, len(str(len(update.ciphertexts) - 1)))
    out = {
        f"{_CHUNK_PREFIX}{i:0{width}d}": np.frombuffer(c, dtype=np.uint8).copy()
        for i, c in enumerate(update.ciphertexts)
    }
    header = {
        "format": _FORMAT,
        "layout": json.loads(update.layout.to_json()),
        "n_values": update.n_values,
        "count": update.count,
        "n_chunks": len(update.ciphertexts),
    }
    out[_HEADER_KEY] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8).copy()
    out[_WEIGHT_KEY] = np.array([update.weight], dtype=np.float64)
    return out

def is_encrypted(params: Mapping[str, Any]) -> bool:
    """Whether ``params`` carry an encrypted update made by :func:`to_params`."""
    return _HEADER_KEY in params

def _as_array(key: str, value: Any) -> np.ndarray:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(value), dtype=np.uint8)
    if hasattr(value, "detach"):  # torch.Tensor (the PyTorch Client API hands tensors over)
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{key!r} must be an array or tensor, got {type(value).__name__}")
    return value

def _uint8_bytes(key: str, value: Any) -> bytes:
    arr = _as_array(key, value)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"{key!r} must be a 1-D uint8 array, got dtype {arr.dtype} and shape {arr.shape}")
    return arr.tobytes()

def from_params(params: Mapping[str, Any]) -> EncryptedUpdate:
    """Inverse of :func:`to_params`; accepts numpy arrays, torch tensors or bytes.

    Raises:
        ValueError: a missing header or weight, an unknown key (a plaintext value next to ciphertexts would leak),
            a gap in the chunk numbering, or a header that does not match the chunks.
    """
    if not is_encrypted(params):
        raise ValueError(f"params carry no encrypted update: {_HEADER_KEY!r} is missing")
    if _WEIGHT_KEY not in params:
        raise ValueError(f"encrypted update lacks its weight {_WEIGHT_KEY!r}")
    try:
        header = json.loads(_uint8_bytes(_HEADER_KEY, params[_HEADER_KEY]).decode("utf-8"))
        fmt, layout_data = header["format"], header["layout"]
        n_values, count, n_chunks = header["n_values"], header["count"], header["n_chunks"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"malformed encrypted-update header: {err}") from err
    # whole numbers in the JSON itself: int(Infinity) would raise OverflowError, and a huge n_chunks would be
    # enumerated below
    if not (_is_count(n_values) and _is_count(count) and _is_count(n_chunks)):
        raise ValueError(f"malformed encrypted-update header: n_values, count and n_chunks must be whole numbers "
                         f">= 0, got {n_values!r}, {count!r}, {n_chunks!r}")
    if fmt != _FORMAT:
        raise ValueError(f"encrypted update has format {fmt!r}, expected {_FORMAT!r}")
    layout = PackedLayout.from_json(json.dumps(layout_data))

    weight = _as_array(_WEIGHT_KEY, params[_WEIGHT_KEY])
    if weight.size != 1 or not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"{_WEIGHT_KEY!r} must hold one float, got dtype {weight.dtype} and shape {weight.shape}")

    chunks: dict[int, bytes] = {}
    for key, value in params.items():
        if key in (_HEADER_KEY, _WEIGHT_KEY):
            continue
        index = key[len(_CHUNK_PREFIX) :]
        if not key.startswith(_CHUNK_PREFIX) or not index.isdigit():
            raise ValueError(f"unexpected key {key!r} next to an encrypted update")
        if int(index) in chunks:
            raise ValueError(f"ciphertext chunk {int(index)} appears twice (key {key!r})")
        chunks[int(index)] = _uint8_bytes(key, value)
    # the count first: the header's n_chunks is never enumerated beyond the chunks that are there
    if len(chunks) != n_chunks or any(i not in chunks for i in range(n_chunks)):
        missing = [i for i in range(min(n_chunks, len(chunks) + 3)) if i not in chunks][:3]
        raise ValueError(
            f"expected ciphertext chunks 0..{n_chunks - 1}, got {len(chunks)} (missing e.g. {missing}, "
            f"extra e.g. {sorted(i for i in chunks if i >= n_chunks)[:3]})"
        )
    return EncryptedUpdate(
        ciphertexts=[chunks[i] for i in range(n_chunks)],
        layout=layout,
        weight=float(weight.reshape(-1)[0]),
        n_values=n_values,
        count=count,
    )
