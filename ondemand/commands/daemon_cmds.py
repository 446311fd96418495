"""`ondemand serve` (the daemon) and its clients: `submit`, `status`, `load`, `unload`.

The clients are the typed `ondemand.sdk.Client` (docs/client.md).  Nothing here imports torch:
the daemon's worker is a separate interpreter."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ondemand import config as config_mod
from ondemand.errors import DaemonUnreachable, OndemandError, RemoteError


def _config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(getattr(args, "config", None) or config_mod.default_config_path())


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="daemon URL (default: ONDEMAND_URL, else the config's "
                                 "server.host:server.port)")
    p.add_argument("--config", type=Path, help="config file (default: ONDEMAND_CONFIG or "
                                               "./config.toml)")


def _segment_args(p: argparse.ArgumentParser) -> None:
    """--segments/--window-s/--hop-s: a timeline of a long recording (docs/recordings.md)."""
    p.add_argument("--segments", choices=["none", "vad", "fixed"], default="none",
                   help="none: one result for the whole clip (at most audio.max_seconds); "
                        "vad: one per stretch of speech; fixed: one per window (a timeline, "
                        "recordings up to audio.max_segmented_seconds)")
    p.add_argument("--window-s", type=float, help="--segments fixed: window length, seconds "
                                                  "(default: config segments.window_s)")
    p.add_argument("--hop-s", type=float, help="--segments fixed: seconds between window "
                                               "starts (default: config segments.hop_s)")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the scale-to-zero daemon (HTTP API v1)")
    s.add_argument("--config", type=Path, help="config file (default: ONDEMAND_CONFIG or "
                                               "./config.toml)")
    s.add_argument("--model", help="model directory or ModelScope id (overrides model.path/id)")
    s.set_defaults(func=cmd_serve)

    p = sub.add_parser("submit", help="send audio files to the daemon (JSON lines out)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--wait", action="store_true", help="wait for the results")
    p.add_argument("--granularity", choices=["utterance", "frame"], default="utterance")
    p.add_argument("--embeddings-dir", type=Path,
                   help="also fetch embeddings into DIR/{key}.npy (implies --wait)")
    p.add_argument("--parallel", type=int, default=8, help="concurrent uploads (default 8)")
    p.add_argument("--callback-url", help="the daemon POSTs each job's final document here "
                                          "(docs/webhooks.md)")
    _segment_args(p)
    _client_args(p)
    p.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="the daemon's worker and queue state (JSON)")
    _client_args(st)
    st.set_defaults(func=cmd_status)

    lo = sub.add_parser("load", help="load the model now (optionally keep it loaded)")
    lo.add_argument("--hold", metavar="DURATION",
                    help="stay loaded at least this long: 90s, 30m, 9h, 1h30m")
    lo.add_argument("--no-wait", action="store_true", help="return before the load finishes")
    _client_args(lo)
    lo.set_defaults(func=cmd_load)

    un = sub.add_parser("unload", help="unload the model after in-flight work")
    un.add_argument("--exit", action="store_true",
                    help="also end the worker process (frees all GPU memory)")
    _client_args(un)
    un.set_defaults(func=cmd_unload)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start-up refusals (bad config, storage.dir unusable or held by another daemon, damaged
    job database, port in use) are OndemandErrors: one line and exit 2 from cli.main."""
    import asyncio
    import signal

    # Until serve() has its handlers, SIGINT/SIGTERM wait (blocked) rather than interrupt an
    # import with a KeyboardInterrupt traceback or kill a half-opened daemon; serve() unblocks
    # them and a pending one then stops the daemon in order (issue 10).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    from ondemand.daemon.app import serve

    cfg = _config(args)
    if args.model:
        cfg = config_mod.with_model(cfg, args.model)
    return asyncio.run(serve(cfg))  # 1 when an owner task failed (daemon/guard.py)


def _client(args: argparse.Namespace) -> Any:
    """The typed client (ondemand.sdk.Client) for --url / ONDEMAND_URL / the config's address,
    with ONDEMAND_TOKEN, else the config's server.token."""
    from ondemand.client import default_url
    from ondemand.sdk import Client

    cfg = _config(args)
    return Client(args.url or default_url(cfg), token=cfg.auth_token())


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def cmd_submit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    client = _client(args)
    wait = args.wait or args.embeddings_dir is not None
    if args.embeddings_dir is not None:
        args.embeddings_dir.mkdir(parents=True, exist_ok=True)

    def one(name: str) -> dict[str, Any]:
        key = Path(name).stem
        try:
            accepted = client.submit(Path(name), granularity=args.granularity,
                                     embedding=args.embeddings_dir is not None, key=key,
                                     callback_url=args.callback_url, segments=args.segments,
                                     window_s=args.window_s, hop_s=args.hop_s)
            if not wait:
                return {"file": name, "key": key, **accepted.raw}
            job = client.wait(accepted.id)
            if job.status != "done":
                return {"key": key, "file": name, "id": job.id,
                        "error": job.raw.get("error") or {"code": job.status, "message": ""}}
            if args.embeddings_dir is not None:
                data = client.embedding_bytes(job.id)
                (args.embeddings_dir / f"{key}.npy").write_bytes(data)
            return dict(job.raw["result"])
        except DaemonUnreachable:
            raise
        except OndemandError as e:  # an error answer: the API's class (RemoteError: unknown)
            code = e.remote_code if isinstance(e, RemoteError) else e.code
            return {"key": key, "file": name, "error": {"code": code, "message": e.message}}
        except OSError as e:
            return {"key": key, "file": name,
                    "error": {"code": "unreadable", "message": f"cannot read {name}: {e.strerror}"}}

    failed = 0
    bar = tqdm(total=len(args.files), unit="file", disable=len(args.files) < 2 or None,
               file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures: list[Future[dict[str, Any]]] = [pool.submit(one, f) for f in args.files]
        for fut in futures:
            fut.add_done_callback(lambda _f: bar.update(1))
        try:
            for fut in futures:
                out = fut.result()
                failed += "error" in out
                _print(out)
        finally:
            bar.close()
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    _print(_client(args).status().raw)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from ondemand.durations import parse_duration

    try:
        hold = parse_duration(args.hold) if args.hold else 0.0
    except ValueError as e:
        raise OndemandError(f"--hold: {e}") from None
    _print(_client(args).load(hold_s=hold, wait=not args.no_wait).raw)
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    _print(_client(args).unload(exit=args.exit).raw)
    return 0
