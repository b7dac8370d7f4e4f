"""Validation report of a serving-run calibration: the figures a reader looks at first.

Folder layout::

    profile.json      the calibrated profile (calibrate.profile.Profile)
    predictions.csv   per request: fit or held out, measured and predicted TTFT, TPOT, E2E
    scores.json       MAPE and signed errors of mean/p50/p90/p99, before and after the fit,
                      on the fit requests and held out, and for every predicted run; ITL
                      (mean, and p50/p90/p99 where the run recorded every gap); the
                      held-out step-phase floor (calibrate.serving.phase_floor)
    cdf.png, .pdf     measured vs predicted CDFs of TTFT, TPOT and E2E (held-out requests)
    timeseries.png, .pdf
                      running and waiting requests and KV-cache usage, measured (the engine's
                      once-a-second log) vs simulated
    report.md         the tables

The simulated timeseries is read off the replay: a request counts as waiting from its arrival
until the engine first schedules it and as running from then until it ends (vLLM counts a
preempted request as waiting again, which this does not), and KV usage is the blocks running
requests hold at the end of the last step before each tick, as a share of the pool (vLLM's
``kv_cache_usage_perc``, in which cached free blocks do not count either). The measured ticks
are taken to count from the run's first request.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from calibrate.profile import Profile
from calibrate.serving import METRICS, ServingFit
from kavier.export.output import RunWriter

_LABELS = {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "E2E"}


def predictions_table(measured: pd.DataFrame, predicted: pd.DataFrame, requests: pd.DataFrame,
                      mask: np.ndarray) -> pd.DataFrame:
    """Per request: id, arrival, sizes, ``fit``/``heldout``, measured and predicted metrics and
    the simulated preemptions."""
    out = requests[["request_id", "arrival_s", "n_input_tokens", "n_output_tokens"]].copy()
    out["split"] = np.where(mask, "fit", "heldout")
    for m in METRICS:
        out[f"measured_{m}"] = measured[m].to_numpy()
        out[f"predicted_{m}"] = predicted[m].to_numpy()
    out["predicted_preemptions"] = predicted["preemptions"].to_numpy()
    return out


def simulated_timeseries(predicted: pd.DataFrame, steps, pool_blocks: int,
                         ticks: np.ndarray) -> pd.DataFrame:
    """Running and waiting requests and KV usage (%) of the replay at each tick, s."""
    arrival, scheduled, end = (predicted[c].to_numpy() for c in (
        "arrival_s", "scheduled_s", "end_s"))
    t = ticks[:, None]
    waiting = ((arrival <= t) & (t < scheduled)).sum(axis=1)
    running = ((scheduled <= t) & (t < end)).sum(axis=1)
    usage = np.zeros(ticks.size)
    if steps is not None and steps.num_rows:
        ends = (steps.column("start_s").to_numpy() + steps.column("duration_s").to_numpy())
        blocks = steps.column("kv_blocks_used").to_numpy()
        i = np.searchsorted(ends, ticks, side="right") - 1
        usage = np.where(i >= 0, blocks[np.maximum(i, 0)] / pool_blocks * 100.0, 0.0)
    return pd.DataFrame({"t_s": ticks, "num_requests_running": running,
                         "num_requests_waiting": waiting, "kv_cache_usage_pct": usage})


def timeseries_errors(measured: pd.DataFrame | None, simulated: pd.DataFrame) -> dict:
    """Per timeseries column the run recorded: mean absolute error of the simulated series at
    the measured ticks, and the measured mean (same unit: requests, or % of the pool)."""
    if measured is None:
        return {}
    out = {}
    for column in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_pct"):
        if _recorded(measured, column):
            m, s = measured[column].to_numpy(float), simulated[column].to_numpy(float)
            out[column] = {"mae": float(np.mean(np.abs(s - m))),
                           "measured_mean": float(m.mean())}
    return out


def cdf_figure(table: pd.DataFrame, title: str):
    """Measured vs predicted CDFs of TTFT, TPOT and E2E over the held-out requests."""
    import matplotlib.pyplot as plt

    held = table[table["split"] == "heldout"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, m in zip(axes, METRICS, strict=True):
        for kind, style in (("measured", "-"), ("predicted", "--")):
            values = np.sort(held[f"{kind}_{m}"].dropna().to_numpy())
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, style, label=kind)
        ax.set_xlabel(f"{_LABELS[m]} [s]")
        ax.set_ylabel("share of held-out requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _recorded(measured: pd.DataFrame, column: str) -> bool:
    """False for a column that stays 0 while requests run (the run did not log it, as the RTX
    PRO 6000 runs did not log KV usage)."""
    return bool((measured[column] > 0).any() or not (measured["num_requests_running"] > 0).any())


def timeseries_figure(measured: pd.DataFrame | None, simulated: pd.DataFrame, title: str):
    """Running, waiting and KV usage over time, measured vs simulated."""
    import matplotlib.pyplot as plt

    columns = (("num_requests_running", "running requests"),
               ("num_requests_waiting", "waiting requests"),
               ("kv_cache_usage_pct", "KV-cache usage [%]"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (column, label) in zip(axes, columns, strict=True):
        if measured is not None and _recorded(measured, column):
            ax.plot(measured["t_s"], measured[column], "-", label="measured")
        elif measured is not None:
            ax.plot([], [], "-", label="measured: not recorded")
        ax.plot(simulated["t_s"], simulated[column], "--", label="simulated")
        ax.set_xlabel("time [s]")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _row(label: str, s: dict) -> str:
    cells = []
    for m in METRICS:
        v = s[m]
        cells.append("—" if not v["n"] else f"{v['mape_pct']:.1f} ({v['mean_error_pct']:+.1f} "
                     f"/ {v['p50_error_pct']:+.1f} / {v['p90_error_pct']:+.1f} / "
                     f"{v['p99_error_pct']:+.1f})")
    return f"| {label} | " + " | ".join(cells) + " |"


def markdown(fit: ServingFit, profile: Profile, predicted_runs: dict, series: dict,
             scores_itl: dict, scores_floor: dict | None,
             scores_expected: dict | None = None) -> str:
    """The score tables and the fitted parameters as markdown; ``scores_floor`` is
    :func:`~calibrate.serving.phase_floor`'s and ``scores_expected``
    :attr:`~calibrate.serving.ServingCalibration.expected` (rows of their own; None for
    none)."""
    lines = [f"# Serving calibration: {profile.llm} on {profile.gpu} ({profile.engine})", "",
             f"Data: {', '.join(profile.datasets)}; {profile.cv}.", "",
             "Per-request MAPE % (signed error of mean / p50 / p90 / p99, %):", "",
             "| | TTFT | TPOT | E2E |", "|---|---|---|---|",
             _row("defaults, fit requests", fit.before["fit"]),
             _row("defaults, held out", fit.before["heldout"]),
             _row("calibrated, fit requests", fit.after["fit"]),
             _row("calibrated, held out", fit.after["heldout"]),
             _row("calibrated, all requests", fit.after["all"])]
    if scores_floor is not None:
        lines.append(_row("step-phase floor, held out", scores_floor))
    if scores_expected is not None:
        lines += [_row(f"calibrated, held out, mean of {scores_expected['draws']} phase draws",
                       scores_expected["heldout"]),
                  _row("step-phase floor of that mean", scores_expected["floor"])]
    lines += [_row(f"calibrated, predicting {name}", s) for name, s in predicted_runs.items()]
    itl = scores_itl
    lines += ["", "Inter-token latency, all requests (measured → simulated, s; signed error):",
              ""]
    lines += [f"- {k}: {itl['measured_s'][k]:.4g} → {itl['predicted_s'][k]:.4g} "
              f"({itl['error_pct'][k]:+.1f} %)" for k in itl["measured_s"]
              if itl["error_pct"][k] is not None]
    if series:
        lines += ["", "Engine state, simulated vs measured once a second (mean absolute error; "
                  "measured mean):", ""]
        lines += [f"- {k}: {v['mae']:.2f} ({v['measured_mean']:.2f})" for k, v in series.items()]
    lines += ["", "Fitted parameters:", ""]
    lines += [f"- `{k}` = {getattr(fit.params, k):.6g}" for k in fit.fitted]
    if fit.on_bound:
        lines += ["", f"On a bound (not identified by this run): {', '.join(fit.on_bound)}."]
    return "\n".join(lines) + "\n"


def write_serving_report(writer: RunWriter, fit: ServingFit, profile: Profile,
                         table: pd.DataFrame, measured_series: pd.DataFrame | None,
                         simulated_series: pd.DataFrame, scores: dict,
                         predicted_runs: dict) -> None:
    """Write the report into ``writer``'s folder (profile and text last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    writer.text("predictions.csv", table.to_csv(index=False))
    writer.text("timeseries_simulated.csv", simulated_series.to_csv(index=False))
    writer.json("scores.json", scores)
    title = f"{profile.llm} on {profile.gpu}, {profile.engine}"
    for name, fig in (("cdf", cdf_figure(table, f"{title}: held-out requests")),
                      ("timeseries", timeseries_figure(measured_series, simulated_series,
                                                       f"{title}: engine state"))):
        for ext in ("png", "pdf"):
            writer.file(f"{name}.{ext}", lambda path, ext=ext, fig=fig: fig.savefig(
                path, format=ext, dpi=150))
        plt.close(fig)
    writer.json("profile.json", profile.to_dict())
    writer.text("report.md", markdown(fit, profile, predicted_runs, scores["timeseries"],
                                      scores["itl"], scores["phase_floor_heldout"],
                                      scores.get("expected_over_phases")))
