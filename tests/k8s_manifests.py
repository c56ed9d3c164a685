"""Render the kustomizations under ``k8s/`` and validate what they produce, without a cluster or kubectl.

Rendering implements exactly the kustomize features ``k8s/`` uses and refuses every other field, so an overlay
that kustomize would render differently fails here instead of passing silently:
``resources`` (files and folders), ``patches`` (JSON6902 ops, inline or from a file, with a ``target``),
``namespace``, ``labels`` (object metadata only, no selectors), ``images`` and ``replacements`` (one field copied
to existing fields). They run in kustomize's order: patches, namespace, labels, images, replacements.

Validation, per rendered object:

* ``ray.io/v1`` kinds against the ``openAPIV3Schema`` of the KubeRay CRD, made strict the way the API server's
  strict field validation is (an unknown field is an error, not silently pruned), ``int32`` ranges enforced;
  their ``metadata`` against the core ObjectMeta schema; plus the operator's own admission checks that a schema
  cannot express (``ray-operator/controllers/ray/utils/validation.go``): names, containers, TTL without shutdown...
* everything else with ``kubernetes-validate`` in strict mode.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import yaml

CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
K8S_VERSION = "1.30"  # the newest schema set every kubernetes-validate>=1.30 (the dev pin) ships
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images", "replacements"}
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
CLUSTER_FIELD = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}  # where the cluster spec is
# KubeRay appends 6 characters to RayJob and RayService names for the clusters it creates (utils/constant.go).
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
INIT_TIMEOUT = "ray.io/initializing-timeout"
GO_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h))+")


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render the way kustomize would."""


# --- rendering -------------------------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    """The non-empty YAML documents of ``path``."""
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def render(directory: Path) -> list[dict]:
    """Objects that ``kustomize build directory`` produces."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = sorted(set(spec) - KUSTOMIZATION_FIELDS)
    if unknown:
        raise KustomizeError(f"{kfile}: fields {unknown} are not supported by this renderer")
    objects = _load_resources(directory, spec.get("resources", []), kfile)
    for i, patch in enumerate(spec.get("patches", [])):
        _apply_patch(objects, patch, directory, f"{kfile}: patches[{i}]")
    if "namespace" in spec:
        for obj in objects:
            obj["metadata"]["namespace"] = spec["namespace"]
    for entry in spec.get("labels", []):
        _apply_labels(objects, entry, kfile)
    for image in spec.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    for i, replacement in enumerate(spec.get("replacements", [])):
        _apply_replacement(objects, replacement, f"{kfile}: replacements[{i}]")
    return objects


def _load_resources(directory: Path, entries: list[str], kfile: Path) -> list[dict]:
    objects: list[dict] = []
    for entry in entries:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            objects += load_documents(path)
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} does not exist")
    seen: set[tuple] = set()
    for obj in objects:
        key = object_id(obj)
        if key in seen:
            raise KustomizeError(f"{kfile}: {key} is defined twice")
        seen.add(key)
    return objects


def object_id(obj: dict) -> tuple[str, str, str, str]:
    """(group, kind, namespace, name): what kustomize uses to tell resources apart."""
    group = obj["apiVersion"].rpartition("/")[0]
    meta = obj.get("metadata", {})
    return group, obj["kind"], meta.get("namespace", ""), meta.get("name", "")


def _apply_patch(objects: list[dict], patch: dict, directory: Path, where: str) -> None:
    if set(patch) - {"path", "patch", "target"} or ("path" in patch) == ("patch" in patch):
        raise KustomizeError(f"{where}: give exactly one of path/patch, plus a target")
    if "target" not in patch:
        raise KustomizeError(f"{where}: strategic-merge patches are not supported by this renderer; use JSON6902 ops with a target")
    ops = yaml.safe_load((directory / patch["path"]).read_text() if "path" in patch else patch["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{where}: a patch with a target must be a list of JSON6902 operations")
    matched = [obj for obj in objects if _selected(obj, patch["target"], where)]
    if not matched:
        raise KustomizeError(f"{where}: target {patch['target']} matches no resource")
    for obj in matched:
        try:
            patched = jsonpatch.apply_patch(obj, ops)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
            raise KustomizeError(f"{where}: cannot apply to {object_id(obj)}: {err}") from None
        obj.clear()
        obj.update(patched)


def _selected(obj: dict, target: dict, where: str) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"{where}: target fields {sorted(unknown)} are not supported by this renderer")
    group, _, version = obj["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": obj["kind"], **obj["metadata"]}
    # kustomize reads a target's name and namespace as anchored regular expressions
    return all(re.fullmatch(str(want), str(actual.get(field, ""))) for field, want in target.items())


def _apply_replacement(objects: list[dict], replacement: dict, where: str) -> None:
    source = dict(replacement["source"])
    path = source.pop("fieldPath")
    found = [obj for obj in objects if _selected(obj, source, where)]
    if len(found) != 1:
        raise KustomizeError(f"{where}: source {replacement['source']} matches {len(found)} resources, not one")
    value = _field(found[0], path, where)
    for target in replacement["targets"]:
        if set(target) - {"select", "fieldPaths"}:
            raise KustomizeError(f"{where}: target fields {sorted(set(target) - {'select', 'fieldPaths'})} are not supported")
        selected = [obj for obj in objects if _selected(obj, target["select"], where)]
        if not selected:
            raise KustomizeError(f"{where}: target {target['select']} matches no resource")
        for obj in selected:
            for field_path in target["fieldPaths"]:
                *parents, last = field_path.split(".")
                node = _field(obj, ".".join(parents), where) if parents else obj
                _field(obj, field_path, where)  # kustomize only creates missing fields when asked (options.create)
                node[int(last) if isinstance(node, list) else last] = copy.deepcopy(value)


def _field(obj: dict, path: str, where: str) -> Any:
    """The value at a dotted kustomize field path such as ``spec.template.spec.containers.0.image``."""
    node: Any = obj
    for part in path.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KustomizeError(f"{where}: {object_id(obj)} has no field {path}") from None
    return node


def _apply_labels(objects: list[dict], entry: dict, kfile: Path) -> None:
    if set(entry) - {"pairs", "includeSelectors"} or entry.get("includeSelectors"):
        raise KustomizeError(f"{kfile}: labels support only `pairs` (with includeSelectors false) in this renderer")
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(entry["pairs"])


def _set_image(node: Any, image: dict) -> None:
    """kustomize's images transformer: every ``image`` in a ``containers``/``initContainers`` list, at any depth."""
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"images entry {image} has unsupported fields")
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
    elif isinstance(node, dict):
        for key, value in node.items():
            _set_image(value, image)
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and "image" in container:
                        container["image"] = _retag(container["image"], image)


def _retag(ref: str, image: dict) -> str:
    match = re.fullmatch(re.escape(image["name"]) + r"(?::([\w.-]+))?(?:@(sha256:[0-9a-f]+))?", ref)
    if not match:
        return ref
    tag, digest = match.groups()
    if image.get("newTag") or image.get("digest"):  # a new tag or digest replaces both old ones
        tag, digest = image.get("newTag"), image.get("digest")
    return image.get("newName", image["name"]) + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


# --- validation ------------------------------------------------------------------------------------------------


def validate(obj: dict) -> list[str]:
    """Every problem with one object, each naming the field; an empty list means it would be admitted."""
    where = f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"
    if obj.get("apiVersion") == "ray.io/v1" and obj.get("kind") in RAY_KINDS:
        errors = [f"{_path(e.absolute_path)}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)]
        errors += _core_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})})
        if not errors:  # the operator only ever sees objects the API server admitted
            errors = operator_checks(obj)
    elif str(obj.get("apiVersion", "")).startswith("ray.io/"):
        errors = [f"apiVersion {obj['apiVersion']} kind {obj.get('kind')}: KubeRay v1.7 serves ray.io/v1 RayCluster, RayJob, RayService"]
    else:
        errors = _core_errors(obj)
    return [f"{where}: {e}" for e in errors]


def _core_errors(obj: dict) -> list[str]:
    """kubernetes-validate's verdict (it reports the first error only)."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{_path(err.absolute_path)}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [err.message]
    return []


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(root)"


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator for the v1 schema of the KubeRay CRD of ``kind``, strict about unknown fields."""
    path = CRD_DIR / f"ray.io_{RAY_KINDS[kind]}.yaml"
    with open(path) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    formats = jsonschema.FormatChecker()
    formats.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
    formats.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
    # OpenAPI 3.0 schema objects follow draft 4 semantics (e.g. boolean exclusiveMinimum)
    return jsonschema.Draft4Validator(schema, format_checker=formats)


def strict_schema(schema: dict) -> dict:
    """``schema`` with ``additionalProperties: false`` wherever the API server would reject unknown fields."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict_schema(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict_schema(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(sub) for sub in out[key]]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def operator_checks(obj: dict) -> list[str]:
    """The KubeRay operator's checks of a ray.io object that its CRD schema cannot express."""
    kind, name, spec = obj["kind"], obj.get("metadata", {}).get("name", ""), obj.get("spec", {})
    errors = []
    if len(name) > MAX_NAME[kind] or not DNS1035.match(name):
        errors.append(f"metadata.name: {name!r} must be a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    if kind == "RayJob":
        errors += _rayjob_checks(spec)
    timeout = obj["metadata"].get("annotations", {}).get(INIT_TIMEOUT)
    if kind == "RayService" and timeout is not None and not _positive_duration(timeout):
        errors.append(f"metadata.annotations.{INIT_TIMEOUT}: {timeout!r} is not a positive Go duration (30m) or seconds")
    for prefix, cluster in cluster_specs(obj):
        errors += _cluster_checks(cluster, prefix)
    return errors


def _positive_duration(text: str) -> bool:
    """KubeRay's reading of ray.io/initializing-timeout: a Go duration ("30m", "1h30m") or integer seconds, above zero."""
    if text.isdigit():
        return int(text) > 0
    return bool(GO_DURATION.fullmatch(text)) and any(float(n) > 0 for n in re.findall(r"[0-9.]+", text))


def _rayjob_checks(spec: dict) -> list[str]:
    errors = []
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
    if spec.get("backoffLimit", 0) < 0:
        errors.append("spec.backoffLimit: must not be negative")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
    except yaml.YAMLError as err:
        errors.append(f"spec.runtimeEnvYAML: not valid YAML ({err})")
    return errors


def _cluster_checks(cluster: dict, prefix: str) -> list[str]:
    errors = []
    head = cluster.get("headGroupSpec", {})
    if not head.get("template", {}).get("spec", {}).get("containers"):
        errors.append(f"{prefix}.headGroupSpec.template.spec.containers: at least one container is required")
    names = [g.get("groupName") for g in cluster.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        errors.append(f"{prefix}.workerGroupSpecs: group names {names} are not unique")
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        where = f"{prefix}.workerGroupSpecs[{i}]"
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{where}.template.spec.containers: at least one container is required")
        if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31):
            errors.append(f"{where}: minReplicas {group['minReplicas']} exceeds maxReplicas {group['maxReplicas']}")
    return errors


# --- walking rendered objects -----------------------------------------------------------------------------------


def cluster_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, RayCluster spec) of the cluster a ray.io object creates."""
    if obj["kind"] in CLUSTER_FIELD:
        field = CLUSTER_FIELD[obj["kind"]]
        spec = obj.get("spec", {})
        found = spec.get(field) if field else spec
        if isinstance(found, dict):
            yield (f"spec.{field}" if field else "spec"), found


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, pod spec) of every pod an object creates: Ray heads and workers, Deployment and Job templates."""
    for path, cluster in cluster_specs(obj):
        yield f"{path}.headGroupSpec", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{path}.workerGroupSpecs[{group['groupName']}]", group["template"]["spec"]
    if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        yield "spec.template", obj["spec"]["template"]["spec"]


def containers(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, container) of every container and init container an object creates."""
    for path, pod in pod_specs(obj):
        for key in ("initContainers", "containers"):
            for c in pod.get(key, []):
                yield f"{path}.{key}[{c['name']}]", c
