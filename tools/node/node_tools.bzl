"""A repository rule that installs the project's npm packages from tools/node/package-lock.json.

Re-runs only when package.json or package-lock.json change. The two files are copied (not
symlinked) into the external repository and installed with `npm ci`, which never writes the
lock: a symlinked lock under `npm install` was rewritten in the source tree by the first
build of every fresh clone. `npm ci` refuses a lock that lacks any optional dependency of a
locked package, even one for another platform (buf's darwin and win32 binaries); the tracked
lock is therefore the complete one `npm install` writes on any machine, with every
platform's entry. npm skips the entries whose `os`/`cpu` do not match at install time, so the
one lock serves Linux x64 and arm64 (and macOS) alike. //tools/node:lock_test keeps it so.
"""

_BUILD = """
package(default_visibility = ["//visibility:public"])

sh_binary(name = "buf", srcs = ["buf.sh"])

sh_binary(name = "buildifier", srcs = ["buildifier.sh"])

# The lock as installed (a copy of the tracked one, which npm ci must leave unchanged) and
# npm's record of what it put into node_modules: //tools/node:lock_test compares them.
exports_files(["package-lock.json", "node_modules/.package-lock.json"])

# The OpenAI Agents SDK's self-contained browser build (UMD: a plain <script> defines the
# global OpenAIAgentsRealtime). package.json's "browser" field names `.umd.cjs`, but 0.20.0
# ships it as `.umd.js`; the repository rule checks that the file exists.
filegroup(
    name = "agents_realtime_bundle",
    srcs = ["{bundle}"],
)

# The SDK's event schemas (`parseRealtimeEvent`, not exported by the package's entry points):
# the module alone (for $(rootpath)), and with zod, the one package it requires at run time.
filegroup(
    name = "agents_realtime_events_module",
    srcs = ["{events}"],
)

filegroup(
    name = "agents_realtime_events",
    srcs = ["{events}"] + glob(["node_modules/zod/**"], exclude = ["node_modules/zod/src/**"]),
)
"""

_WRAPPER = """#!/usr/bin/env bash
exec "{bin}" "$@"
"""

_AGENTS_REALTIME = "node_modules/@openai/agents-realtime/"
_BUNDLE = _AGENTS_REALTIME + "dist/bundle/openai-realtime-agents.umd.js"
_EVENTS = _AGENTS_REALTIME + "dist/openaiRealtimeEvents.js"

def _node_tools_impl(ctx):
    lock = ctx.read(ctx.attr.package_lock)
    ctx.file("package.json", ctx.read(ctx.attr.package_json), executable = False)
    ctx.file("package-lock.json", lock, executable = False)
    npm = ctx.which("npm")
    if not npm:
        fail("node_tools: npm is not on PATH; run ./bazelw, which installs it")
    ctx.report_progress("npm ci (buf, buildifier, @openai/agents-realtime)")
    res = ctx.execute([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], timeout = 900, quiet = True)
    if res.return_code != 0:
        fail(("node_tools: npm ci failed. After changing tools/node/package.json, run " +
              "`npm install` in tools/node and commit the complete lock it writes.\n{}\n{}").format(res.stdout, res.stderr))
    if ctx.read("package-lock.json") != lock:
        fail("node_tools: npm ci rewrote package-lock.json; commit the lock `npm install` writes in tools/node")
    for tool in ["buf", "buildifier"]:
        binary = ctx.path("node_modules/.bin/" + tool)
        if not binary.exists:
            fail("node_tools: {} missing after npm ci".format(tool))
        ctx.file(tool + ".sh", _WRAPPER.format(bin = binary), executable = True)
    for path in [_BUNDLE, _EVENTS]:
        if not ctx.path(path).exists:
            fail("node_tools: {} missing after npm ci (did @openai/agents-realtime move it?)".format(path))
    ctx.file("BUILD.bazel", _BUILD.format(bundle = _BUNDLE, events = _EVENTS))
    ctx.file("WORKSPACE", "workspace(name = \"{}\")\n".format(ctx.name))

node_tools = repository_rule(
    implementation = _node_tools_impl,
    attrs = {
        "package_json": attr.label(allow_single_file = True, mandatory = True),
        "package_lock": attr.label(allow_single_file = True, mandatory = True),
    },
)
