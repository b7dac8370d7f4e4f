"""Validation report of a calibration: profile, per-point CSVs, a Figure 6.2-style plot, text.

Folder layout::

    profile.json     the calibrated per-GPU profile (calibrate.profile.Profile)
    points.csv       per request: measured, fitted, held-out and thesis-default predictions
    medians.csv      per (sweep, size): the same at the median request
    validation.png   measured vs predicted prefill and decode time, log-log, MAPE in legend
    validation.pdf   the same figure as PDF
    report.md        the MAPE table
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from calibrate.fit import STAGES, CalibrationResult  # noqa: E402
from calibrate.profile import Profile  # noqa: E402
from kavier.export.output import RunWriter  # noqa: E402


def figure(result: CalibrationResult, title: str):
    """Thesis Figure 6.2 redrawn: per-size median measured time and the held-out calibrated
    and thesis-default predictions, for prefill (vs prompt tokens) and decode (vs generated
    tokens), log-log, with each line's per-size-median MAPE in the legend."""
    stages = [st for st in STAGES if st in result.scores["heldout"]]
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        m = result.medians[result.medians["sweep"] == stage]
        x = m["median_n_input_tokens"] if stage == "prefill" else m["median_n_output_tokens"]
        scores = {"predicted_heldout_s": result.scores["heldout"][stage]["per_size_median"],
                  "predicted_thesis_defaults_s":
                      result.scores["thesis_defaults"][stage]["per_size_median"]}
        ax.loglog(x, m["median_latency_s"], "o", color="black", label="measured (median)")
        held = scores["predicted_heldout_s"]
        ax.loglog(x, m["predicted_heldout_s"] if held is not None else m["predicted_fit_s"],
                  "s--", color="tab:blue",
                  label=f"calibrated, held out (MAPE {held:.2f} %)" if held is not None
                  else "calibrated, on the fit (one size: nothing held out)")
        ax.loglog(x, m["predicted_thesis_defaults_s"], "^:", color="tab:orange",
                  label=f"thesis defaults (MAPE {scores['predicted_thesis_defaults_s']:.2f} %)")
        ax.set_xlabel("prompt tokens" if stage == "prefill" else "generated tokens")
        ax.set_ylabel(f"{stage} request latency [s]")
        ax.set_title(stage)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def markdown(result: CalibrationResult, profile: Profile) -> str:
    """The MAPE table and fitted parameters as markdown."""
    s = result.scores
    lines = [
        f"# Calibration: {profile.llm} on {profile.gpu} ({profile.engine}), "
        f"{profile.timing_model} model", "",
        f"Data: {', '.join(profile.datasets)} (sha256 {profile.data_sha256[:12]}…); "
        f"cross-validation: {profile.cv}.", "",
        "| MAPE [%] | prefill, per-size median | prefill, per request | "
        "decode, per-size median | decode, per request |", "|---|---|---|---|---|",
    ]
    for key, label in (("fit", "calibrated, on the fit"), ("heldout", "calibrated, held out"),
                       ("thesis_defaults", "thesis model, thesis defaults")):
        row = [f"{s[key][st][kind]:.2f}" if st in s[key] and s[key][st][kind] is not None
               else "—" for st in STAGES for kind in ("per_size_median", "per_request")]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    t = s["thesis_defaults_thesis_scoring"]
    lines += ["", "Thesis model with thesis defaults, scored the thesis's way (prefill sweep as "
              "n_out = 0, decode sweep as n_in = 0, against per-size medians): "
              + ", ".join(f"{st} {v:.2f} %" for st, v in t.items())
              + " (thesis: prefill 7.39 %, decode 4.00 %).",
              "", "Fitted parameters:", ""]
    lines += [f"- `{k}` = {v}" for k, v in profile.params.to_dict().items()]
    return "\n".join(lines) + "\n"


def write_report(writer: RunWriter, result: CalibrationResult, profile: Profile) -> None:
    """Write the whole report into ``writer``'s folder (profile last but one, text last)."""
    writer.text("points.csv", result.points.to_csv(index=False))
    writer.text("medians.csv", result.medians.to_csv(index=False))
    fig = figure(result, f"{profile.llm} on {profile.gpu}, {profile.engine}: measured vs "
                         f"{profile.timing_model} model")
    for ext in ("png", "pdf"):
        writer.file(f"validation.{ext}", lambda path, ext=ext: fig.savefig(path, format=ext,
                                                                            dpi=150))
    plt.close(fig)
    writer.json("profile.json", profile.to_dict())
    writer.text("report.md", markdown(result, profile))
