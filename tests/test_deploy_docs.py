"""What a platform engineer copies from docs/DEPLOY.md and the Containerfile is checked
against the program: every YAML example parses, every VIBEVOICE_POOL_ variable and
launch flag it uses exists, and the Kubernetes and compose examples keep the image's
contract (its user, volumes, port and entry point, the open /health and /ready, a
grace period longer than the server's own, the host names the server answers to).

No container runs here: tests/test_container.py builds and serves the image.
"""

from __future__ import annotations

import re
import shlex

import yaml
from conftest import ROOT

from vibevoice_pool.api.auth import OPEN_PATHS
from vibevoice_pool.cli import parser
from vibevoice_pool.config import PoolConfig, env_name

DEPLOY = (ROOT / "docs" / "DEPLOY.md").read_text()
CONTAINERFILE = (ROOT / "Containerfile").read_text()
SETTINGS = {env_name(n) for n in PoolConfig.model_fields}
GRACE_S = PoolConfig.model_fields["grace_s"].default


def instructions(name: str) -> list[str]:
    """The arguments of each NAME instruction of the Containerfile (continued lines joined)."""
    text = CONTAINERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def image_env() -> dict[str, str]:
    """The final stage's ENV (NAME=value pairs; values without spaces)."""
    final = CONTAINERFILE.replace("\\\n", " ").rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for m in re.finditer(r"^ENV\s+(.*)$", final, re.M):
        env |= dict(w.split("=", 1) for w in shlex.split(m.group(1)))
    return env


def image_volumes() -> set[str]:
    (volumes,) = instructions("VOLUME")
    return set(yaml.safe_load(volumes))


def test_the_image_user_is_numeric_so_kubernetes_can_check_it_is_not_root():
    """runAsNonRoot refuses to start an image whose USER is a name (it cannot tell
    that the name is not root): CreateContainerConfigError."""
    (user,) = instructions("USER")
    assert re.fullmatch(r"\d+:\d+", user), user
    uid, gid = map(int, user.split(":"))
    assert uid != 0 and gid != 0
    assert f"uid {uid}, gid {gid}" in DEPLOY


def yaml_documents() -> list[dict]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", DEPLOY, re.M | re.S)
    return [d for b in blocks for d in yaml.safe_load_all(b) if d]


def compose() -> tuple[str, dict]:
    """The compose example's one service: (its name, its settings)."""
    (example,) = [d for d in yaml_documents() if "services" in d]
    ((name, service),) = example["services"].items()
    return name, service


def seconds(text: str) -> float:
    """compose's durations: 40s, 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", str(text))
    assert parts, text
    return sum(float(n) * units[u] for n, u in parts)


def test_the_compose_service_answers_to_its_own_name():
    """Another service calls http://vibevoice:7860: the container's host name is its
    id, so without the service's name in allowed_hosts every call is 400 bad_host."""
    name, service = compose()
    listed = service["environment"]["VIBEVOICE_POOL_ALLOWED_HOSTS"].split(",")
    assert name in listed
    assert set(service["environment"]) <= SETTINGS | {"HF_TOKEN"}


def test_the_compose_service_keeps_the_images_contract():
    _, service = compose()
    assert image_volumes() <= {v.split(":")[1] for v in service["volumes"]}
    assert seconds(service["stop_grace_period"]) >= GRACE_S + 5
    if service.get("read_only"):  # the server writes /tmp besides the volumes
        assert "/tmp" in service["tmpfs"]


def kubernetes(kind: str) -> list[dict]:
    return [d for d in yaml_documents() if d.get("kind") == kind]


def the_pod() -> tuple[dict, dict]:
    """The Deployment's pod spec and its one container."""
    (deployment,) = kubernetes("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_the_kubernetes_example_is_there_and_uses_only_settings_and_flags():
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= {
        d.get("kind") for d in yaml_documents()
    }
    _, container = the_pod()
    names = {e["name"] for e in container["env"]}
    assert names <= SETTINGS, names - SETTINGS
    assert {v for v in image_env() if v.startswith("VIBEVOICE_POOL_")} <= SETTINGS
    parser().parse_args(["launch", *container.get("args", [])])  # exits 2 on an unknown flag
    # `docker run ... vibevoice-pool --flag value` in the text: the words after the image
    tails = re.findall(r"docker run \.\.\. vibevoice-pool((?: --?\S+(?: [^-\s`]\S*)?)+)`", DEPLOY)
    assert tails
    for tail in tails:
        parser().parse_args(["launch", *shlex.split(tail)])


def test_the_probes_ask_the_open_paths_on_the_served_port():
    _, container = the_pod()
    port = int(image_env()["VIBEVOICE_POOL_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in ports.values()
    assert not any(e["name"] == "VIBEVOICE_POOL_PORT" for e in container["env"])
    asked = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert ports.get(get["port"], get["port"]) == port, probe
        assert get["path"] in OPEN_PATHS, probe  # a probe sends no key
        asked[probe] = get["path"]
    # Ready: a worker is ready. Live: the process answers (a worker being respawned
    # must not get the pod restarted).
    assert asked == {
        "startupProbe": "/health",
        "livenessProbe": "/health",
        "readinessProbe": "/ready",
    }
    # The port answers once the workers have loaded the model: the startup probe
    # allows minutes for it, and the liveness probe waits for the startup probe.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # The image's own check asks an open path too (/ready), on the port the server uses.
    (check,) = instructions("HEALTHCHECK")
    assert '["vibevoice-pool", "health"]' in check and "/ready" in OPEN_PATHS


def test_the_pod_keeps_tini_and_waits_out_the_servers_grace():
    pod, container = the_pod()
    assert "command" not in container  # `command` replaces the entry point: tini is gone
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = float(env.get("VIBEVOICE_POOL_GRACE_S") or GRACE_S)
    # preStop runs first, within the same period; then the server takes grace_s and
    # a few seconds to stop its workers.
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5


def test_the_pod_runs_as_the_images_user_with_a_read_only_root():
    pod, container = the_pod()
    (user,) = instructions("USER")
    uid, gid = map(int, user.split(":"))
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security.get("runAsUser", uid) == uid and security["fsGroup"] == gid
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert image_volumes() <= mounts
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts  # multiprocessing's sockets, uploads on their way, stacks
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    # The key comes from a Secret, never written in the manifest.
    (key,) = [e for e in container["env"] if e["name"] == "VIBEVOICE_POOL_API_KEY"]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"]


def test_the_pod_answers_to_its_services_names():
    """Another pod calls http://vibevoice:7860: the server answers only to the Host
    names it knows, so without the Service's names every call is 400 bad_host."""
    (service,) = kubernetes("Service")
    _, container = the_pod()
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    listed = env["VIBEVOICE_POOL_ALLOWED_HOSTS"].split(",")
    name = service["metadata"]["name"]
    assert name in listed and f"{name}.default.svc.cluster.local" in listed
    (deployment,) = kubernetes("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
