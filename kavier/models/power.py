"""GPU power as a function of utilization: the models of thesis Table 4.1, plus constant.

Every model maps utilization ``u ∈ [0, 1]`` to watts between ``P_idle`` and (about) ``P_max``:

==============  ===================================================================  =========
name            ``P(u)``                                                             source
==============  ===================================================================  =========
constant        ``P_max``                                                            OpenDC
linear          ``P_idle + (P_max − P_idle) u``                                       [7, 9]
sqrt            ``P_idle + (P_max − P_idle) √u``                                      [7, 9]
square          ``P_idle + (P_max − P_idle) u²``                                      [7, 9]
cubic           ``P_idle + (P_max − P_idle) u³``                                      [7, 9]
mse             ``P_idle + (P_max − P_idle)(2u − u^r)``                               Fan 2007
asymptotic      ``P_idle + (P_max − P_idle)/2 · (1 + u − e^(−u/α))``                  OpenDC
asymptotic_dvfs ``P_idle + (P_max − P_idle)/2 · (1 + u³ − e^(−u³/α))``                OpenDC
==============  ===================================================================  =========

[7] Mastenbroek et al., OpenDC 2.0, CCGrid 2021; [9] Calheiros et al., CloudSim, SPE 2011;
Fan, Weber and Barroso, "Power provisioning for a warehouse-sized computer", ISCA 2007 (MSE,
calibrated there with ``r = 1.4``). ``α`` ("asymUtil" in OpenDC, adapted from GreenCloud) is
typically 0.2–0.5; we default to 0.3. ``P_idle`` and ``P_max`` come from the GPU library or a
power profile fitted by ``kavier calibrate-power``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from archive.errors import InputError


def _asymptotic(u, a):
    return 0.5 * (1.0 + u - np.exp(-u / a))


SHAPES = {
    "constant": lambda u, _: np.ones_like(u),
    "linear": lambda u, _: u,
    "sqrt": lambda u, _: np.sqrt(u),
    "square": lambda u, _: u**2,
    "cubic": lambda u, _: u**3,
    "mse": lambda u, r: 2.0 * u - u**r,
    "asymptotic": _asymptotic,
    "asymptotic_dvfs": lambda u, a: _asymptotic(u**3, a),
}
"""``(P(u) − P_idle) / (P_max − P_idle)`` per model, as a function of ``(u, shape)``."""

DEFAULT_SHAPE = {"mse": 1.4, "asymptotic": 0.3, "asymptotic_dvfs": 0.3}
"""Default shape parameter: ``r`` of MSE, ``α`` of the asymptotic models."""

POWER_MODELS = tuple(SHAPES)


@dataclass(frozen=True)
class PowerModel:
    """A power model with its parameters.

    Attributes
    ----------
    name : str
        One of :data:`POWER_MODELS`.
    idle_w, max_w : float
        ``P_idle`` and ``P_max``, W.
    shape : float or None
        ``r`` (mse) or ``α`` (asymptotic models); None for models without one.

    Raises
    ------
    InputError
        For an unknown model, ``max_w < idle_w``, negative power or a shape outside its range.
    """

    name: str
    idle_w: float
    max_w: float
    shape: float | None = None

    def __post_init__(self):
        if self.name not in SHAPES:
            raise InputError(f"unknown power model '{self.name}'; known: "
                             f"{', '.join(POWER_MODELS)}", field="power-model")
        if self.shape is None and self.name in DEFAULT_SHAPE:
            object.__setattr__(self, "shape", DEFAULT_SHAPE[self.name])
        if not 0 <= self.idle_w <= self.max_w:
            raise InputError(f"need 0 <= idle power <= max power, got {self.idle_w} and "
                             f"{self.max_w} W", field="power-model")
        if self.shape is not None and self.name not in DEFAULT_SHAPE:
            raise InputError(f"power model '{self.name}' has no shape parameter (only "
                             f"{', '.join(DEFAULT_SHAPE)} do)", field="power-shape")
        if self.name in DEFAULT_SHAPE and not self.shape > 0:
            raise InputError(f"shape parameter of '{self.name}' must be > 0, got {self.shape}",
                             field="power-model")

    @classmethod
    def linear_for(cls, gpu) -> PowerModel:
        """The default model of a GPU: linear between its library ``idle_power_w`` and
        ``max_power_w`` (what ``kavier simulate`` uses without a power option or profile)."""
        return cls("linear", gpu.idle_power_w, gpu.max_power_w)

    def power_w(self, utilization) -> np.ndarray:
        """Power in W at utilization ``u`` (array, fractions in [0, 1]; clipped)."""
        u = np.clip(np.asarray(utilization, dtype=np.float64), 0.0, 1.0)
        return self.idle_w + (self.max_w - self.idle_w) * SHAPES[self.name](u, self.shape)

    def to_dict(self) -> dict:
        """Plain dict (for profiles and summaries)."""
        return asdict(self)
