"""The cluster agent: the one process of ours that is a Ray driver (`python -m
ondemand.cluster.agent`, spawned and owned by cluster/link.py when `cluster.backend = "ray"`).

It keeps Ray out of the front end's process (docs/cluster.md, "Memory"): it connects to the
cluster, deploys the Serve application (declaratively, from the import path
`ondemand.worker.ray_replica:build`, so that a new `min_replicas` for a hold is a lightweight
update that never restarts a replica), and then every `poll_s` relays what happens to the front
end: the replicas' lifecycle reports from the registry actor, replicas the Serve controller no
longer lists (killed, lost with their node), the application's status.  It speaks
cluster/messages.py on stdin/stdout, like the worker speaks protocol.py.

Invariants:
- fd 1 is pointed at stderr at start (Ray and its libraries print): only `send` writes the
  message stream.
- It never outlives the front end: EOF on stdin ends it, and on Linux the kernel SIGKILLs it when
  its parent dies (PR_SET_PDEATHSIG), like the worker.
- The cluster going away is not handled here beyond saying so: after three failed looks in a row
  (or a failed connect) it sends `unreachable` with the reason and exits 3; the front end starts
  a new agent after `cluster.retry_s`, which reconnects and redeploys.  One path for "never
  reachable", "lost" and "restarted".
- Other Serve applications deployed declaratively on the cluster are kept: ours is merged into
  the controller's current configs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
import warnings
from typing import IO, Any

from ondemand.cluster import messages as m

log = logging.getLogger("ondemand.cluster.agent")

FAILURES_BEFORE_UNREACHABLE = 3
RAY_TIMEOUT_S = 15.0  # one call to the controller or the registry
LIVE_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION")
FOREVER_S = 10 * 365 * 86400.0  # worker.exit_after_s = -1: never scale to zero


class Agent:
    def __init__(self, start: m.Start, out: IO[str]) -> None:
        self.start = start
        self.out = out
        self.ops: queue.Queue[m.Op] = queue.Queue()
        self.min_replicas = start.scaling.min_replicas
        self.registry: Any = None
        self.client: Any = None
        self.seq = 0
        self.known: dict[str, m.ReplicaEvent] = {}  # live replicas, their last event
        self.app_status = ""
        self.waiting: tuple[int, float] | None = None  # (min replicas, deadline) for Applied
        self.failures = 0

    def send(self, event: m.Event) -> None:
        self.out.write(m.encode(event))
        self.out.flush()

    # -- connect and deploy ------------------------------------------------------------------
    def connect(self) -> None:
        import ray
        from ray import serve
        from ray.serve.context import _get_global_client

        from ondemand.worker.ray_replica import NAMESPACE, REGISTRY, Registry

        s = self.start
        ray.init(address=s.address, namespace=NAMESPACE, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=False)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        gcs = ray.get_runtime_context().gcs_address
        self.send(m.Connected(address=str(gcs), ray_version=ray.__version__, nodes=nodes))
        self.registry = ray.remote(Registry).options(
            name=REGISTRY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0).remote()
        serve.start(http_options={"host": s.serve_host, "port": s.serve_port})
        self.client = _get_global_client()
        self.deploy()
        self.wait_routed(time.monotonic() + s.connect_timeout_s)
        self.send(m.Deployed(app=s.app, min_replicas=self.min_replicas))

    def wait_routed(self, deadline: float) -> None:
        """Until the application is RUNNING (its route answers) or failed: a batch posted
        earlier would get a 404 (measured: about 2 s after deploy_apps on a loaded machine)."""
        while time.monotonic() < deadline:
            app = self.client.get_serve_details().get("applications", {}).get(self.start.app)
            status = str((app or {}).get("status", "")).split(".")[-1]
            if status in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"):
                if status != "RUNNING":
                    log.warning("agent: application %s is %s: %s", self.start.app, status,
                                (app or {}).get("message", ""))
                return
            time.sleep(min(0.2, self.start.poll_s))
        raise TimeoutError(f"application {self.start.app} not running within "
                           f"cluster.connect_timeout_s={self.start.connect_timeout_s:g}s")

    def app_config(self) -> dict[str, Any]:
        s, sc = self.start, self.start.scaling
        autoscaling = {
            "min_replicas": self.min_replicas, "max_replicas": sc.max_replicas,
            "initial_replicas": self.min_replicas,
            "target_ongoing_requests": sc.batches_per_replica,
            "upscale_delay_s": sc.upscale_delay_s, "downscale_delay_s": sc.downscale_delay_s,
            "downscale_to_zero_delay_s": (FOREVER_S if sc.downscale_to_zero_delay_s < 0
                                          else sc.downscale_to_zero_delay_s),
            "metrics_interval_s": sc.metrics_interval_s,
            "look_back_period_s": sc.look_back_period_s,
        }
        from ondemand.worker.ray_replica import DEPLOYMENT

        deployment = {
            "name": DEPLOYMENT,
            "max_ongoing_requests": sc.batches_per_replica,
            "ray_actor_options": {"num_cpus": sc.cpus_per_replica,
                                  "num_gpus": sc.gpus_per_replica},
            "autoscaling_config": autoscaling,
        }
        return {
            "name": s.app, "route_prefix": f"/{s.app}",
            "import_path": "ondemand.worker.ray_replica:build",
            "args": {"spec": m.encode_spec(s.replica)},
            "runtime_env": {"env_vars": dict(s.env)} if s.env else {},
            "deployments": [deployment],
        }

    def deploy(self) -> None:
        import ray
        from ray.serve.schema import ServeDeploySchema

        ours = self.app_config()
        others = ray.get(self.client._controller.get_app_configs.remote(),
                         timeout=RAY_TIMEOUT_S)
        apps = [a.model_dump(exclude_unset=True) for name, a in others.items()
                if name != self.start.app]
        with warnings.catch_warnings():  # metrics_interval_s is "deprecated" but still used
            warnings.simplefilter("ignore")
            config = ServeDeploySchema.model_validate({"applications": [*apps, ours]})
        self.client.deploy_apps(config)
        log.info("agent deployed app=%s min_replicas=%d", self.start.app, self.min_replicas)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        while True:
            deadline = time.monotonic() + self.start.poll_s
            while True:
                try:
                    op = self.ops.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if isinstance(op, m.Exit):
                    return 0
                if isinstance(op, m.SetMin):
                    self.set_min(op)
            try:
                self.poll()
            except Exception as e:  # the cluster (or our connection to it) is failing
                self.failures += 1
                log.warning("agent: look at the cluster failed (%d in a row): %s",
                            self.failures, e)
                if self.failures >= FAILURES_BEFORE_UNREACHABLE:
                    self.send(m.Unreachable(reason=f"the Ray cluster stopped answering: {e}"))
                    return 3
            else:
                self.failures = 0

    def set_min(self, op: m.SetMin) -> None:
        self.min_replicas = max(self.start.scaling.min_replicas, op.min_replicas)
        try:
            self.deploy()
        except Exception as e:
            self.send(m.Applied(min_replicas=self.min_replicas, error=f"deploy failed: {e}"))
            return
        if op.wait and self.min_replicas > 0:
            self.waiting = (self.min_replicas, time.monotonic() + op.timeout_s)
        else:
            self.send(m.Applied(min_replicas=self.min_replicas))

    def poll(self) -> None:
        import ray

        seq, lines = ray.get(self.registry.since.remote(self.seq), timeout=RAY_TIMEOUT_S)
        self.seq = seq
        for line in lines:
            event = m.decode_event(line)
            if not isinstance(event, m.ReplicaEvent) or event.app != self.start.app:
                continue  # another daemon's application on the same cluster
            if event.state == "exited":
                if self.known.pop(event.replica, None) is None:
                    continue  # already reported gone
            else:
                self.known[event.replica] = event
            self.send(event)
        details = self.client.get_serve_details()
        app = details.get("applications", {}).get(self.start.app)
        if app is None:
            log.warning("agent: application %s is not deployed (removed?): deploying it",
                        self.start.app)
            self.deploy()
            return
        status, message = str(app.get("status", "")), str(app.get("message", ""))
        if status != self.app_status:
            self.app_status = status
            self.send(m.AppStatus(status=status.split(".")[-1], message=message))
        replicas = []
        for dep in app.get("deployments", {}).values():
            replicas.extend(dep.get("replicas", []))
        live = {r["replica_id"]: r for r in replicas
                if str(r.get("state", "")).split(".")[-1] in LIVE_STATES}
        now = time.time()
        for rid, last in list(self.known.items()):
            if rid not in live:
                del self.known[rid]
                with contextlib.suppress(Exception):
                    self.registry.forget.remote(rid)
                self.send(m.ReplicaEvent(
                    replica=rid, node=last.node, node_ip=last.node_ip, pid=last.pid,
                    device=last.device, state="exited", at=now, app=self.start.app,
                    reason="gone from the Serve controller (killed, or its node lost)"))
        for rid, r in live.items():
            if rid not in self.known:  # started, but no report from it yet
                event = m.ReplicaEvent(
                    replica=rid, node=str(r.get("node_id") or ""),
                    node_ip=str(r.get("node_ip") or ""), pid=int(r.get("pid") or 0),
                    device=self.start.replica.device, state="loading",
                    at=float(r.get("start_time_s") or now), app=self.start.app)
                self.known[rid] = event
                self.send(event)
        if self.waiting is not None:
            want, deadline = self.waiting
            running = sum(1 for r in live.values()
                          if str(r.get("state", "")).split(".")[-1] == "RUNNING")
            if running >= want:
                self.waiting = None
                self.send(m.Applied(min_replicas=want))
            elif time.monotonic() > deadline:
                self.waiting = None
                self.send(m.Applied(min_replicas=want, error=(
                    f"{running} of {want} replica(s) running after the timeout; "
                    f"application status {self.app_status}: {message}")))


def _protocol_stream() -> IO[str]:
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _read_ops(agent: Agent) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            agent.ops.put(m.decode_op(line))
        except Exception as e:
            log.warning("agent pid=%d ignored a line that is not the protocol: %s",
                        os.getpid(), e)
    agent.ops.put(m.Exit())


def main() -> int:
    from ondemand.worker.main import die_with_parent

    die_with_parent()
    out = _protocol_stream()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    first = sys.stdin.readline()
    start = m.decode_op(first)
    if not isinstance(start, m.Start):
        log.error("agent: the first line must be start, got %s", start.TAG)
        return 2
    agent = Agent(start, out)
    agent.send(m.Hello(pid=os.getpid()))
    threading.Thread(target=_read_ops, args=(agent,), name="ops", daemon=True).start()
    try:
        agent.connect()
    except Exception as e:
        log.warning("agent: cannot use the Ray cluster at %s: %s", start.address, e)
        agent.send(m.Unreachable(reason=f"cannot connect to the Ray cluster at "
                                        f"{start.address!r}: {e}"))
        return 3
    return agent.run()


if __name__ == "__main__":
    code = main()
    # Skip Ray's atexit disconnect (seconds on a loaded machine): the GCS sees the driver go
    # either way, and the registry actor is detached.  Our stream is flushed per message.
    sys.stderr.flush()
    os._exit(code)
