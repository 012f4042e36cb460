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
