"""deploy/kubernetes: every manifest and every overlay as `kubectl kustomize` renders it is valid
Kubernetes (strict schemas of the oldest and newest versions kubernetes-validate bundles that we
support), and the rendered Deployments keep the facts the service depends on (port, probes, service
links, non-root, GPU), pass the Pod Security `restricted` profile, write only to their volumes, read
secrets from files, and pin the released image version; the scale-out overlay's engine takes
connections only from its public tier and the monitoring namespace, with a token both tiers mount."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
OVERLAYS = sorted(p for p in (KUBE / "overlays").iterdir() if p.is_dir())
KUSTOMIZATIONS = [BASE, *OVERLAYS]
SCALE_OUT = KUBE / "overlays" / "scale-out"
# One pod serving both services: the base and every overlay but the two-tier one (tested at the end).
SINGLE_POD = [k for k in KUSTOMIZATIONS if k != SCALE_OUT]
VERSIONS = ["1.30.0", "1.37.0"]
NAME = "paligemma-segmentation"
# Applied by hand, never by a kustomization: the Secrets' examples (placeholders) and the namespace.
NAMESPACE = KUBE / "namespace.yaml"
STANDALONE = sorted([NAMESPACE, *KUBE.rglob("*.example.yaml")])
IMAGE_UID = 1034  # BentoML's generated Dockerfile: user bentoml, uid/gid 1034 (test_bento_context checks)
STARTUP_BUDGET_S = 30 * 60
KUBECTL_HINT = "kubectl (with kustomize built in) is not installed: https://kubernetes.io/docs/tasks/tools/"


def ids(paths):
    return [str(p.relative_to(KUBE)) for p in paths]


def validate(obj: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}) at {where or '.'}: {exc.message}")


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomize(directory: Path) -> subprocess.CompletedProcess:
    """`kubectl kustomize DIRECTORY`: kustomize itself, as `kubectl apply -k` renders it."""
    kubectl = shutil.which("kubectl")
    assert kubectl, KUBECTL_HINT
    return subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)


def build(directory: Path) -> list[dict]:
    result = kustomize(directory)
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def referenced_files(directory: Path) -> list[Path]:
    """Every file and directory a kustomization names (resources and patches)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return [directory / entry for entry in kustomization.get("resources", [])] + [
        directory / patch["path"] for patch in kustomization.get("patches", [])]


def patch_files() -> set[Path]:
    return {(d / p["path"]).resolve() for d in KUSTOMIZATIONS
            for p in yaml.safe_load((d / "kustomization.yaml").read_text()).get("patches", [])}


def manifest_files() -> list[Path]:
    """Complete resources (not kustomizations, not partial patches), the stand-alone files included."""
    patches = patch_files()
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in patches)


def rendered(directory: Path) -> dict[str, dict]:
    objects = build(directory)
    by_kind = {}
    for obj in objects:
        assert obj["kind"] not in by_kind, f"two {obj['kind']} objects in {directory}"
        by_kind[obj["kind"]] = obj
    return by_kind


def server(objects: dict[str, dict]) -> dict:
    [container] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- validity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=ids(manifest_files()))
def test_every_manifest_is_valid(path, version):
    documents = load_documents(path)
    assert documents, f"{path} is empty"
    for obj in documents:
        validate(obj, version)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_rendered_kustomization_is_valid(directory, version):
    objects = build(directory)
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= {
        o["kind"] for o in objects}
    for obj in objects:
        validate(obj, version)


def test_strict_validation_rejects_a_misspelled_field():
    """The validator in use does catch what the tests above rely on it for."""
    deployment = rendered(BASE)["Deployment"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["enableServiceLink"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "3000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_every_file_a_kustomization_lists_exists(directory):
    for path in referenced_files(directory):
        listed = path.relative_to(directory)
        assert path.exists(), f"{directory / 'kustomization.yaml'} lists {listed}, which is missing"
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), f"{path} has no kustomization.yaml"


def test_every_file_is_used_and_the_stand_alone_ones_are_not():
    listed = {p.resolve() for d in KUSTOMIZATIONS for p in referenced_files(d)}
    assert {p.relative_to(KUBE).as_posix() for p in STANDALONE} == {
        "namespace.yaml", "base/secret.example.yaml", "overlays/scale-out/engine-token.example.yaml"}
    for path in STANDALONE:
        assert path.resolve() not in listed, f"{path.name} must not be applied with a kustomization"
    unused = [p.relative_to(KUBE) for p in KUBE.rglob("*.yaml")
              if p.name != "kustomization.yaml" and p not in STANDALONE and p.resolve() not in listed]
    assert not unused, f"manifests no kustomization lists: {unused}"


def secret_keys_read(pod: dict) -> set[tuple[str, str]]:
    """(Secret, key) of every secret a pod reads: environment references and mounted volumes."""
    keys = {(ref["name"], ref["key"]) for container in pod["containers"] for e in container.get("env", [])
            if (ref := e.get("valueFrom", {}).get("secretKeyRef"))}
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            keys |= {(volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]}
    return keys


def test_the_secret_examples_hold_placeholders_and_name_the_keys_the_deployments_read():
    examples = set()
    for path in KUBE.rglob("*.example.yaml"):
        [secret] = load_documents(path)
        assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
        assert all("REPLACE" in value for value in secret["stringData"].values()), path
        examples |= {(secret["metadata"]["name"], key) for key in secret["stringData"]}
    read = {key for directory in KUSTOMIZATIONS for obj in build(directory) if obj["kind"] == "Deployment"
            for key in secret_keys_read(obj["spec"]["template"]["spec"])}
    assert read == examples


# --- facts of every rendered Deployment --------------------------------------------------------


@pytest.mark.parametrize("directory", SINGLE_POD, ids=ids(SINGLE_POD))
def test_rendered_deployment_serves_port_3000_with_patient_probes(directory):
    objects = rendered(directory)
    container = server(objects)
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http", 3000)]

    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "http"}
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_BUDGET_S
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # A loading server can hang on /readyz: a probe must give up well before the next one.
        timeout = container[probe].get("timeoutSeconds", 1)
        assert timeout <= 10 and timeout < container[probe]["periodSeconds"], probe

    service = objects["Service"]
    assert service["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(80, "http")]
    assert service["metadata"]["name"] != "bentoml"


@pytest.mark.parametrize("directory", SINGLE_POD, ids=ids(SINGLE_POD))
def test_rendered_deployment_runs_locked_down(directory):
    pod = rendered(directory)["Deployment"]["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False, "BENTOML_PORT service-link variables would clobber the port"
    assert pod["terminationGracePeriodSeconds"] >= 30
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == IMAGE_UID and security["fsGroup"] == IMAGE_UID
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "memory" in container["resources"]["limits"] and "cpu" in container["resources"]["requests"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("directory", SINGLE_POD, ids=ids(SINGLE_POD))
def test_rendered_deployment_wiring(directory):
    """Config, secrets, cache volume, selectors and the HPA/PDB all point at what exists."""
    objects = rendered(directory)
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = server(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["minAvailable"] == 1

    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)

    assert container["envFrom"] == [{"configMapRef": {"name": objects["ConfigMap"]["metadata"]["name"]}}]
    for variable in env_of(container).values():
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["optional"] is True, f"{variable['name']}: the Secret is optional"

    env = env_of(container)
    assert env["HF_HOME"]["value"] == "/models/hf"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/models/hf"] in volumes
    assert set(mounts.values()) <= set(volumes)
    assert objects["ConfigMap"]["data"]["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize("directory", SINGLE_POD, ids=ids(SINGLE_POD))
def test_configmap_sets_only_known_settings(directory):
    """A misspelt SEG_ variable would be ignored silently by the service."""
    from segmentation.serving.settings import ENV_DOCS

    data = rendered(directory)["ConfigMap"]["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    unknown = [k for k in data if k.startswith("SEG_") and k not in ENV_DOCS]
    assert not unknown, f"not settings of the service: {unknown}"
    assert data["SEG_MODELS"].split(",")[0] == ENV_DOCS["SEG_MODELS"][0]
    assert data["SEG_DEVICE"] in ("auto", "cuda", "cpu")


# --- every pod of every kustomization: Pod Security `restricted`, a read-only root, pinned images ---


def pod_templates(directory: Path) -> dict[str, dict]:
    """Deployment name -> its rendered pod template (metadata and spec)."""
    return {o["metadata"]["name"]: o["spec"]["template"] for o in build(directory) if o["kind"] == "Deployment"}


# The Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
# `restricted` at version `latest` (1.30+): the baseline controls plus its own.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}


def restricted_violations(template: dict) -> list[str]:
    """What in a pod template the `restricted` profile refuses (an empty list: admitted)."""
    pod = template["spec"]
    pod_security = pod.get("securityContext", {})
    containers = [c for kind in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(kind, [])]
    found = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(f"pod: {flag}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: type {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    for sysctl in pod_security.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"pod: sysctl {sysctl['name']}")
    for key, value in template.get("metadata", {}).get("annotations", {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            found.append(f"annotation {key}: {value}")
    if pod_security.get("runAsUser") == 0:
        found.append("pod: runAsUser 0")
    for where, security in [("pod", pod_security), *((c["name"], c.get("securityContext", {})) for c in containers)]:
        if security.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{where}: hostProcess")
        if security.get("appArmorProfile", {}).get("type") == "Unconfined":
            found.append(f"{where}: AppArmor Unconfined")
        selinux = security.get("seLinuxOptions", {})
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"{where}: seLinuxOptions {selinux}")
        if security.get("seccompProfile", {}).get("type", "RuntimeDefault") not in SECCOMP_TYPES:
            found.append(f"{where}: seccompProfile {security['seccompProfile']}")
    for container in containers:
        name, security = container["name"], container.get("securityContext", {})
        if security.get("privileged"):
            found.append(f"{name}: privileged")
        if security.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {security['procMount']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if security.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if security.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        if security.get("seccompProfile", pod_security.get("seccompProfile", {})).get("type") not in SECCOMP_TYPES:
            found.append(f"{name}: seccompProfile RuntimeDefault or Localhost (pod or container)")
        capabilities = security.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities must drop ALL")
        if not set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities.add {capabilities['add']}")
    return found


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_every_pod_passes_the_restricted_pod_security_profile(directory):
    for name, template in pod_templates(directory).items():
        assert not restricted_violations(template), f"{name}: {restricted_violations(template)}"


RESTRICTED_BREACHES = {
    "hostNetwork": lambda t: t["spec"].update(hostNetwork=True),
    "type ['hostPath']": lambda t: t["spec"]["volumes"].append({"name": "x", "hostPath": {"path": "/"}}),
    "sysctl kernel.msgmax": lambda t: t["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax",
                                                                                   "value": "1"}]),
    "AppArmor Unconfined": lambda t: t["spec"]["containers"][0]["securityContext"].update(
        appArmorProfile={"type": "Unconfined"}),
    "seLinuxOptions": lambda t: t["spec"]["securityContext"].update(seLinuxOptions={"type": "spc_t"}),
    "privileged": lambda t: t["spec"]["containers"][0]["securityContext"].update(privileged=True),
    "hostPort": lambda t: t["spec"]["containers"][0]["ports"][0].update(hostPort=3000),
    "allowPrivilegeEscalation": lambda t: t["spec"]["containers"][0]["securityContext"].pop(
        "allowPrivilegeEscalation"),
    "runAsNonRoot": lambda t: t["spec"]["securityContext"].pop("runAsNonRoot"),
    "runAsUser 0": lambda t: t["spec"]["containers"][0]["securityContext"].update(runAsUser=0),
    "seccompProfile": lambda t: t["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    "drop ALL": lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
    "capabilities.add": lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(
        add=["SYS_ADMIN"]),
    "procMount": lambda t: t["spec"]["containers"][0]["securityContext"].update(procMount="Unmasked"),
}


@pytest.mark.parametrize("breach", RESTRICTED_BREACHES)
def test_the_restricted_check_catches_each_breach(breach):
    """The check above does refuse what the profile refuses: one breach at a time of a passing pod."""
    [template] = pod_templates(BASE).values()
    assert not restricted_violations(template)
    broken = copy.deepcopy(template)
    RESTRICTED_BREACHES[breach](broken)
    found = restricted_violations(broken)
    assert any(breach in line for line in found), found


def test_the_namespace_example_enforces_the_restricted_profile():
    [namespace] = load_documents(NAMESPACE)
    assert namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == "segmentation"
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


# Where the server writes (tests/deploy/test_read_only_root.py serves a real server with these
# variables under a read-only root): each must name a directory on a writable volume.
WRITABLE_ENV = ("TMPDIR", "HOME", "BENTOML_HOME", "HF_HOME")


def writable_mounts(template: dict, container: dict) -> dict[str, dict]:
    """mountPath -> volume, for the container's writable emptyDir and PersistentVolumeClaim mounts."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]
            if not m.get("readOnly") and {"emptyDir", "persistentVolumeClaim"} & set(volumes[m["name"]])}


def volume_under(path: str, mounts: dict[str, dict]) -> str | None:
    """The mount path `path` lies on, of those given."""
    return next((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), None)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_every_container_has_a_read_only_root_and_writes_to_its_volumes(directory):
    for name, template in pod_templates(directory).items():
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            mounts = writable_mounts(template, container)
            assert "/tmp" in mounts, f"{name}: /tmp must be a volume"
            env = env_of(container)
            for variable in WRITABLE_ENV:
                path = env[variable]["value"]
                assert volume_under(path, mounts), f"{name}: {variable}={path} is on the read-only root"
            assert env["TMPDIR"]["value"] == "/tmp"
            for path, volume in mounts.items():
                if "emptyDir" in volume:
                    assert volume["emptyDir"].get("sizeLimit"), f"{name}: emptyDir at {path} without sizeLimit"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_tokens_are_files_never_environment_variables(directory):
    """The Hugging Face and engine tokens reach a pod only as mounted Secret files (an environment
    leaks through /proc, crash reports and `kubectl describe`); only the optional API key is a variable."""
    for name, template in pod_templates(directory).items():
        for container in template["spec"]["containers"]:
            env = env_of(container)
            assert not {"HF_TOKEN", "SEG_ENGINE_TOKEN"} & set(env), name
            from_secrets = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
            assert from_secrets <= {"SEG_API_KEY"}, f"{name}: {from_secrets}"
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            for variable in ("HF_TOKEN_FILE", "SEG_ENGINE_TOKEN_FILE"):
                if variable in env:
                    path = Path(env[variable]["value"])
                    mount = mounts[str(path.parent)]
                    assert mount["readOnly"] is True
                    secret = volumes[mount["name"]]["secret"]
                    assert path.name in {item["path"] for item in secret["items"]}, f"{name}: {variable}"
                    assert secret["defaultMode"] & 0o040, "group-readable: the server runs as the fsGroup"


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=ids(KUSTOMIZATIONS))
def test_every_image_is_pinned_to_the_release_version(directory):
    """No `:latest` and no bare name: the tag the release of this version pushes (scripts/release_version.py)."""
    version = project_version()
    for name, template in pod_templates(directory).items():
        for container in template["spec"]["containers"]:
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert "/" not in tag and repository, f"{name}: {image} names no tag"
            assert "latest" not in tag, f"{name}: {image}"
            assert repository == "DOCKERHUB_USER/paligemma-segmentation"
            assert tag == (f"{version}-hub" if directory.name == "hub-cache" else version), f"{name}: {image}"


def test_release_version_sets_and_checks_every_pinned_tag(tmp_path):
    """`release_version.py --set` bumps pyproject.toml and every overlay's image; `--check` (the release
    workflow, on a tag) refuses a tag that this commit does not pin."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(KUBE, tmp_path / "deploy" / "kubernetes")
    script = [sys.executable, str(ROOT / "scripts" / "release_version.py"), "--root", str(tmp_path)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*script, *args], capture_output=True, text=True, timeout=60)

    assert run("--check", f"v{project_version()}").returncode == 0
    assert run("--set", "latest").returncode != 0
    assert run("--set", "2.3.4").stdout.strip() == "2.3.4"
    assert run("--check", "v2.3.4").returncode == 0
    refused = run("--check", "v2.3.5")
    assert refused.returncode == 1 and "release_version.py --set 2.3.5" in refused.stderr
    images = {c["image"] for d in ("base", "overlays/hub-cache", "overlays/scale-out")
              for t in pod_templates(tmp_path / "deploy" / "kubernetes" / d).values() for c in t["spec"]["containers"]}
    assert {image.rpartition(":")[2] for image in images} == {"2.3.4", "2.3.4-hub"}
    assert 'version = "2.3.4"' in (tmp_path / "pyproject.toml").read_text()


# --- overlays -------------------------------------------------------------------------------------


def resources(container: dict) -> tuple[dict, dict]:
    return container["resources"].get("requests", {}), container["resources"].get("limits", {})


@pytest.mark.parametrize("name", ["gpu", "hub-cache"])
def test_gpu_overlays_ask_for_one_nvidia_gpu(name):
    objects = rendered(KUBE / "overlays" / name)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    requests, limits = resources(server(objects))
    assert limits["nvidia.com/gpu"] == 1
    assert requests.get("nvidia.com/gpu", 1) == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert objects["ConfigMap"]["data"]["SEG_DEVICE"] == "cuda"


def test_base_and_cpu_overlay_ask_for_no_gpu():
    for directory in (BASE, KUBE / "overlays" / "cpu"):
        objects = rendered(directory)
        requests, limits = resources(server(objects))
        assert not any("gpu" in key for key in [*requests, *limits])
        assert "tolerations" not in objects["Deployment"]["spec"]["template"]["spec"]


def test_cpu_overlay_gets_more_cpu_and_memory_and_smaller_batches():
    base, cpu = rendered(BASE), rendered(KUBE / "overlays" / "cpu")
    assert cpu["ConfigMap"]["data"]["SEG_DEVICE"] == "cpu"
    assert int(cpu["ConfigMap"]["data"]["SEG_MAX_BATCH_SIZE"]) < int(base["ConfigMap"]["data"]["SEG_MAX_BATCH_SIZE"])
    (base_req, base_lim), (cpu_req, cpu_lim) = resources(server(base)), resources(server(cpu))
    assert quantity(cpu_req["cpu"]) > quantity(base_req["cpu"])
    assert quantity(cpu_req["memory"]) > quantity(base_req["memory"])
    assert quantity(cpu_lim["memory"]) > quantity(base_lim["memory"])


def test_hub_cache_overlay_loads_weights_from_a_persistent_cache_with_a_token_file():
    objects = rendered(KUBE / "overlays" / "hub-cache")
    assert objects["ConfigMap"]["data"]["SEG_MODEL_SOURCE"] == "hub"
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = server(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    cache = volumes[mounts["/models/hf"]["name"]]
    assert set(cache) == {"name", "persistentVolumeClaim"}, "the emptyDir must be replaced, not merged"
    assert cache["persistentVolumeClaim"]["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]

    env = env_of(container)
    assert "HF_TOKEN" not in env, "the token comes from the file"
    token_file = Path(env["HF_TOKEN_FILE"]["value"])
    assert token_file == Path("/run/secrets/hf_token")
    mount = mounts[str(token_file.parent)]
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == NAME
    assert {"key": "hf-token", "path": token_file.name} in secret["items"]
    assert secret["defaultMode"] & 0o040, "group-readable: the server runs as the fsGroup"

    assert server(objects)["image"].endswith(f":{project_version()}-hub"), "the slim image the release tags -hub"


# --- the renderer ----------------------------------------------------------------------------------


def test_kustomize_fails_on_a_missing_resource_and_a_patch_that_matches_nothing(tmp_path):
    """The renderer in use does fail where a deployment would: the tests above rely on it."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["missing.yaml"]}))
    assert kustomize(tmp_path).returncode != 0
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
         "resources": [os.path.relpath(BASE, tmp_path)], "patches": [{"path": "patch.yaml"}]}))
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "no-such-deployment"}}))
    result = kustomize(tmp_path)
    assert result.returncode != 0 and "no-such-deployment" in result.stderr


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (`500m`, `2`, `16Gi`) as a number."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40), ("m", 1e-3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# --- the scale-out overlay: two tiers that scale apart -------------------------------------------


def scale_out() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in build(SCALE_OUT)}


ENGINE = "paligemma-engine"


def pod_of(objects: dict, name: str) -> tuple[dict, dict]:
    pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container


def test_scale_out_asks_for_a_gpu_only_on_the_engine():
    objects = scale_out()
    assert {name for kind, name in objects if kind == "Deployment"} == {NAME, ENGINE}
    engine_pod, engine = pod_of(objects, ENGINE)
    public_pod, public = pod_of(objects, NAME)
    requests, limits = resources(engine)
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1, "one engine per GPU"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in engine_pod["tolerations"]
    assert not any("gpu" in key for key in [*resources(public)[0], *resources(public)[1]])
    assert "tolerations" not in public_pod
    assert quantity(resources(public)[0]["memory"]) < quantity(requests["memory"]), "no model in the public tier"


def test_scale_out_public_tier_reaches_every_engine_through_a_headless_service():
    objects = scale_out()
    _, engine = pod_of(objects, ENGINE)
    _, public = pod_of(objects, NAME)
    service = objects[("Service", ENGINE)]
    assert service["spec"]["clusterIP"] == "None", "headless: DNS names every ready engine pod"
    labels = objects[("Deployment", ENGINE)]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    public_labels = objects[("Deployment", NAME)]["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= public_labels.items()
    assert not objects[("Service", NAME)]["spec"]["selector"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert env_of(public)["SEG_ENGINE_URL"]["value"] == f"http://{ENGINE}:{port['port']}"
    assert "SEG_ENGINE_URL" not in env_of(engine)
    assert engine["args"][:3] == ["start-http-server", "--service-name", ENGINE]
    assert env_of(engine)["SEG_DEVICE"]["value"] == "cuda"
    assert engine["image"] == public["image"], "one image, two tiers"
    for pod in (pod_of(objects, ENGINE)[0], pod_of(objects, NAME)[0]):
        assert pod["enableServiceLinks"] is False


def test_scale_out_probes():
    objects = scale_out()
    _, engine = pod_of(objects, ENGINE)
    _, public = pod_of(objects, NAME)
    # The engine's own readiness (200 once its models are warm); the public tier is ready when it serves.
    for probe in ("startupProbe", "readinessProbe"):
        assert engine[probe]["httpGet"] == {"path": "/readyz", "port": "http"}, probe
        assert public[probe]["httpGet"] == {"path": "/livez", "port": "http"}, probe
    assert engine["livenessProbe"]["httpGet"]["path"] == public["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = engine["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_BUDGET_S
    for container in (engine, public):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            timeout = container[probe].get("timeoutSeconds", 1)
            assert timeout < container[probe].get("periodSeconds", 10), probe


def test_scale_out_rollouts_outlast_the_longest_request():
    objects = scale_out()
    timeout = float(objects[("ConfigMap", NAME)]["data"]["SEG_REQUEST_TIMEOUT_S"])
    for name in (ENGINE, NAME):
        deployment = objects[("Deployment", name)]
        pod, container = pod_of(objects, name)
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + timeout, name
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name


def test_scale_out_autoscalers_and_disruption_budgets():
    objects = scale_out()
    public_hpa, engine_hpa = objects[("HorizontalPodAutoscaler", NAME)], objects[("HorizontalPodAutoscaler", ENGINE)]
    assert public_hpa["spec"]["scaleTargetRef"]["name"] == NAME
    assert engine_hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": ENGINE}
    [cpu] = public_hpa["spec"]["metrics"]
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    [queue] = engine_hpa["spec"]["metrics"]
    assert queue["type"] == "Pods"
    # The metric the engine exports on /metrics (segmentation/serving/metrics.py).
    from segmentation.serving.metrics import ENGINE_QUEUE_LENGTH

    assert queue["pods"]["metric"]["name"] == ENGINE_QUEUE_LENGTH._name == "seg_engine_queue_length"
    assert queue["pods"]["target"]["type"] == "AverageValue"
    assert engine_hpa["spec"]["minReplicas"] >= 1 and public_hpa["spec"]["minReplicas"] >= 2
    for name in (ENGINE, NAME):
        pdb = objects[("PodDisruptionBudget", name)]
        labels = objects[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["minAvailable"] == 1


def test_scale_out_configmap_sets_only_known_settings():
    from segmentation.serving.settings import ENV_DOCS

    objects = scale_out()
    data = objects[("ConfigMap", NAME)]["data"]
    env = [e["name"] for name in (ENGINE, NAME) for e in pod_of(objects, name)[1]["env"]]
    unknown = [k for k in [*data, *env] if k.startswith("SEG_") and k not in ENV_DOCS]
    assert not unknown, unknown


ENGINE_TOKEN_SECRET = "paligemma-engine-token"


def test_scale_out_tiers_share_the_engine_token_as_a_mounted_secret():
    """Both tiers read the same Secret's key from SEG_ENGINE_TOKEN_FILE: the engine checks it, the public
    tier sends it. Required: a missing Secret keeps the pods pending instead of starting an open engine."""
    objects = scale_out()
    sources = set()
    for name in (ENGINE, NAME):
        pod, container = pod_of(objects, name)
        path = Path(env_of(container)["SEG_ENGINE_TOKEN_FILE"]["value"])
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"].get("optional", False) is False, name
        [item] = [i for i in volume["secret"]["items"] if i["path"] == path.name]
        sources.add((volume["secret"]["secretName"], item["key"], str(path)))
    assert sources == {(ENGINE_TOKEN_SECRET, "token", "/run/secrets/engine_token")}


@pytest.mark.parametrize("directory", SINGLE_POD, ids=ids(SINGLE_POD))
def test_one_pod_overlays_need_no_engine_token(directory):
    pod = rendered(directory)["Deployment"]["spec"]["template"]["spec"]
    assert "SEG_ENGINE_TOKEN_FILE" not in env_of(pod["containers"][0])
    assert ENGINE_TOKEN_SECRET not in {v.get("secret", {}).get("secretName") for v in pod["volumes"]}


MONITORING_LABEL = {"paligemma-segmentation/monitoring": "true"}


def test_scale_out_engine_takes_connections_only_from_the_public_tier_and_monitoring():
    objects = scale_out()
    policies = [o for (kind, _), o in objects.items() if kind == "NetworkPolicy"]
    [policy] = policies
    spec = policy["spec"]
    engine_labels = objects[("Deployment", ENGINE)]["spec"]["template"]["metadata"]["labels"]
    public_labels = objects[("Deployment", NAME)]["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert not spec["podSelector"]["matchLabels"].items() <= public_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    _, engine = pod_of(objects, ENGINE)
    [port] = engine["ports"]
    public_rule, monitoring_rule = spec["ingress"]
    for rule in (public_rule, monitoring_rule):
        assert rule["ports"] == [{"port": port["name"], "protocol": "TCP"}]
        [peer] = rule["from"]
        assert len(peer) == 1, "one selector per peer: two in one entry would mean their intersection"
    # Public-tier pods of this namespace only (a podSelector without namespaceSelector), not the engines.
    selector = public_rule["from"][0]["podSelector"]["matchLabels"]
    assert selector.items() <= public_labels.items() and not selector.items() <= engine_labels.items()
    # Any pod of a namespace carrying the documented label (Prometheus scraping /metrics).
    assert monitoring_rule["from"][0] == {"namespaceSelector": {"matchLabels": MONITORING_LABEL}}
    [(key, value)] = MONITORING_LABEL.items()
    for documented in (ROOT / "docs" / "deployment.md", SCALE_OUT / "engine-networkpolicy.yaml"):
        assert f"kubectl label namespace monitoring {key}={value}" in documented.read_text(), documented
