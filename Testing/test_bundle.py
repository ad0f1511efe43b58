"""Model bundles: schema, checksums, catalogs and import into the user cache."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from medanomaly.bundle import ModelBundle, import_model, list_models, resolve_model, sha256_of
from medanomaly.errors import ModelError


def test_default_bundle_is_valid(default_model):
    bundle = ModelBundle.load(default_model)
    bundle.verify()
    assert bundle.card["method"] == "vqvae-recon"
    for name, digest in bundle.card["weights"].items():
        assert sha256_of(default_model / name) == digest
        assert name.endswith(".safetensors")
        load_file(str(default_model / name))
    assert bundle.card["training"]["data"][0]["sha256"]
    size_mb = sum(p.stat().st_size for p in default_model.iterdir()) / 1e6
    assert size_mb < 30


def test_catalog_lists_default(default_model):
    names = [m["name"] for m in list_models()]
    assert "chest-ct-vqvae-recon" in names
    assert resolve_model(None).name == "chest-ct-vqvae-fs-random-tokens"


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("no-such-model")


def test_not_a_bundle(tmp_path):
    with pytest.raises(ModelError, match="not a model bundle"):
        ModelBundle.load(tmp_path)


def test_import_copies_verified_bundle(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDANOMALY_HOME", str(tmp_path / "home"))
    source = tmp_path / "incoming"
    shutil.copytree(default_model, source)
    card = json.loads((source / "model_card.json").read_text())
    card["name"] = "imported-model"
    (source / "model_card.json").write_text(json.dumps(card))
    imported = import_model(source)
    assert imported.path == tmp_path / "home" / "models" / "imported-model"
    assert resolve_model("imported-model").path == imported.path
    # a tampered bundle is refused and nothing is added
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    card["name"] = "tampered"
    (bad / "model_card.json").write_text(json.dumps(card))
    (bad / "weights.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ModelError, match="SHA-256"):
        import_model(bad)
    assert not (tmp_path / "home" / "models" / "tampered").exists()


def test_weight_file_outside_bundle_refused(default_model, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(default_model, copy)
    card = json.loads((copy / "model_card.json").read_text())
    card["weights"] = {"../escape.safetensors": "0" * 64}
    (copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="missing"):
        ModelBundle.load(copy).verify()
