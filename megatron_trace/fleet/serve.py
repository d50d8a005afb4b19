"""Start `sglang.launch_server` or `sglang-router` with an API key read from the environment.

    python -m megatron_trace.fleet.serve server --api-key-env NAME -- <sglang.launch_server args>
    python -m megatron_trace.fleet.serve router --api-key-env NAME -- <sglang_router.launch_router args>

SGLang 0.5.6 and sglang-router 0.3.2 take the key only as `--api-key KEY`, which every user of
the node can read from `ps`. These wrappers parse the remaining arguments with the tools' own
parsers, set the key on the parsed arguments in-process (SGLang's `ServerArgs.api_key`, the
router's `RouterArgs.api_key`), redact it from their repr (SGLang logs its arguments at start)
and start them as their own entry points do. A variable that is named but unset is an error: a
fleet without its key would let anyone on the network in. SGLang's scheduler processes receive
the arguments by pickling, with the class unpatched: check their logs on a first GPU run.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["hide_key", "main", "read_key"]


def read_key(env_name: str) -> str:
    key = os.environ.get(env_name)
    if not key:
        raise SystemExit(f"error: --api-key-env {env_name}: the variable is not set (the job exports the fleet's key "
                         "there before it starts the servers)")
    return key


def hide_key(args, key: str) -> None:
    """Redact the key from the repr of args' class (SGLang logs `server_args=ServerArgs(...)` at
    start): the class is the tool's own, and this process holds one instance."""
    cls = type(args)
    original = cls.__repr__

    def redacted(self) -> str:
        return original(self).replace(key, "<redacted>")

    cls.__repr__ = redacted
    if cls.__str__ is object.__str__ or cls.__str__ is original:
        cls.__str__ = redacted


def _server(rest: list[str], key: str) -> None:
    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    server_args = prepare_server_args(rest)
    server_args.api_key = key
    hide_key(server_args, key)
    try:
        launch_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


def _router(rest: list[str], key: str) -> None:
    from sglang_router.launch_router import launch_router, parse_router_args

    router_args = parse_router_args(rest)
    router_args.api_key = key
    hide_key(router_args, key)
    launch_router(router_args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m megatron_trace.fleet.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["server", "router"])
    p.add_argument("--api-key-env", required=True, help="the NAME of the variable that holds the key")
    a = p.parse_args(argv)
    key = read_key(a.api_key_env)
    if "--api-key" in rest:
        p.error("give the key through --api-key-env, not --api-key (a command line is visible to every user)")
    (_server if a.what == "server" else _router)(rest, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
