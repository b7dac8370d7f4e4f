"""Utilization → power → energy → CO2 along the simulated timeline (thesis 4.6, eq. 4.7).

The thesis hands this step to OpenDC; here it is computed in the simulator with the same
models (:mod:`kavier.power`, Table 4.1) and OpenDC's carbon model (FootPrinter, eq. 4.7:
emissions = power × carbon intensity at each instant).

* **Energy** is the exact integral of power over the timeline. Utilization is piecewise
  constant (Listing 4.3: 50 % in the first and last 0.1 s of a request, the cap in between;
  ``P_idle`` while the GPU waits for requests), so the integral is a sum over phases and does
  not depend on the export rate.
* **CO2**: the carbon intensity ``CI(t)`` is a step function of wall-clock time (the
  simulation's ``start`` plus simulated seconds); a phase of constant power ``P`` from ``t0``
  to ``t1`` emits ``P · PUE · ∫ CI dt``, evaluated exactly from the running integral of the
  trace, even when a phase spans several carbon steps.
* **PUE** (power usage effectiveness) scales GPU (IT) energy to facility energy; emissions
  are charged on facility energy. Units: W, J and Wh named as such; ``CI`` in gCO2/kWh.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from archive.errors import InputError
from kavier.fragments import WARM_UTILIZATION, phase_rows
from kavier.power import PowerModel

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
        GPU utilization while inferring (Listing 4.3).
    """

    power: PowerModel
    carbon: CarbonTrace | None = None
    pue: float = 1.0
    utilization_cap: float = 1.0

    def __post_init__(self):
        if self.pue < 1.0:
            raise InputError(f"PUE must be >= 1, got {self.pue}", field="pue")

    def co2_g(self, power_w, t0, t1) -> np.ndarray:
        """Emissions of constant IT power ``power_w`` from ``t0`` to ``t1`` simulated seconds,
        g (facility energy, eq. 4.7 integrated)."""
        return power_w * self.pue * self.carbon.integral(t0, t1) / J_PER_KWH

    def requests(self, start_s: np.ndarray, service_s: np.ndarray) -> dict[str, np.ndarray]:
        """Per-request GPU energy (``energy_j``) and, with a carbon trace, ``co2_g``.

        Exact sums over each request's utilization phases (see the module docstring).
        """
        owner, phase, offset, length = phase_rows(service_s)
        watts = self.power.power_w(np.where(phase == 1, self.utilization_cap,
                                            WARM_UTILIZATION))
        out = {"energy_j": np.bincount(owner, watts * length, minlength=service_s.size)}
        if self.carbon is not None:
            t0 = start_s[owner] + offset
            out["co2_g"] = np.bincount(owner, self.co2_g(watts, t0, t0 + length),
                                       minlength=service_s.size)
        return out

    def idle(self, gap_start_s: np.ndarray, gap_end_s: np.ndarray) -> dict[str, float]:
        """Energy (J) and emissions (g) of the GPU idling at ``P_idle`` over the gaps."""
        idle_w = self.power.power_w(0.0)
        out = {"energy_j": float(idle_w * np.sum(gap_end_s - gap_start_s))}
        if self.carbon is not None:
            out["co2_g"] = float(np.sum(self.co2_g(idle_w, gap_start_s, gap_end_s)))
        return out

    def row_power_w(self, mean_utilization: np.ndarray) -> np.ndarray:
        """Mean power over fragment rows whose mean utilization is given, W.

        A row mixes the 50 % and the cap levels in some proportion ``f``, recovered from its
        mean; its mean power is ``f · P(cap) + (1 − f) · P(50 %)``, exact for any non-linear
        power model.
        """
        cap = self.utilization_cap
        low, high = self.power.power_w(WARM_UTILIZATION), self.power.power_w(cap)
        if cap == WARM_UTILIZATION:
            return np.full(mean_utilization.shape, float(low))
        share = np.clip((mean_utilization - WARM_UTILIZATION) / (cap - WARM_UTILIZATION), 0, 1)
        return share * high + (1.0 - share) * low

    def to_dict(self) -> dict:
        """Settings for the run summary."""
        return {"power_model": self.power.to_dict(), "pue": self.pue,
                "carbon_trace": None if self.carbon is None else self.carbon.name,
                "start_time": None if self.carbon is None else str(self.carbon.start)}
