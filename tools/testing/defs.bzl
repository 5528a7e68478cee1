"""py_pytest: a py_test whose main runs pytest over its own srcs."""

def py_pytest(name, srcs, deps = [], data = [], args = [], size = "small", **kwargs):
    """A test target that runs pytest on `srcs` with the project plugin loaded.

    Args:
      name: target name.
      srcs: test files (test_*.py or *_test.py) and helpers.
      deps: libraries the tests import.
      data: runtime files.
      args: extra pytest arguments.
      size: Bazel test size.
      **kwargs: passed to py_test (tags, timeout, shard_count, env, ...).
    """
    native.py_test(
        name = name,
        srcs = srcs + ["//tools/testing:pytest_main.py"],
        main = "//tools/testing:pytest_main.py",
        deps = deps + ["//tools/testing:ve_plugin"],
        data = data,
        args = ["$(rootpath %s)" % s for s in srcs if s.endswith("_test.py") or s.split("/")[-1].startswith("test_")] + args,
        size = size,
        python_version = "PY3",
        srcs_version = "PY3",
        **kwargs
    )
