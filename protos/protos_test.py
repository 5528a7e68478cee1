"""The contracts lint clean, load in Python, and generate and compile in C++ and Java."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

PROTO_ROOT = Path(__file__).resolve().parent
SERVICES = {
    "voiceedge.geosteer.v1.GeosteerService",
    "voiceedge.transceiver.v1.TransceiverService",
    "voiceedge.signaling.v1.SignalingService",
    "voiceedge.relay.v1.RelayAdminService",
    "voiceedge.inference.v1.InferenceBridgeService",
}


def _proto_files() -> list[str]:
    # Runfiles are symlinks; the import root is this directory.
    here = Path(__file__).parent
    return sorted(str(p.relative_to(here)) for p in here.glob("voiceedge/*/v1/*.proto"))


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{cmd[0]} failed:\n{result.stdout}\n{result.stderr}"


def test_buf_lint_is_clean(tmp_path: Path) -> None:
    env = dict(os.environ, BUF_CACHE_DIR=str(tmp_path / "buf-cache"))
    buf = os.path.abspath(os.environ["BUF"])
    result = subprocess.run(
        [buf, "lint", "--error-format=text"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_descriptor_set_has_every_service_with_comments() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(
        Path(os.environ["DESCRIPTOR_SET"]).read_bytes()
    )
    services = {
        f"{f.package}.{s.name}"
        for f in fds.file
        if f.package.startswith("voiceedge.")
        for s in f.service
    }
    assert services == SERVICES
    ours = [f for f in fds.file if f.package.startswith("voiceedge.")]
    assert all(f.source_code_info.location for f in ours), "source comments missing"


def test_python_stubs_import_and_expose_services() -> None:
    from voiceedge.geosteer.v1 import geosteer_pb2_grpc
    from voiceedge.inference.v1 import inference_pb2, inference_pb2_grpc
    from voiceedge.relay.v1 import relay_pb2_grpc
    from voiceedge.signaling.v1 import signaling_pb2_grpc
    from voiceedge.transceiver.v1 import transceiver_pb2_grpc

    for module, service in [
        (geosteer_pb2_grpc, "GeosteerService"),
        (transceiver_pb2_grpc, "TransceiverService"),
        (signaling_pb2_grpc, "SignalingService"),
        (relay_pb2_grpc, "RelayAdminService"),
        (inference_pb2_grpc, "InferenceBridgeService"),
    ]:
        assert hasattr(module, f"{service}Stub")
        assert hasattr(module, f"add_{service}Servicer_to_server")
    request = inference_pb2.StreamSessionRequest()
    request.audio_frame.data = b"\x00\x01"
    assert request.WhichOneof("payload") == "audio_frame"


def _system_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not installed: ./bazelw installs it on a fresh machine")
    return path


def test_cpp_generation_compiles(tmp_path: Path) -> None:
    protoc = _system_tool("protoc")
    gxx = _system_tool("g++")
    out = tmp_path / "cpp"
    out.mkdir()
    _run([protoc, "-I.", "-I/usr/include", f"--cpp_out={out}", *_proto_files()], PROTO_ROOT)
    sources = sorted(out.rglob("*.pb.cc"))
    assert len(sources) == len(_proto_files())
    for source in sources:
        _run([gxx, "-std=c++17", "-fsyntax-only", f"-I{out}", str(source)], tmp_path)


def test_java_generation_compiles(tmp_path: Path) -> None:
    protoc = _system_tool("protoc")
    javac = _system_tool("javac")
    jar = Path("/usr/share/java/protobuf.jar")
    if not jar.exists():
        pytest.fail("libprotobuf-java not installed: ./bazelw installs it on a fresh machine")
    out = tmp_path / "java"
    out.mkdir()
    _run([protoc, "-I.", "-I/usr/include", f"--java_out={out}", *_proto_files()], PROTO_ROOT)
    sources = [str(p) for p in sorted(out.rglob("*.java"))]
    assert any(s.endswith("io/voiceedge/inference/v1/StreamSessionRequest.java") for s in sources)
    classes = tmp_path / "classes"
    _run([javac, "-nowarn", "-cp", str(jar), "-d", str(classes), *sources], tmp_path)
    assert (classes / "io/voiceedge/relay/v1/RelayStats.class").exists()
