"""`netsim`: the testbed from a shell (as root).

    ./bazelw run //tools/netsim:cli -- call                  # standard layout + edge + one call
    ./bazelw run //tools/netsim:cli -- call --delay-ms 25 --jitter-ms 20 --loss 0.03 --burst 3
    ./bazelw run //tools/netsim:cli -- up                    # standard layout, held until Ctrl-C
    ./bazelw run //tools/netsim:cli -- up --layout my.net --nat symmetric
    ./bazelw run //tools/netsim:cli -- impair --prefix P up delay_ms=30 loss=0.02
    ./bazelw run //tools/netsim:cli -- rebind --prefix P      # the NAT picks new public ports
    ./bazelw run //tools/netsim:cli -- sweep [--all]          # namespaces of dead runs

`up` prints the run's prefix and its namespaces (`ip netns exec <prefix>client bash` gives a
shell on a host); `impair` and `rebind` act on that running testbed from another terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from aiortc import RTCPeerConnection

from examples.python_client.client import CallResult, ToneTrack, dominant_frequency, run_call
from tools.netsim import layout, nat, net
from tools.netsim.forwarder import ImpairedLink, ask, control_path
from tools.netsim.impair import Profile

API_KEY = "sk-netsim-cli-0123456789"


def _profile(args: argparse.Namespace) -> Profile:
    return Profile(
        delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, loss=args.loss, burst=args.burst
    )


def _up(args: argparse.Namespace) -> int:
    parsed = layout.parse(Path(args.layout).read_text()) if args.layout else layout.standard()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with net.Testbed(parsed) as bed:
        if any(h.name == "nat" for h in parsed.hosts) and any(
            h.name == "inet" for h in parsed.hosts
        ):
            nat.Nat(bed, "nat", "inet", args.nat).apply()
        for index, _ in enumerate(parsed.impaired_links()):
            ImpairedLink(bed, index, _profile(args), _profile(args))
        print(
            json.dumps({"prefix": bed.prefix, "namespaces": layout.namespaces(parsed, bed.prefix)})
        )
        print("netsim: up; Ctrl-C tears it down", flush=True)
        stop.wait(args.hold_s if args.hold_s > 0 else None)
    return 0


def _impair(args: argparse.Namespace) -> int:
    bed = net.Testbed(layout.standard(), prefix=args.prefix)
    changes = dict(item.split("=", 1) for item in args.settings)
    reply = ask(
        control_path(bed.run_dir, args.link),
        {
            "op": "set",
            "direction": args.direction,
            "profile": {k: float(v) for k, v in changes.items()},
        },
    )
    print(json.dumps(reply))
    print(json.dumps(ask(control_path(bed.run_dir, args.link), {"op": "stats"})))
    return 0


def _rebind(args: argparse.Namespace) -> int:
    bed = net.Testbed(layout.standard(), prefix=args.prefix)
    router = nat.Nat.running(bed, args.router)
    router.rebind()
    print(f"netsim: {args.router} now maps from generation {router.config.generation}")
    return 0


def _call(args: argparse.Namespace) -> int:
    from tools.netsim.edge import standard_edge  # the edge's binaries: only this command

    workdir = Path(tempfile.mkdtemp(prefix="netsim-call-"))
    with standard_edge(workdir, API_KEY, up=_profile(args), down=_profile(args)) as edge:
        print(
            f"netsim: edge up; relay {edge.relay[0]}:{edge.relay[1]}, API {edge.http_base}, "
            f"service logs {workdir / 'services.log'}",
            flush=True,
        )
        track = ToneTrack()

        async def speak_then_listen(pc: RTCPeerConnection, result: CallResult) -> None:
            await asyncio.sleep(1.2)  # one 440 Hz utterance; the echo agent says it back
            track.silent = True
            await result.wait_event("response.done", timeout_s=args.seconds + 10)

        with edge.testbed.entered("client"):
            result = asyncio.run(
                run_call(edge.http_base, API_KEY, track=track, during=speak_then_listen)
            )
    audio = result.audio()
    print(
        json.dumps(
            {
                "status": result.status,
                "connected": result.connected,
                "selected_remote_candidate": list(result.remote_candidate or ()),
                "received_s": round(len(audio) / result.received_rate, 2),
                "reply_hz": round(
                    dominant_frequency(audio[-result.received_rate :], result.received_rate)
                ),
                "events": result.event_types(),
            }
        )
    )
    return 0 if result.connected else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "call"):
        command = commands.add_parser(name)
        command.add_argument("--delay-ms", type=float, default=0.0, help="each way")
        command.add_argument("--jitter-ms", type=float, default=0.0)
        command.add_argument("--loss", type=float, default=0.0)
        command.add_argument("--burst", type=float, default=1.0)
    commands.choices["up"].add_argument("--layout", help="layout file (default: standard)")
    commands.choices["up"].add_argument("--nat", choices=nat.NAT_PROFILES, default="masquerade")
    commands.choices["up"].add_argument("--hold-s", type=float, default=0.0)
    commands.choices["call"].add_argument(
        "--seconds", type=float, default=10.0, help="longest wait for the reply"
    )
    impair = commands.add_parser("impair")
    impair.add_argument("--prefix", required=True)
    impair.add_argument("--link", type=int, default=0)
    impair.add_argument("direction", choices=("up", "down", "both"))
    impair.add_argument("settings", nargs="+", help="name=value, e.g. delay_ms=30 loss=0.02")
    rebind = commands.add_parser("rebind")
    rebind.add_argument("--prefix", required=True)
    rebind.add_argument("--router", default="nat")
    sweep = commands.add_parser("sweep")
    sweep.add_argument("--all", action="store_true", help="also namespaces of live runs")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        print("\n".join(net.sweep(everything_of_ours=args.all)))
        return 0
    handlers = {"up": _up, "impair": _impair, "rebind": _rebind, "call": _call}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
