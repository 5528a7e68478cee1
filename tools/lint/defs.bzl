"""Lint inputs: every package exposes its sources once, the lint tests gather them."""

def lint_srcs(name = "lint_srcs", extra = []):
    """Declares the files of this package that ruff, mypy and buildifier check.

    Args:
      name: the filegroup's name; //tools/lint expects the default.
      extra: more files (for example WORKSPACE at the root).
    """
    native.filegroup(
        name = name,
        srcs = native.glob(
            ["**/*.py", "**/*.pyi", "BUILD.bazel", "**/*.bzl"],
            exclude = ["bazel-*/**", "tools/bazel/**"],
        ) + extra,
        visibility = [
            "//tools/docs:__pkg__",
            "//tools/lint:__pkg__",
        ],
    )
