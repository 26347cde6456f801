"""A personalized model file describes itself (its card) and can be opened without trusting it: no pickle, no class
outside fedoap.networks, no weights forced into a network of another shape, no clear-text read of an encrypted file."""

import json
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from fedoap.config import RunConfig
from fedoap.data.normalization import normalization_for
from fedoap.inference.model_file import (CARD_KEY, ModelCard, Preprocessing, load_model, load_weights_into,
                                         read_card, save_model)
from fedoap.privacy.at_rest import AtRestError
from fedoap.site.outputs import model_bytes

KEY, OTHER_KEY = bytes(range(32)), bytes(range(1, 33))
#: a module that records being imported: a card must never make the loader import it
EVIL_MODULE = "fedoap_evil_card_module"


@pytest.fixture(scope="module")
def made():
    cfg = RunConfig.from_options(method="fedoap", image_size=32, width=8)
    net, method = cfg.build_model(), cfg.method.instance
    card = ModelCard(network=method.model_spec(cfg.training.model_args()),
                     preprocessing=Preprocessing(modality="MRI", organ="brain",
                                                 normalization=normalization_for("MRI", "brain"), image_size=32),
                     method={"name": "fedoap", "args": {}}, shared_keys=tuple(method.shared_keys(net)),
                     provenance={"job_id": "job-1", "site": "brain", "seed": 3, "test_dice": 0.5})
    torch.manual_seed(7)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    return cfg, card, state


def _write_raw(path, state, card_json):
    """A file written around the card checks (as a hostile tool would)."""
    path.write_bytes(model_bytes(state, {CARD_KEY: card_json}))
    return path


def test_card_and_weights_round_trip(made, tmp_path):
    _, card, state = made
    path = save_model(tmp_path / "m.safetensors", state, card)
    assert read_card(path) == card
    loaded = load_model(path)
    assert loaded.card == card and loaded.card.provenance["seed"] == 3
    assert not loaded.network.training
    assert type(loaded.network).__name__ == card.network["class_path"].rsplit(".", 1)[1]
    for k, v in loaded.network.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert set(card.local_keys(state)) == set(state) - set(card.shared_keys)


def test_weights_of_another_shape_are_refused_naming_the_file(made, tmp_path):
    cfg, card, state = made
    wider_args = RunConfig.from_options(method="fedoap", image_size=32, width=16).training.model_args()
    wider = replace(card, network=cfg.method.instance.model_spec(wider_args))
    path = _write_raw(tmp_path / "wider.safetensors", state, wider.to_json())
    with pytest.raises(ValueError, match=rf"{path}: the weights do not fit .* of another shape"):
        load_model(path)
    with pytest.raises(ValueError, match=r"here: .*1 missing \(first: "):
        load_weights_into(cfg.build_model(), {k: v for k, v in list(state.items())[1:]}, "here")
    target = tmp_path / "never.safetensors"
    with pytest.raises(ValueError, match="do not fit"):
        save_model(target, state, wider)  # checked before anything is written
    assert not target.exists()


@pytest.mark.parametrize("class_path", ["os.system", "builtins.eval", f"{EVIL_MODULE}.Net",
                                        f"fedoap.networksx.{EVIL_MODULE}.Net"])
def test_a_card_naming_a_class_outside_fedoap_networks_is_refused_before_any_import(made, tmp_path, monkeypatch,
                                                                                      class_path):
    _, card, state = made
    marker = tmp_path / "imported"
    (tmp_path / f"{EVIL_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = json.loads(card.to_json())
    doc["network"]["class_path"] = class_path
    path = _write_raw(tmp_path / "evil.safetensors", state, json.dumps(doc))
    for read in (read_card, load_model):
        with pytest.raises(ValueError, match=rf"{path}: the card's network must be a class of fedoap\.networks"):
            read(path)
    assert not marker.exists() and EVIL_MODULE not in sys.modules


@pytest.mark.parametrize("class_path, problem", [
    ("fedoap.networks.fedoap_net.torch.nn.Module", "does not exist"),  # attributes of a module are not modules
    ("fedoap.networks.fedoap_net.nn.Module", "does not exist"),
    ("fedoap.networks.fedoap_net.Convolution", "is not a network .* of fedoap.networks"),  # MONAI's, imported there
    ("fedoap.networks.fedoap_net.types", "is not a network"),  # a module, not a class
    ("fedoap.networks.fedoap_net._group_count", "is not a network"),  # a function
    ("fedoap.networks.NoSuchNet", "does not exist"),
])
def test_tricks_inside_the_package_prefix_are_refused_without_constructing(made, tmp_path, monkeypatch, class_path,
                                                                          problem):
    _, card, state = made
    import monai.networks.blocks as blocks

    built = []
    monkeypatch.setattr(blocks.Convolution, "__init__", lambda self, *a, **k: built.append(a))
    doc = json.loads(card.to_json())
    doc["network"]["class_path"] = class_path
    path = _write_raw(tmp_path / "trick.safetensors", state, json.dumps(doc))
    assert read_card(path).network["class_path"] == class_path  # a name only: reading the card builds nothing
    with pytest.raises(ValueError, match=problem):
        load_model(path)
    assert built == []


def test_a_file_without_a_card_is_refused_as_an_older_model(made, tmp_path):
    _, _, state = made
    path = tmp_path / "plain.safetensors"
    save_file(state, str(path))
    for read in (read_card, load_model):
        with pytest.raises(ValueError, match=rf"{path} has no model card .*older fedoap"):
            read(path)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not a safetensors model file"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")


def test_a_bad_card_is_named(made, tmp_path):
    _, card, state = made
    doc = json.loads(card.to_json())
    for broken, problem in ((dict(doc, version=99), "version 99"), ({k: v for k, v in doc.items() if k != "method"},
                                                                    "has no 'method'"), ("{not json", "not JSON")):
        text = broken if isinstance(broken, str) else json.dumps(broken)
        path = _write_raw(tmp_path / "bad.safetensors", state, text)
        with pytest.raises(ValueError, match=rf"{path}: .*{problem}"):
            read_card(path)


def test_an_encrypted_model_needs_the_right_key(made, tmp_path):
    _, card, state = made
    path = save_model(tmp_path / "personalized_model.safetensors.enc", state, card, key=KEY)
    assert CARD_KEY.encode() not in path.read_bytes()  # the card is encrypted with the weights
    with pytest.raises(AtRestError, match="encrypted at rest"):
        load_model(path)
    with pytest.raises(AtRestError, match="wrong key"):
        load_model(path, key=OTHER_KEY)
    assert load_model(path, key=KEY).card == card
    renamed = tmp_path / "other_model.safetensors.enc"  # the name is bound to the ciphertext
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(AtRestError, match="wrong key"):
        load_model(renamed, key=KEY)
    clear = save_model(tmp_path / "clear.safetensors", state, card)
    with pytest.raises(AtRestError, match="not encrypted, but a key was given"):
        load_model(clear, key=KEY)
