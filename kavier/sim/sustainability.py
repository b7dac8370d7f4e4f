"""Utilization → power → energy → CO2 along the GPU timeline (thesis 4.6, eq. 4.7).

The thesis hands this step to OpenDC; here it is computed in the simulator with the same
models (:mod:`kavier.models.power`, Table 4.1) and OpenDC's carbon model (FootPrinter, eq. 4.7:
emissions = power × carbon intensity at each instant).

* **Power** of a timeline interval is the power model at the interval's utilization
  (:func:`kavier.sim.timeline.power_utilization`: compute-bound work at 1, memory-bound work
  at ``memory_bound_utilization``, overheads at 0, capped at ``utilization_cap``); a replica
  draws ``P_idle`` whenever it has no step, from time 0 to the end of the run.
* **Energy** is the exact integral of that piecewise-constant power: a sum over intervals and
  idle gaps, independent of the export rate.
* **CO2**: the carbon intensity ``CI(t)`` is a step function of wall-clock time (the
  simulation's ``start`` plus simulated seconds); power ``P`` from ``t0`` to ``t1`` emits
  ``P · PUE · ∫ CI dt``, evaluated exactly from the running integral of the trace.
* **PUE** (power usage effectiveness) scales GPU (IT) energy to facility energy; emissions
  are charged on facility energy. Units: W, J and Wh named as such; ``CI`` in gCO2/kWh.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from archive.errors import InputError
from kavier.models.power import PowerModel
from kavier.sim.timeline import power_utilization

J_PER_KWH = 3.6e6


class CarbonTrace:
    """A carbon-intensity step function on the simulation's clock.

    Parameters
    ----------
    table : pandas.DataFrame
        ``timestamp`` (UTC) and ``carbon_intensity`` (gCO2/kWh), as from
        :func:`archive.carbon.read_carbon`. Each value holds until the next timestamp; the last
        for one more step.
    start : datetime
        Wall-clock instant of simulated time 0 (timezone-aware).
    name : str
        For messages and the summary.
    """

    def __init__(self, table, start: datetime, name: str = "") -> None:
        seconds = (table["timestamp"] - start).dt.total_seconds().to_numpy(np.float64)
        self.edges_s = np.append(seconds, seconds[-1] + (seconds[-1] - seconds[-2]))
        self.intensity = table["carbon_intensity"].to_numpy(np.float64)
        self.cumulative = np.concatenate(([0.0], np.cumsum(self.intensity * np.diff(
            self.edges_s))))
        self.start, self.name = start, name

    def integral(self, t0, t1) -> np.ndarray:
        """``∫ CI dt`` from ``t0`` to ``t1`` simulated seconds, in gCO2/kWh × s."""
        return (np.interp(t1, self.edges_s, self.cumulative)
                - np.interp(t0, self.edges_s, self.cumulative))

    def check_covers(self, t0: float, t1: float) -> None:
        """Raise :class:`InputError` unless the trace covers ``[t0, t1]`` simulated seconds."""
        if t0 < self.edges_s[0] or t1 > self.edges_s[-1]:
            first = self.start + timedelta(seconds=self.edges_s[0])
            last = self.start + timedelta(seconds=self.edges_s[-1])
            need = [self.start + timedelta(seconds=t) for t in (t0, t1)]
            raise InputError(f"carbon trace {self.name} covers {first} to {last}, but the "
                             f"simulation runs from {need[0]} to {need[1]}; choose "
                             "--start-time inside the trace", field="carbon-trace")


MEMORY_BOUND_UTILIZATION = 0.5
"""Default ``φ``: the share of ``P_max − P_idle`` a memory-bound step draws
(:func:`kavier.sim.timeline.power_utilization`; fitted per GPU by ``kavier calibrate-power``
on a tracer dataset)."""


@dataclass(frozen=True)
class Sustainability:
    """Power model, facility overhead and carbon trace of a run.

    Attributes
    ----------
    power : PowerModel
    carbon : CarbonTrace or None
        None: no emissions are computed.
    pue : float
        Power usage effectiveness, >= 1.
    utilization_cap : float
        Highest utilization the power model is evaluated at (Listing 4.3's cap), in (0, 1].
    memory_bound_utilization : float
        Utilization of a fully memory-bound step, in [0, 1]
        (:func:`~kavier.sim.timeline.power_utilization`).
    gpus_per_replica : int
        GPUs that run each step together (the tensor-parallel size): a replica's power is
        this many times one GPU's, busy and idle. ``simulate`` checks it against the timing.
    """

    power: PowerModel
    carbon: CarbonTrace | None = None
    pue: float = 1.0
    utilization_cap: float = 1.0
    memory_bound_utilization: float = MEMORY_BOUND_UTILIZATION
    gpus_per_replica: int = 1

    def __post_init__(self):
        if not self.pue >= 1.0:
            raise InputError(f"PUE must be >= 1, got {self.pue}", field="pue")
        if not 0.0 < self.utilization_cap <= 1.0:
            raise InputError(f"utilization cap must be in (0, 1], got {self.utilization_cap}",
                             field="utilization-cap")
        if not 0.0 <= self.memory_bound_utilization <= 1.0:
            raise InputError("memory-bound utilization must be in [0, 1], got "
                             f"{self.memory_bound_utilization}",
                             field="memory-bound-utilization")

    def co2_g(self, power_w, t0, t1) -> np.ndarray:
        """Emissions of constant IT power ``power_w`` from ``t0`` to ``t1`` simulated seconds,
        g (facility energy, eq. 4.7 integrated)."""
        return self.co2_of(power_w, self.carbon.integral(t0, t1))

    def co2_of(self, power_w, carbon_s) -> np.ndarray:
        """Emissions of IT power ``power_w`` over ``carbon_s = ∫ CI dt`` (gCO2/kWh × s), g."""
        return power_w * self.pue * carbon_s / J_PER_KWH

    def utilization(self, compute_s, memory_s, duration_s) -> np.ndarray:
        """Utilization the power model sees for intervals of these costs."""
        return power_utilization(compute_s, memory_s, duration_s,
                                 self.memory_bound_utilization, self.utilization_cap)

    def intervals(self, start_s, duration_s, compute_s, memory_s) -> dict[str, np.ndarray]:
        """Per interval: ``utilization``, the replica's ``power_w`` (all its GPUs), GPU
        ``energy_j`` and, with a carbon trace, ``co2_g`` and ``carbon_s`` (``∫ CI dt`` over the
        interval, gCO2/kWh × s)."""
        u = self.utilization(compute_s, memory_s, duration_s)
        watts = self.power.power_w(u) * self.gpus_per_replica
        out = {"utilization": u, "power_w": watts, "energy_j": watts * duration_s}
        if self.carbon is not None:
            out["carbon_s"] = self.carbon.integral(start_s, start_s + duration_s)
            out["co2_g"] = self.co2_of(watts, out["carbon_s"])
        return out

    def idle_w(self) -> float:
        """A replica's ``P_idle``: the power model at utilization 0, W, times its GPUs."""
        return float(self.power.power_w(0.0)) * self.gpus_per_replica

    def to_dict(self) -> dict:
        """Settings for the run summary."""
        return {"power_model": self.power.to_dict(), "pue": self.pue,
                "utilization_cap": self.utilization_cap,
                "memory_bound_utilization": self.memory_bound_utilization,
                "carbon_trace": None if self.carbon is None else self.carbon.name,
                "start_time": None if self.carbon is None else str(self.carbon.start)}
