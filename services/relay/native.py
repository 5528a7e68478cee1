"""The relay's native per-packet path (native/relaycore.c): loading it and binding it to a
Router.

`NativePath` is the Router's `BindingMirror`: the router calls `add`/`remove` from its one
install/remove path (every way a binding is made or dropped goes through it), so the C
table follows without a per-packet call into Python; `pull` moves the C side's per-binding
activity and counters into the router's plain ints and Binding objects, in one batch (the
router calls it before anything reads them: counters, the binding listing, idle expiry).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libs.fastio import fastio
from services.relay.router import (
    _CLASS_OF_FIRST_BYTE,
    DIRECTIONS,
    N_CLASSES,
    N_REASONS,
    Binding,
    Router,
)
from services.relay.settings import NATIVE_PATHS
from voiceedge.relay.v1 import relay_pb2

# Kinds of the datagrams pump_public hands up to the Python router.
ROUTE = 0  # route as it is (STUN from a bound client)
ADMITTED = 1  # unbound STUN within the per-source budget C already charged
LOOKUP = 2  # unbound DTLS/SRTP counted NO_BINDING by C: ask the shared store
_REASONS = bytes(
    (
        relay_pb2.DROP_REASON_UNKNOWN_CLASS,
        relay_pb2.DROP_REASON_RATE_LIMITED,
        relay_pb2.DROP_REASON_NO_BINDING,
        relay_pb2.DROP_REASON_SEND_FAILED,
    )
)


@functools.cache
def load() -> Any:
    """The relaycore extension module, or None if it was not built."""
    return fastio.load_extension(Path(os.path.abspath(__file__)).parent / "native" / "relaycore.so")


def wanted(native_path: str) -> bool:
    """Whether the data plane runs the native path: `auto` when the extension loads, `on`
    requires it (ValueError if it is missing), `off` never."""
    if native_path not in NATIVE_PATHS:
        raise ValueError(f"native_path must be one of {', '.join(NATIVE_PATHS)}")
    if native_path == "off":
        return False
    if load() is None:
        if native_path == "on":
            raise ValueError("native_path on, but services/relay/native:relaycore.so is missing")
        return False
    return True


class NativePath:
    """One data plane's C core: its sockets, its copy of the router's binding table."""

    def __init__(
        self,
        router: Router,
        internal_fd: int,
        public_fds: tuple[int, ...],
        clock: Callable[[], float],
        *,
        lookups: bool,
        gso: bool = False,
        lookups_per_s: float = 256.0,
    ) -> None:
        module = load()
        if module is None:
            raise RuntimeError("services/relay/native:relaycore.so is missing")
        if N_REASONS > module.MAX_REASONS:
            raise RuntimeError(
                f"relaycore holds {module.MAX_REASONS} drop reasons, not {N_REASONS}"
            )
        budget = router.admission.unbound_per_ip
        self.core = module.Core(
            internal_fd,
            public_fds,
            _CLASS_OF_FIRST_BYTE,
            _REASONS,
            budget.rate_per_s,
            budget.burst,
            router.admission.max_tracked_keys,
            lookups,
            gso,
        )
        # A flood from many sources passes every per-source bucket: C sheds what the
        # worker's verification budget would refuse anyway, before a Python call each, and
        # asks Python for at most `lookups_per_s` Redis lookups a second (each one a task
        # and a round trip; the drop is counted NO_BINDING either way).
        verifications = router.admission.verifications
        self.core.limit_unbound(
            relay_pb2.DROP_REASON_OVERLOADED,
            relay_pb2.DROP_REASON_MALFORMED,
            verifications.rate_per_s,
            max(1.0, verifications.burst),
            lookups_per_s,
            max(1.0, lookups_per_s),
        )
        self._clock = clock
        self.pump_public = self.core.pump_public
        self.pump_internal = self.core.pump_internal

    # ---- BindingMirror ----------------------------------------------------------------------

    def add(self, binding: Binding) -> None:
        (ip, port), (media_ip, media_port) = binding.client, binding.media
        self.core.add(ip, port, media_ip, media_port, binding.via, binding)

    def remove(self, binding: Binding) -> None:
        self.core.remove(binding.client[0], binding.client[1])

    def pull(self, router: Router) -> None:
        now = self._clock()
        for binding, packets, size, via, seen in self.core.take_activity():
            binding.packets += packets
            binding.bytes += size
            if seen:
                binding.last_seen = now
                binding.via = via
        rx_p, rx_b, fwd_p, fwd_b, drop_p, drop_b = self.core.take_counters()
        for d in DIRECTIONS:
            for k in range(N_CLASSES):
                router.rx_packets[d][k] += rx_p[d][k]
                router.rx_bytes[d][k] += rx_b[d][k]
                router.fwd_packets[d][k] += fwd_p[d][k]
                router.fwd_bytes[d][k] += fwd_b[d][k]
            for k in range(N_REASONS):
                router.drop_packets[d][k] += drop_p[d][k]
                router.drop_bytes[d][k] += drop_b[d][k]

    def set_via(self, binding: Binding) -> None:
        """After the Python router forwarded a handed-up packet (it may have moved `via`)."""
        self.core.set_via(binding.client[0], binding.client[1], binding.via)

    def stats(self) -> dict[str, int]:
        return dict(self.core.stats())
