"""The GPU worker process: `python -m ondemand.worker`, JSON lines on stdin/stdout
(docs/design.md, "Worker protocol").  torch is imported lazily, on the first `load`."""
