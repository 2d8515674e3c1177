"""Where the built libraries are found: a wheel, an editable install and a development build."""
from __future__ import annotations

import pytest

import actsparse.runtime_ext as runtime_ext
from actsparse import ActSparseError


def test_library_found_in_any_package_folder(tmp_path, monkeypatch):
    # An editable install: sources in the checkout, built libraries in site-packages, both on __path__.
    sources, built = tmp_path / "src", tmp_path / "site-packages"
    sources.mkdir(), built.mkdir()
    (built / runtime_ext.OPENVINO_LIBRARY).write_bytes(b"")
    monkeypatch.delenv("ACTSPARSE_EXT_DIR", raising=False)
    monkeypatch.setattr(runtime_ext, "__path__", [str(sources), str(built)])
    assert runtime_ext.openvino_extension() == str(built / runtime_ext.OPENVINO_LIBRARY)


def test_missing_library_names_every_folder_searched(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    monkeypatch.delenv("ACTSPARSE_EXT_DIR", raising=False)
    monkeypatch.setattr(runtime_ext, "__path__", [str(first), str(second)])
    with pytest.raises(ActSparseError, match=f"looked in {first}, {second}"):
        runtime_ext.onnxruntime_library()


def test_development_build_folder_wins(tmp_path, monkeypatch):
    (tmp_path / runtime_ext.OPENVINO_LIBRARY).write_bytes(b"")
    monkeypatch.setenv("ACTSPARSE_EXT_DIR", str(tmp_path))
    assert runtime_ext.openvino_extension() == str(tmp_path / runtime_ext.OPENVINO_LIBRARY)
