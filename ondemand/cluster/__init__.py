"""The cluster backend (docs/cluster.md): batches on a Ray Serve application instead of the one
local worker.  Front-end side, torch-free, and ray-free: the front end speaks HTTP to the
replicas (dispatch.py) and JSON lines to the agent process (link.py <-> agent.py), which is the
only one of our processes that imports ray as a driver.  messages.py and wire.py are pure, shared
with the agent and the replica (worker/ray_replica.py)."""
