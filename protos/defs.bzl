"""Python stubs and descriptor sets for the voiceedge protos, generated with grpcio-tools."""

def _stem(src):
    return src[:-len(".proto")]

def py_grpc_stubs(name, srcs, **kwargs):
    """Generates <x>_pb2.py/.pyi and <x>_pb2_grpc.py/.pyi for each proto in srcs.

    Args:
      name: the genrule name.
      srcs: .proto files, relative to this package (the import root).
      **kwargs: passed to the genrule.

    Returns:
      The generated file names, relative to this package.
    """
    outs = []
    for src in srcs:
        stem = _stem(src)
        outs += [stem + "_pb2.py", stem + "_pb2.pyi", stem + "_pb2_grpc.py", stem + "_pb2_grpc.pyi"]
    native.genrule(
        name = name,
        srcs = srcs,
        outs = outs,
        tools = ["//tools/protoc:grpc_protoc"],
        cmd = " ".join([
            "$(location //tools/protoc:grpc_protoc)",
            "-I" + native.package_name(),
            "--python_out=$(RULEDIR)",
            "--grpc_python_out=$(RULEDIR)",
            "--mypy_out=$(RULEDIR)",
            "--mypy_grpc_out=$(RULEDIR)",
            "$(SRCS)",
        ]).replace("$(SRCS)", " ".join(["$(location %s)" % s for s in srcs])),
        **kwargs
    )
    return outs

def descriptor_set(name, srcs, **kwargs):
    """A FileDescriptorSet (binary) of srcs with imports and source comments included.

    Args:
      name: target name; the output is <name>.binpb.
      srcs: .proto files, relative to this package (the import root).
      **kwargs: passed to the genrule.
    """
    native.genrule(
        name = name,
        srcs = srcs,
        outs = [name + ".binpb"],
        tools = ["//tools/protoc:grpc_protoc"],
        cmd = " ".join([
            "$(location //tools/protoc:grpc_protoc)",
            "-I" + native.package_name(),
            "--include_imports",
            "--include_source_info",
            "--descriptor_set_out=$@",
        ] + ["$(location %s)" % s for s in srcs]),
        **kwargs
    )
