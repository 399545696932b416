"""Reading an export folder once, verified: the manifest and the bytes the runtime will use.

``manifest.json`` must match the SHA-256 in ``manifest.json.sha256`` (written by
``mmtl_tf.export.exporter.write_manifest``) and every file it lists must match its own
SHA-256. The graphs and the parameter file are kept as the bytes that were hashed: sessions,
parameters and saved personal states are built from those bytes, never from the files again,
so a file changed after loading is never used.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmtl_tf.files import checksum_path, recorded_sha256, sha256

MANIFEST = "manifest.json"
FORMAT_VERSIONS = (1,)


class ExportError(ValueError):
    """The export folder is missing, incomplete, altered or of an unknown format."""


def read_verified(folder: Path) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {file name: bytes} of the graphs and the parameter file), all verified."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{folder} is not an exported model: it has no {MANIFEST}; export one "
                          "with pipelines/export.py")
    data = manifest_path.read_bytes()
    expected = recorded_sha256(manifest_path)
    if expected is None:
        raise ExportError(f"{folder} has no valid {checksum_path(manifest_path).name} (the hash "
                          f"of {MANIFEST}, written by exports since it was added); re-export "
                          "the model")
    if sha256(data) != expected:
        raise ExportError(f"{manifest_path} does not match its SHA-256 in "
                          f"{checksum_path(manifest_path).name} (edited or corrupted); copy the "
                          "export folder again or re-export it")
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{manifest_path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in FORMAT_VERSIONS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ExportError(f"{manifest_path}: format_version {version!r} is not one this runtime "
                          f"reads ({FORMAT_VERSIONS}); update mmtl_tf")
    if manifest.get("task") == "regression":
        raise ExportError(f"{folder} is a regression export ({manifest.get('name')}); this runtime "
                          "adapts image classifiers: run its adapt_step.onnx and predict.onnx "
                          "with onnxruntime (exported/README.md) or load its model.keras")
    try:
        return manifest, _verified_files(folder, manifest)
    except KeyError as err:
        raise ExportError(f"{manifest_path} lacks the key {err}; re-export the model") from None


def _verified_files(folder: Path, manifest: dict) -> dict[str, bytes]:
    """Checks every listed file; returns the bytes of those the runtime loads."""
    files = manifest.get("files") or {}
    params_file = manifest["params_file"]
    used = {params_file, *(g["file"] for g in manifest["graphs"].values())}
    unlisted = sorted(f for f in used if f not in files)
    if unlisted:  # a file the runtime loads but no hash covers could be anything
        raise ExportError(f"{folder / MANIFEST} has no SHA-256 for {', '.join(unlisted)}, which "
                          "the runtime loads; re-export the model")
    if files[params_file] != manifest["meta_init_sha256"]:
        raise ExportError(f"{folder / MANIFEST}: meta_init_sha256 is not the hash of {params_file}")
    required = ["init_head", "adapt_step", "predict"]
    for stem in required + ([] if manifest["transductive"] else ["support_stats"]):
        if stem not in manifest["graphs"]:
            raise ExportError(f"{folder / MANIFEST} has no {stem!r} graph; re-export the model")
    root, kept = folder.resolve(), {}
    for relative, expected in sorted(files.items()):
        path = (folder / relative).resolve()
        if root not in path.parents:
            raise ExportError(f"{folder / MANIFEST} lists {relative!r}, which is outside the "
                              "folder")
        if not path.is_file():
            raise ExportError(f"{folder / relative} is missing; the export is incomplete: "
                              "copy the whole folder again")
        data = path.read_bytes() if relative in used else None
        if (sha256(path) if data is None else sha256(data)) != expected:
            raise ExportError(f"{folder / relative} does not match its SHA-256 in the manifest "
                              "(corrupted or modified); copy the export folder again")
        if data is not None:
            kept[relative] = data
    return kept
