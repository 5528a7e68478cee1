"""A repository rule that builds the project's Python virtualenv from the lock file.

Bazel re-runs it only when the lock file (or this rule) changes, so a second `bazelw`
invocation is a no-op. The environment is made with the host `python3` (3.11) and
`pip install --no-deps --require-virtualenv -r requirements.lock`, so what is installed is
exactly what the lock says; `pip check` then proves the lock is complete.
"""

_BUILD = """
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

exports_files(glob(["venv/bin/*"]))

filegroup(
    name = "site_packages",
    srcs = glob(["venv/lib/python3*/site-packages/**"], exclude = ["**/__pycache__/**"]),
)
"""

def _run(ctx, args, what, timeout = 1800):
    res = ctx.execute(args, timeout = timeout, quiet = False)
    if res.return_code != 0:
        fail("python_venv: {} failed ({}):\n{}\n{}".format(what, res.return_code, res.stdout, res.stderr))
    return res

# `pip check` lines the lock accepts on purpose (requirements-nodeps.in says why); any other
# line fails the build.
_KNOWN_CONFLICTS = [
    "pipecat-ai 1.14.0 has requirement protobuf<7,>=5.29.6, but you have protobuf 7.",
]

def _pip_check(ctx, pip):
    res = ctx.execute([pip, "check"], timeout = 600, quiet = True)
    if res.return_code == 0:
        return
    unexpected = [
        line
        for line in res.stdout.splitlines()
        if line.strip() and not [known for known in _KNOWN_CONFLICTS if line.startswith(known)]
    ]
    if unexpected or res.stderr.strip():
        fail("python_venv: pip check (is the lock complete?) failed:\n{}\n{}".format(res.stdout, res.stderr))

def _python_venv_impl(ctx):
    lock = ctx.path(ctx.attr.lock)
    host_python = ctx.os.environ.get("VOICEEDGE_HOST_PYTHON", "") or ctx.which("python3.11") or ctx.which("python3")
    if not host_python:
        fail("python_venv: no python3 on PATH; run ./bazelw, which installs it")
    ctx.report_progress("creating virtualenv with {}".format(host_python))
    _run(ctx, [host_python, "-c", "import sys; assert sys.version_info[:2] == (3, 11), sys.version"], "python 3.11 check")
    _run(ctx, [host_python, "-m", "venv", "venv"], "venv creation")
    pip = str(ctx.path("venv/bin/pip"))
    ctx.report_progress("pip install -r {} (first run takes a minute)".format(lock))
    _run(ctx, [pip, "install", "--disable-pip-version-check", "--no-input", "--no-deps", "-q", "-r", str(lock)], "pip install")
    _pip_check(ctx, pip)
    ctx.file("BUILD.bazel", _BUILD.format(python = ctx.path("venv/bin/python")))
    ctx.file("WORKSPACE", "workspace(name = \"{}\")\n".format(ctx.name))

python_venv = repository_rule(
    implementation = _python_venv_impl,
    attrs = {
        "lock": attr.label(allow_single_file = True, mandatory = True),
    },
    environ = ["VOICEEDGE_HOST_PYTHON"],
    local = False,
)
