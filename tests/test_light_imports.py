"""Start-up cost on the critical path of every job: the server's workflow builds no network and computes no loss, so
it must not load MONAI (about 3 s of imports); a site that trains without DP-SGD must not load Opacus (about 1.3 s).
Checked in fresh processes, the way NVFlare starts them."""

import subprocess
import sys

import pytest


def _loaded(module: str, names: tuple[str, ...]) -> dict[str, bool]:
    code = (f"import sys, {module}; "
            f"print(','.join(str(n in sys.modules) for n in {names!r}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return dict(zip(names, (v == "True" for v in out.strip().split(","))))


@pytest.mark.parametrize("module", ["fedoap.server.controller", "fedoap.methods"])
def test_the_server_loads_neither_monai_nor_opacus(module):
    assert _loaded(module, ("monai", "opacus")) == {"monai": False, "opacus": False}


def test_a_site_loads_opacus_only_for_dp_sgd():
    assert _loaded("fedoap.site.client", ("opacus", "torch")) == {"opacus": False, "torch": True}

