"""Privacy tools for the shared update: homomorphic encryption for an additions-only server, client-level DP of
the update and sample-level DP-SGD.

The names below load their module on first use (PEP 562): a site's parent process imports
``fedoap.privacy.budget`` to vet a job within NVFlare's deployment timeout, and must not pay for torch, Opacus and
TenSEAL there.
"""

import importlib

_EXPORTS = {
    "he": ("CLIENT_CONTEXT_FILE", "HE_KEY_PREFIX", "SERVER_CONTEXT_FILE", "EncryptedUpdate", "HEConfig", "PackedLayout",
           "add_encrypted", "create_contexts", "decrypt_average", "encrypt_per_layer", "encrypt_update", "from_params",
           "is_encrypted", "load_context", "pack", "to_params", "unpack", "write_contexts"),
    "dp": ("DPSGD", "DPSGDConfig", "UpdateDPAccountant", "UpdateDPConfig", "clip_and_noise", "noise_for_epsilon",
           "per_sample_loss", "update_dp_epsilon"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
