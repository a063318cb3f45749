"""A ray-serve variant's ``importPath`` is held to Ray Serve's own rule where it is written.

``pkgapp`` (no colon, no dot) passed the manifest's pattern, was stored, and then failed
the Serve adapter's check inside planning, at every pass, for the whole fleet; and
``pkg.app``, which Ray Serve takes (``module.attribute``), was refused by that adapter
though the manifest took it. The manifest, the adapter and Ray Serve now agree: checked
here against Ray Serve's own validator where Ray is installed. A value stored by an
earlier version still reads (the reconciler then fails only its deployment).
"""

from __future__ import annotations

import pathlib

import pytest

from orchestrator import catalog
from orchestrator.adapters import serve_config
from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestError
from orchestrator.store import sqlite as store_mod

from . import support

PATHS = [
    "pkg.mod:app", "pkg:app", "pkg.app", "pkg.mod.app", "a.b", "_p.x:y", "pkg.mod:app_2",  # Ray takes these
    "pkg.:app",
    "pkgapp", "pkg", "pkg:", ":app", "pkg.mod:app:extra", "a::b", "pkg.", ".pkg", "pkg.mod.",  # and refuses these
]


def ray_takes(path: str) -> bool:
    schema = pytest.importorskip("ray.serve.schema")
    try:
        schema.ServeApplicationSchema(import_path=path)
    except ValueError:
        return False
    return True


def model_doc(import_path: str) -> str:
    return f"""
apiVersion: {support.API_VERSION}
kind: Model
metadata: {{name: m}}
spec:
  variants:
    - {{name: big, runtime: ray-serve, importPath: "{import_path}"}}
"""


def manifest_takes(path: str) -> bool:
    try:
        loader.load_text(model_doc(path))
    except ManifestError:
        return False
    return True


def adapter_takes(path: str) -> bool:
    try:
        serve_config.ServeAppSpec(name="ep-a", route_prefix="/ep-a", model_name="m", runtime="ray-serve", num_replicas=1,
                                  import_path=path)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("path", PATHS)
def test_the_serve_adapter_takes_an_import_path_exactly_when_ray_serve_does(path: str) -> None:
    assert adapter_takes(path) == ray_takes(path)


@pytest.mark.parametrize("path", PATHS)
def test_a_manifest_takes_no_import_path_ray_serve_refuses(path: str) -> None:
    if not ray_takes(path):
        assert not manifest_takes(path)
    if manifest_takes(path):  # what is stored renders
        assert adapter_takes(path)


def test_a_dotted_import_path_is_taken_as_ray_serve_takes_it() -> None:
    assert manifest_takes("pkg.app") and adapter_takes("pkg.app")


def test_an_import_path_refused_now_names_the_field_on_one_line() -> None:
    with pytest.raises(ManifestError) as caught:
        loader.load_text(model_doc("pkgapp"))
    said = str(caught.value)
    assert "spec.variants[0].importPath" in said and "'pkgapp' is not an import path Ray Serve takes" in said
    assert len([line for line in said.splitlines() if "importPath" in line]) == 1, said


def test_a_model_an_earlier_version_stored_with_such_a_path_still_reads(tmp_path: pathlib.Path) -> None:
    store = store_mod.Store(tmp_path / "state.db")
    try:
        store.apply([store_mod.ObjectWrite("Model", "m", {}, {"variants": [{"name": "big", "runtime": "ray-serve", "importPath": "pkgapp"}]})],
                    store_mod.Event("earlier-version", "apply", "", "", "apply"))
        read, unreadable = catalog.stored_models(store)
        assert unreadable == {} and read["m"].variants[0].importPath == "pkgapp"
    finally:
        store.close()
