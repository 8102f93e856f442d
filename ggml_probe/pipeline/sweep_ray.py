"""The sweep's Ray executor: each cell a Ray task on a local instance or a cluster (`ggml-probe sweep --ray`).

    from ggml_probe.pipeline.sweep import load_spec, run_sweep
    from ggml_probe.pipeline.sweep_ray import RayExecutor
    run_sweep(load_spec("SWEEP.toml"), "/shared/sweeps/x", RayExecutor("10.0.0.1:6379", cpus_per_cell=4))

A cell asks Ray for `cpus_per_cell` CPUs (and `gpus_per_cell` GPUs) and gives llama.cpp exactly that many
threads (a worker's OMP_NUM_THREADS means nothing to llama.cpp); a GPU cell offloads every layer. Workers get
paths and settings, never models, and write their results into the run directories, which the driver reads
back: every node must see the sweep directory and the ladder files at the same paths (checked at the start).
A worker that dies mid-cell is a system failure Ray retries (`max_retries`); the retried cell resumes from
its checkpoints. A cell's own failure comes back as a failed outcome and the rest of the sweep completes.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProbeError
from .sweep import BaseJob, Cell, CellDone, execute_base, execute_cell

DEFAULT_MAX_RETRIES = 3  # worker deaths per cell before it is reported failed


def _ray():
    try:  # an optional extra: only `--ray` needs it
        import ray
    except ImportError:
        raise ProbeError("--ray needs Ray: pip install 'ggml-probe[ray]'") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """One line, fast, for an address nothing listens at (ray.init would wait much longer)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ProbeError(f"--ray {address}: expected HOST:PORT (the head node's GCS address, e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ProbeError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); "
                         "is `ray start --head` running there?") from None


def _visible(paths: list[str]) -> dict[str, Any]:
    """Run on a node: which of the driver's paths this node cannot see."""
    return {"node": socket.gethostname(), "missing": [p for p in paths if not os.path.exists(p)]}


@dataclass
class RayExecutor:
    address: str | None = None  # None: a fresh local instance (unless this process is already connected)
    cpus_per_cell: int = 1
    gpus_per_cell: float = 0
    max_retries: int = DEFAULT_MAX_RETRIES
    started: bool = field(default=False, init=False)  # whether this executor started Ray (and shuts it down)

    @property
    def threads(self) -> int:
        return self.cpus_per_cell

    @property
    def gpu_layers(self) -> str | int:
        return -1 if self.gpus_per_cell > 0 else 0  # a GPU cell offloads every layer (-1: all); a CPU cell none

    def connect(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            return
        if self.address:
            _check_reachable(self.address)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if not self.address:
            kwargs["_node_ip_address"] = "127.0.0.1"
        try:
            ray.init(address=self.address or "local", **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ProbeError(f"cannot join the Ray cluster at {self.address or 'a new local instance'}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.started = True

    def close(self) -> None:
        if self.started:
            _ray().shutdown()
            self.started = False

    def __enter__(self) -> "RayExecutor":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_shared_filesystem(self, out: Path, files: list[Path]) -> None:
        """Every alive node must see the sweep directory (a fresh file in it) and the ladder files."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # with ray, not before

        self.connect()
        probe = out / f".fs-check-{uuid.uuid4().hex}"
        probe.write_text("ggml-probe sweep\n")
        try:
            paths = [str(probe), *map(str, files)]
            visible = ray.remote(num_cpus=0)(_visible)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = [visible.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(paths) for n in nodes]
            for node, seen in zip(nodes, ray.get(refs)):
                if seen["missing"]:
                    raise ProbeError(f"Ray node {node.get('NodeManagerAddress')} ({seen['node']}) cannot see "
                                     f"{seen['missing'][0]}: every node must share the sweep directory and the model "
                                     "store at the same paths (README: Sweeps)")
        finally:
            probe.unlink(missing_ok=True)

    def run(self, bases: dict[str, BaseJob], cells: list[Cell], on_done: CellDone | None = None) -> dict[str, dict]:
        ray = _ray()
        self.connect()
        resources = {"num_cpus": self.cpus_per_cell, "num_gpus": self.gpus_per_cell, "max_retries": self.max_retries}
        base_task = ray.remote(**resources)(execute_base)
        cell_task = ray.remote(**resources)(execute_cell)
        base_refs = {key: base_task.remote(job) for key, job in bases.items()}
        # A text cell's argument is its base job's result: Ray starts it once the base exists.
        pending = {cell_task.remote(cell, base_refs[cell.base] if cell.base else None): cell for cell in cells}
        out: dict[str, dict] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except Exception as exc:  # the worker died more than max_retries times, or Ray itself failed
                outcome = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            out[cell.key] = outcome
            if on_done:
                on_done(cell, outcome)
        return out

