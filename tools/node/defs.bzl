"""realtime_events_test: server events checked by the OpenAI Agents SDK's own parser."""

load("//tools/testing:defs.bzl", "py_pytest")

def realtime_events_test(name, events, allow_generic = [], **kwargs):
    """A test that fails when any event of a JSONL file is not a typed SDK event.

    Each line is one server event (JSON), as voiceedge sends it on the data channel. The
    pinned @openai/agents-realtime parses it exactly as its transports do; an event it files
    as generic (unknown type, missing `event_id`, renamed field) fires no typed SDK event.

    Args:
      name: target name.
      events: label of the JSONL file.
      allow_generic: event types voiceedge sends knowingly outside the SDK's schema.
      **kwargs: passed to py_pytest (size, tags, ...).
    """
    py_pytest(
        name = name,
        srcs = ["//tools/node:realtime_events_test.py"],
        data = [
            events,
            "//tools/node:realtime_events.js",
            "@node_tools//:agents_realtime_events",
            "@node_tools//:agents_realtime_events_module",
        ],
        env = {
            "REALTIME_EVENTS": "$(rootpath %s)" % events,
            "REALTIME_EVENTS_ALLOW_GENERIC": " ".join(allow_generic),
            "REALTIME_EVENTS_SDK": "$(rootpath @node_tools//:agents_realtime_events_module)",
            "REALTIME_EVENTS_VALIDATOR": "$(rootpath //tools/node:realtime_events.js)",
        },
        deps = ["//tools/node:realtime_events"],
        **kwargs
    )
