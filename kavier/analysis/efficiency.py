"""Efficiency of a simulated run (thesis 4.7, equations 4.8–4.11) and the field's usual metrics.

Symbols as in the thesis: ``T_P``, ``T_D`` prefill and decode tokens, ``ΔT_P``, ``ΔT_D`` total
prefill and decode time (s), ``C`` the monetary cost, ``S`` a sustainability cost (energy or
CO2).

* Eq. 4.8, financial efficiency: ``E_f = C / ((T_P + T_D) / (ΔT_P + ΔT_D))``, currency per
  (token per second), i.e. currency·s/token.
* Eq. 4.10, sustainability efficiency: ``E_s = S · (ΔT_P + ΔT_D) / (T_P + T_D)``, Wh·s/token or
  g·s/token.
* Eqs. 4.9 and 4.11, ratios between two systems: ``R = E_s1 / E_s2``, computed as that ratio.
  The thesis simplifies eq. 4.9 to ``ΔT_s1² / ΔT_s2²``, which holds only when both systems
  pay the same price per hour *and* process the same tokens; we do not use the simplification
  (a test shows where it agrees).

Beside them, the metrics the field reports: cost per million tokens, Wh per million tokens,
gCO2 per million tokens, and tokens per joule. Units are in every name; energy is facility
energy (GPU energy × PUE), joules and watt-hours never mixed (the prototype summed OpenDC's
joules as if they were watt-hours).

The cost of a run is ``price per GPU-hour × hours the GPU is provisioned``, the simulated
timeline from 0 to the last request's end (a rented GPU is paid while it idles); default price
1.2 €/h for an A10, as the thesis uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa

from archive.errors import InputError

J_PER_WH = 3600.0
OPENDC_POWER_COLUMNS = ("timestamp", "power_draw", "energy_usage", "carbon_intensity",
                        "carbon_emission")
"""Columns of OpenDC's ``powerSource.parquet`` output (energy in J, emissions in g)."""


@dataclass(frozen=True)
class RunTotals:
    """What the efficiency metrics need from one run.

    Attributes
    ----------
    source : str
    prefill_tokens, decode_tokens : int
        ``T_P`` and ``T_D``.
    prefill_s, decode_s : float
        ``ΔT_P`` and ``ΔT_D``, s.
    provisioned_s : float
        GPU time held: replicas × the timeline from 0 to the last end, s.
    energy_j : float or None
        Facility energy, J.
    co2_g : float or None
        Emissions, g.
    """

    source: str
    prefill_tokens: int
    decode_tokens: int
    prefill_s: float
    decode_s: float
    provisioned_s: float
    energy_j: float | None = None
    co2_g: float | None = None


def read_run(run_dir: str | Path) -> RunTotals:
    """Totals of a ``kavier simulate`` output folder (its ``summary.json``).

    Raises
    ------
    InputError
        When the folder has no complete run (no or unreadable ``summary.json``).
    """
    path = Path(run_dir) / "summary.json"
    try:
        s = json.loads(path.read_text())
    except OSError:
        raise InputError("no summary.json: not a finished kavier simulate run",
                         path=run_dir) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc}", path=path) from None
    try:
        energy = s.get("sustainability") or {}
        facility_wh = energy.get("energy_facility_wh")
        return RunTotals(
            str(run_dir), int(s["n_input_tokens"]), int(s["n_output_tokens"]),
            float(s["prefill_gpu_hours"]) * 3600.0, float(s["decode_gpu_hours"]) * 3600.0,
            float(s["provisioned_gpu_hours"]) * 3600.0,
            None if facility_wh is None else facility_wh * J_PER_WH, energy.get("co2_g"))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"summary lacks or mangles {exc}", path=path) from None


def with_opendc_power(totals: RunTotals, power_source: str | Path) -> RunTotals:
    """Replace a run's energy and emissions by those OpenDC computed for its workload
    (``powerSource.parquet``: ``energy_usage`` J and ``carbon_emission`` g per sample).

    Raises
    ------
    InputError
        Unreadable file or missing columns.
    """
    try:
        df = pd.read_parquet(power_source)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise InputError(f"cannot read: {str(exc).splitlines()[0]}", path=power_source) from None
    missing = [c for c in ("energy_usage", "carbon_emission") if c not in df.columns]
    if missing:
        raise InputError(f"missing OpenDC column(s) {missing}; expected "
                         f"{list(OPENDC_POWER_COLUMNS)}", path=power_source)
    return replace(totals, source=f"{totals.source} + OpenDC {power_source}",
                   energy_j=float(df["energy_usage"].sum()),
                   co2_g=float(df["carbon_emission"].sum()))


def report(t: RunTotals, price_per_gpu_hour: float = 1.2) -> dict:
    """Efficiency metrics of one run (see the module docstring for the formulas).

    Returns
    -------
    dict
        ``cost`` (currency), ``tokens``, ``busy_s``; eq. 4.8 ``financial_efficiency``
        (currency·s/token), eq. 4.10 ``energy_efficiency_wh_s_per_token`` and
        ``co2_efficiency_g_s_per_token``; ``cost_per_mtok``, ``energy_wh_per_mtok``,
        ``co2_g_per_mtok``, ``tokens_per_j`` (energy and CO2 entries are None without them).
    """
    tokens = t.prefill_tokens + t.decode_tokens
    busy_s = t.prefill_s + t.decode_s
    cost = price_per_gpu_hour * t.provisioned_s / 3600.0
    energy_wh = None if t.energy_j is None else t.energy_j / J_PER_WH

    def per_token(x, scale):
        return None if x is None or tokens == 0 else x * scale / tokens

    return {
        "cost": cost, "tokens": tokens, "busy_s": busy_s,
        "throughput_tok_s": tokens / busy_s if busy_s else None,
        "financial_efficiency": per_token(cost, busy_s),
        "energy_efficiency_wh_s_per_token": per_token(energy_wh, busy_s),
        "co2_efficiency_g_s_per_token": per_token(t.co2_g, busy_s),
        "cost_per_mtok": per_token(cost, 1e6),
        "energy_wh_per_mtok": per_token(energy_wh, 1e6),
        "co2_g_per_mtok": per_token(t.co2_g, 1e6),
        "tokens_per_j": None if not t.energy_j else tokens / t.energy_j,
        "totals": asdict(t),
    }


def ratios(first: dict, second: dict) -> dict:
    """Eqs. 4.9 and 4.11: ``E_s1 / E_s2`` for every metric both reports have."""
    return {k: first[k] / second[k] for k, v in first.items()
            if isinstance(v, float | int) and not isinstance(v, bool)
            and isinstance(second.get(k), float | int) and second[k]}
