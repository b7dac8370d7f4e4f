"""Report of a power calibration (``kavier calibrate-power``).

Folder layout::

    power_profile.json  {"profile_version", "gpu", "power": section}; ``kavier simulate
                        --power-profile`` reads it
    ranking.csv         per model: fitted P_idle, P_max, shape, MAPE on the fit and held out
    power_fit.png       samples (utilization vs power) and the three best models' curves
    report.md           the ranking, the full-utilization spread, the clock variant, warnings
"""

from __future__ import annotations

from datetime import UTC, datetime

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from archive.datasets import content_sha256  # noqa: E402
from calibrate.power import PowerCalibration  # noqa: E402
from calibrate.profile import PROFILE_VERSION  # noqa: E402
from kavier.export.output import RunWriter  # noqa: E402
from kavier.models.power import PowerModel  # noqa: E402


def power_section(result: PowerCalibration, capture: str, samples, gpu: str | None) -> dict:
    """The ``power`` section of a profile: the winning model with its accuracy and provenance."""
    from archive.provenance import toolkit_version

    best = result.ranking.iloc[0]
    return {
        "model": result.best.to_dict(),
        "mape_pct": {"fit": float(best["mape_fit_pct"]),
                     "heldout": float(best["mape_heldout_pct"])},
        "ranking": [{k: (None if isinstance(v, float) and np.isnan(v) else v)
                     for k, v in row.items()} for row in result.ranking.to_dict("records")],
        "full_utilization": result.full_utilization, "clock": result.clock,
        "warnings": result.warnings, "gpu": gpu, "capture": str(capture),
        "samples": len(samples), "data_sha256": content_sha256(samples),
        "cv": "contiguous blocks", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "toolkit_version": toolkit_version(),
    }


def figure(result: PowerCalibration, samples):
    """Samples and the three best models' curves, power vs utilization."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter(samples["utilization_gpu_pct"], samples["power_w"], s=4, alpha=0.25,
               color="black", label="nvidia-smi samples")
    u = np.linspace(0, 1, 201)
    for row in result.ranking.head(3).itertuples():
        shape = None if row.shape != row.shape else row.shape
        model = PowerModel(row.model, row.idle_w, row.max_w, shape)
        ax.plot(u * 100, model.power_w(u), label=f"{row.model} (held-out MAPE "
                f"{row.mape_heldout_pct:.1f} %)")
    ax.set_xlabel("utilization.gpu [%]")
    ax.set_ylabel("power.draw [W]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def markdown(result: PowerCalibration, section: dict) -> str:
    """The report as Markdown."""
    lines = [f"# Power calibration: {section['capture']} ({section['samples']} samples)", "",
             "| model | P_idle W | P_max W | shape | MAPE fit % | MAPE held out % |",
             "|---|---|---|---|---|---|"]
    for row in result.ranking.itertuples():
        shape = "" if row.shape != row.shape else f"{row.shape:.3g}"
        lines.append(f"| {row.model} | {row.idle_w:.1f} | {row.max_w:.1f} | {shape} | "
                     f"{row.mape_fit_pct:.2f} | {row.mape_heldout_pct:.2f} |")
    full = result.full_utilization
    if full.get("samples"):
        lines += ["", f"At >= 95 % utilization ({full['samples']} samples) power is "
                      f"{full['p1_w']:.0f} / {full['p50_w']:.0f} / {full['p99_w']:.0f} W "
                      "(1 / 50 / 99 %)."]
    if result.clock:
        c = result.clock
        lines += ["", f"{c['model']} × (SM clock / {c['clock_max_mhz']:.0f} MHz)^γ, "
                      f"γ = {c['gamma']:.2f}: MAPE fit {c['mape_fit_pct']:.2f} %, held out "
                      f"{c['mape_heldout_pct']:.2f} %."]
    lines += [""] + [f"Warning: {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def write_power_report(out: RunWriter, result: PowerCalibration, samples,
                       section: dict) -> None:
    """Write the files listed in the module docstring."""
    out.json("power_profile.json", {"profile_version": PROFILE_VERSION, "gpu": section["gpu"],
                                    "power": section})
    out.text("ranking.csv", result.ranking.to_csv(index=False))
    fig = figure(result, samples)
    out.file("power_fit.png", lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    out.text("report.md", markdown(result, section))
