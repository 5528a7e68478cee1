"""A repository rule that installs the npm-distributed lint tools (buf, buildifier).

Re-runs only when package.json or package-lock.json change. `npm install` (not `npm ci`)
because npm's lock for packages with per-platform optional binaries is never "in sync"
for `npm ci`; the lock still pins every version.
"""

_BUILD = """
package(default_visibility = ["//visibility:public"])

sh_binary(name = "buf", srcs = ["buf.sh"])

sh_binary(name = "buildifier", srcs = ["buildifier.sh"])
"""

_WRAPPER = """#!/usr/bin/env bash
exec "{bin}" "$@"
"""

def _node_tools_impl(ctx):
    ctx.symlink(ctx.attr.package_json, "package.json")
    ctx.symlink(ctx.attr.package_lock, "package-lock.json")
    npm = ctx.which("npm")
    if not npm:
        fail("node_tools: npm is not on PATH; run ./bazelw, which installs it")
    ctx.report_progress("npm install (buf, buildifier)")
    res = ctx.execute([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], timeout = 900, quiet = True)
    if res.return_code != 0:
        fail("node_tools: npm install failed:\n{}\n{}".format(res.stdout, res.stderr))
    for tool in ["buf", "buildifier"]:
        binary = ctx.path("node_modules/.bin/" + tool)
        if not binary.exists:
            fail("node_tools: {} missing after npm install".format(tool))
        ctx.file(tool + ".sh", _WRAPPER.format(bin = binary), executable = True)
    ctx.file("BUILD.bazel", _BUILD)
    ctx.file("WORKSPACE", "workspace(name = \"{}\")\n".format(ctx.name))

node_tools = repository_rule(
    implementation = _node_tools_impl,
    attrs = {
        "package_json": attr.label(allow_single_file = True, mandatory = True),
        "package_lock": attr.label(allow_single_file = True, mandatory = True),
    },
)
