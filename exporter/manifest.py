"""Validate a bundle manifest: its JSON Schema (`manifest_schema.json`, documented in the README) and
the schedule's data flow (every tensor a call reads exists at that point; every graph input is bound)."""
from __future__ import annotations

import json
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("manifest_schema.json")


class ManifestError(ValueError):
    pass


def validate(manifest: dict) -> None:
    """Raise ManifestError with the first problem found."""
    import jsonschema

    try:
        jsonschema.validate(manifest, json.loads(SCHEMA_PATH.read_text()))
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        # jsonschema quotes the whole offending value, which can be a whole schedule: name the rule instead
        what = e.message if len(e.message) <= 200 else f"the value breaks the schema's {e.validator!r} rule"
        raise ManifestError(f"manifest does not match the schema at {where or '(root)'}: {what}") from None
    for name, schedule in manifest["schedules"].items():
        _check_dataflow(manifest, name, schedule)


def _check_ort_step(manifest: dict, where: str, entry: dict, live: set, persistent: set) -> None:
    training = manifest.get("ort_training")
    if training is None:
        raise ManifestError(f"{where} is an ort_training_step, but the bundle has no ort_training artifacts")
    if entry["parameters"] != training["parameters"] or entry["gradients"] != training["gradient_inputs"]:
        raise ManifestError(f"{where} lists parameters or gradients other than ort_training's, or in another order")
    for name in [entry["lr"], *entry["gradients"]]:
        if name not in live:
            raise ManifestError(f"{where} reads {name}, which does not exist at that point")
    if not set(entry["parameters"]) <= persistent:
        raise ManifestError(f"{where} updates parameters that are not state tensors")


def _check_dataflow(manifest: dict, schedule_name: str, schedule: list[dict]) -> None:
    live = {t["name"] for t in manifest["state"]} | {t["name"] for t in manifest["step_inputs"]}
    persistent = {t["name"] for t in manifest["state"]}
    files = set(manifest["files"])
    for k, entry in enumerate(schedule):
        where = f"{schedule_name}[{k}]"
        if entry["op"] == "fill":
            live.add(entry["tensor"])
            continue
        if entry["op"] == "ort_training_step":
            _check_ort_step(manifest, where, entry, live, persistent)
            live -= set(entry["free"])
            continue
        graph = manifest["graphs"].get(entry["graph"])
        if graph is None:
            raise ManifestError(f"{where} calls unknown graph {entry['graph']}")
        declared = {t["name"] for t in graph["inputs"]}
        if declared != set(entry["inputs"]):
            raise ManifestError(f"{where} binds inputs {sorted(set(entry['inputs']) ^ declared)} wrongly for {entry['graph']}")
        if {t["name"] for t in graph["outputs"]} != set(entry["outputs"]):
            raise ManifestError(f"{where} does not name every output of {entry['graph']}")
        for name, source in entry["inputs"].items():
            if isinstance(source, str) and source not in live:
                raise ManifestError(f"{where} reads {source}, which does not exist at that point")
            if isinstance(source, dict) and "file" in source and source["file"] not in files:
                raise ManifestError(f"{where} reads weights from {source['file']}, which the bundle lacks")
            if isinstance(source, dict) and "file" not in source and "tensor" in source and source["tensor"] not in live:
                raise ManifestError(f"{where} reads a slice of {source['tensor']}, which does not exist at that point")
        for target in entry["outputs"].values():
            if isinstance(target, dict) and target["tensor"] not in live:
                raise ManifestError(f"{where} writes a slice of {target['tensor']}, which does not exist at that point")
        live |= {t for t in entry["outputs"].values() if isinstance(t, str)}
        for name in entry["free"]:
            if name in persistent:
                raise ManifestError(f"{where} frees state tensor {name}")
            live.discard(name)
    leftover = live - persistent - {t["name"] for t in manifest["step_inputs"]} - set(manifest["step_outputs"])
    if leftover:
        raise ManifestError(f"{schedule_name} leaves tensors allocated after the step: {sorted(leftover)[:5]}")
