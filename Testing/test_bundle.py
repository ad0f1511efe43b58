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
    assert resolve_model(None).name == "chest-ct-vqvae-fs-256"


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


def _serve(folder):
    """A real HTTP server on loopback serving `folder` (no network beyond this machine)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_download_checks_sha256_and_imports(default_model, tmp_path, capsys):
    import hashlib
    import tarfile

    from medanomaly.bundle import download_model
    from medanomaly.cli import main

    site = tmp_path / "site"
    site.mkdir()
    shutil.make_archive(str(site / "model"), "zip", default_model.parent, default_model.name)
    with tarfile.open(site / "model.tar.gz", "w:gz") as t:
        t.add(default_model, arcname="bundle")
    with tarfile.open(site / "evil.tar.gz", "w:gz") as t:
        t.add(default_model / "model_card.json", arcname="../escape/model_card.json")
    sha = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in site.iterdir()}
    server, base = _serve(site)
    try:
        cache = tmp_path / "cache"
        bundle = download_model(f"{base}/model.zip", sha["model.zip"], cache)
        assert bundle.path == cache / default_model.name and (cache / "catalog.json").is_file()
        bundle.verify()
        assert download_model(f"{base}/model.tar.gz", sha["model.tar.gz"], tmp_path / "cache2").name == bundle.name
        with pytest.raises(ModelError, match="does not match"):
            download_model(f"{base}/model.zip", "0" * 64, tmp_path / "cache3")
        assert not any((tmp_path / "cache3").iterdir())  # nothing half-written
        with pytest.raises(ModelError, match="outside its folder"):
            download_model(f"{base}/evil.tar.gz", sha["evil.tar.gz"], tmp_path / "cache4")
        assert not (tmp_path / "escape").exists()
        with pytest.raises(ModelError, match="download failed"):
            download_model(f"{base}/missing.zip", "0" * 64, tmp_path / "cache5")
        with pytest.raises(ModelError, match="64-hex"):
            download_model(f"{base}/model.zip", "abc", tmp_path / "cache5")
        # the command line: one clear line, exit 2, no traceback
        assert main(["models", "download", f"{base}/model.zip", "--sha256", "1" * 64]) == 2
        err = capsys.readouterr().err
        assert "does not match" in err and "Traceback" not in err
    finally:
        server.shutdown()


def test_catalog_recommends_ensembles_of_installed_models(tmp_path, monkeypatch):
    """The shipped catalog lists the lung-nodule ensemble (for the Slicer model list and `models list`); an ensemble
    whose members are not all installed is not offered, and rewriting the models keeps the ensembles."""
    from medanomaly.bundle import list_ensembles, read_catalog, write_catalog
    from medanomaly.ensemble import parse_spec

    recommended = "ensemble-max-rate:chest-ct-vqvae-fs-256,chest-ct-shape-outlier,chest-ct-tube-outlier"
    offered = {e["name"]: e for e in list_ensembles()}
    assert recommended in offered and offered[recommended]["description"]
    combine, names = parse_spec(recommended)
    methods = [resolve_model(n).method for n in names]
    assert combine == "max-rate" and methods == ["vqvae-fs", "shape-outlier", "shape-outlier"]
    assert [resolve_model(n).card["architecture"].get("shape", "blob") for n in names[1:]] == ["blob", "tube"]

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "catalog.json").write_text(json.dumps({"models": [], "ensembles": [
        {"name": "ensemble:chest-ct-hu-outlier,not-installed", "body_region": "chest", "description": "x"},
        {"name": "ensemble:chest-ct-hu-outlier,chest-ct-vqvae-recon", "body_region": "chest", "description": "y"}]}))
    monkeypatch.setenv("MEDANOMALY_MODELS", str(extra))
    names = [e["name"] for e in list_ensembles()]
    assert "ensemble:chest-ct-hu-outlier,chest-ct-vqvae-recon" in names and recommended in names
    assert "ensemble:chest-ct-hu-outlier,not-installed" not in names
    write_catalog(extra, [])  # as train_default_models.py rewrites the models
    assert [e["name"] for e in read_catalog(extra, "ensembles")][0] == "ensemble:chest-ct-hu-outlier,not-installed"


def test_a_recommended_ensemble_is_usable_by_its_alias(tmp_path, monkeypatch):
    """`--model chest-ct-nodules-needles` is the shipped catalog's three-model ensemble: the same members, rule and
    model identity (batch's re-run check) as the spelled-out spec; an installed model of the same name comes first,
    and a name that is neither stays a single-model name."""
    from medanomaly.ensemble import Ensemble, load_scorer, model_identity, parse_spec, resolved_spec

    spec = "ensemble-max-rate:chest-ct-vqvae-fs-256,chest-ct-shape-outlier,chest-ct-tube-outlier"
    assert parse_spec("chest-ct-nodules-needles") == parse_spec(spec)
    assert parse_spec("chest-ct-nodules") == ("max-rate", ["chest-ct-vqvae-fs-256", "chest-ct-shape-outlier"])
    # the same task without the network: the two outliers, fitted in seconds on a CPU
    assert parse_spec("chest-ct-nodules-needles-fast") == ("max-rate", parse_spec(spec)[1][1:])
    combine, broad = parse_spec("chest-ct-broad")  # the same three and deep kNN, for opacities and effusions
    assert combine == "max-rate" and broad == parse_spec(spec)[1] + ["chest-ct-deep-knn"]
    assert resolve_model(broad[-1]).method == "deep-knn"
    assert parse_spec("chest-ct-hu-outlier") is None and parse_spec("no-such-alias") is None
    assert model_identity("chest-ct-nodules-needles") == model_identity(spec)
    assert resolved_spec("chest-ct-nodules-needles") == resolved_spec(spec)
    scorer = load_scorer("chest-ct-nodules-needles")
    assert isinstance(scorer, Ensemble) and scorer.combine == "max-rate"
    assert [m.card["name"] for m in scorer.members] == parse_spec(spec)[1]

    extra = tmp_path / "extra"  # a user's model named like the alias shadows it
    bundle = resolve_model("chest-ct-hu-outlier")
    shutil.copytree(bundle.path, extra / "mine")
    (extra / "catalog.json").write_text(json.dumps({"models": [
        {"name": "chest-ct-nodules", "path": "mine", "method": bundle.method, "version": "0.1.0",
         "body_region": "chest", "description": "", "default": False}]}))
    monkeypatch.setenv("MEDANOMALY_MODELS", str(extra))
    assert parse_spec("chest-ct-nodules") is None and parse_spec("chest-ct-nodules-needles") is not None
