"""Randomness that protects: noise and sampling that no one but the site can predict.

DP holds only if the adversary cannot regenerate the noise. A generator seeded from job arguments (the job's seed, the
site's name) lets whoever reads the job configuration replay the stream and subtract it exactly; so every draw that
protects comes from here, keyed by the operating system's entropy (``os.urandom``), fresh for every call and never
recorded. Reproducibility of everything else (initialization, shuffling, augmentation) keeps using the job's seed.

Two tools:

* :func:`secure_normal`: Gaussian noise from a cryptographic stream cipher (ChaCha20 from ``cryptography``, keyed
  with 256 fresh bits per call), turned into normals by the Box-Muller transform in float64. As Opacus does in its
  ``secure_mode``, each value is the sum of four independent normals divided by two (the same distribution), which
  blurs the floating-point artefacts of a single transform that an attacker could otherwise use to tell noise values
  apart (Mironov, CCS 2012; Holohan and Braghin, 2021).
* :func:`os_seeded_generator`: a ``torch.Generator`` seeded with 63 fresh bits from ``secrets``, for the libraries
  that only accept a torch generator (Opacus's Poisson sampler and gradient noise without ``torchcsprng``). The seed
  cannot be guessed (2**63 candidates) and is never stored; reseed per round with :func:`reseed` so that one seed
  never drives more than one round's draws.
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["secure_normal", "os_seeded_generator", "reseed"]

_CHUNK = 1 << 20  # normals per cipher call: bounds the temporary memory to ~40 MB whatever the tensor's size
_COUNTER_START = bytes(4)  # the stream's first block counter (little endian): 0
#: what one stream gives before its 32-bit block counter wraps: a chunk of m values reads ceil(m / 2) 64-byte blocks
#: (four normals per value, each half of a Box-Muller pair of two 8-byte uniforms), so n values at most n / 2 + 1
_MAX_VALUES = 2 * ((1 << 32) - 1)
_TWO_PI = 2.0 * math.pi


def _uniform_open(cipher_stream, n: int) -> np.ndarray:
    """``n`` float64 uniforms in (0, 1] from 53 random bits each (0 excluded: Box-Muller takes its logarithm)."""
    words = np.frombuffer(cipher_stream.update(bytes(8 * n)), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / (1 << 53))


def _standard_normals(cipher_stream, n: int) -> np.ndarray:
    """``n`` independent N(0, 1) float64 values (Box-Muller: both outputs of every pair are used)."""
    pairs = (n + 1) // 2
    u1, u2 = _uniform_open(cipher_stream, pairs), _uniform_open(cipher_stream, pairs)
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(_TWO_PI * u2), radius * np.sin(_TWO_PI * u2)])[:n]


def secure_normal(shape: Sequence[int] | torch.Size, std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU tensor of i.i.d. ``N(0, std^2)`` values drawn from a ChaCha20 stream keyed by ``os.urandom`` (a fresh
    key and nonce per call, never stored).

    Args:
        shape: the tensor's shape.
        std: the standard deviation, finite and ``>= 0`` (0 gives zeros without drawing).
        dtype: a floating-point dtype of the result.

    Raises:
        ValueError: ``std`` is negative or not finite, ``dtype`` is not floating point, or more values than one stream
            gives (8 G).
    """
    if not isinstance(std, (int, float)) or isinstance(std, bool) or not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be floating point, got {dtype}")
    n = int(np.prod(tuple(shape), dtype=np.int64))
    if n > _MAX_VALUES:
        raise ValueError(f"shape {tuple(shape)}: {n} values exceed one stream's {_MAX_VALUES}; draw in parts")
    out = torch.empty(n, dtype=dtype)
    if std == 0 or n == 0:
        return out.zero_().reshape(tuple(shape))
    # cryptography's 16-byte ChaCha20 nonce is RFC 7539's 32-bit little-endian block counter, then a 96-bit nonce: the
    # counter starts at 0 (a random one started within the draw's length of 2**32 with probability blocks / 2**32,
    # and the cipher then refuses to go on: 0.6% of the steps of the authors' 49.5 M-parameter network), which leaves
    # 2**32 blocks (256 GiB, 8 G values) per call; the key is fresh per call, the random nonce is extra
    stream = Cipher(algorithms.ChaCha20(os.urandom(32), _COUNTER_START + os.urandom(12)), mode=None).encryptor()
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        total = _standard_normals(stream, m)
        for _ in range(3):  # sum of four N(0, 1) is N(0, 4): halve it (Opacus's secure_mode does the same)
            total += _standard_normals(stream, m)
        out[start:start + m] = torch.from_numpy(total * (0.5 * std))
    return out.reshape(tuple(shape))


def os_seeded_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with 63 bits from the OS (``secrets``); the seed is not kept."""
    return reseed(torch.Generator(device=device))


def reseed(generator: torch.Generator) -> torch.Generator:
    """Reseed ``generator`` in place from the OS's entropy (e.g. at every round); returns it."""
    generator.manual_seed(secrets.randbits(63))
    return generator
