"""Per-GPU calibrated profiles: fitted timing parameters plus their provenance and accuracy.

A profile is a JSON file::

    {"profile_version": "1", "gpu": "A10", "llm": "Llama-3-8B", "engine": "vLLM 0.9.0",
     "timing_model": "roofline", "params": {...TimingParams...},
     "mape_pct": {...}, "datasets": [...], "data_sha256": "...", "cv": "...",
     "created": "2026-11-23T10:00:00+00:00", "toolkit_version": "0.1.0", "timing_revision": 2}

``timing_revision`` is :data:`~kavier.models.timing.TIMING_REVISION` when the profile was fitted
(1 for files without it); :meth:`Profile.stale` says when the roofline has changed since.

``kavier simulate --profile FILE`` (or the name of a profile shipped in ``calibrate/profiles/``,
:func:`profile_path`) reads ``timing_model`` and ``params`` from it, and the
power model from its optional ``power`` section, which ``kavier calibrate-power --profile FILE``
writes: ``{"model": {"name", "idle_w", "max_w", "shape"}, "mape_pct", "ranking", ...}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from archive.errors import InputError, read_json_object
from kavier.models.timing import TIMING_MODELS, TIMING_REVISION, TimingParams

PROFILE_VERSION = "1"


def shipped_profiles() -> list[str]:
    """Names of the calibrated profiles shipped with the toolkit (``calibrate/profiles/``)."""
    return sorted(p.stem for p in _profiles_dir().glob("*.json"))


def _profiles_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("calibrate") / "profiles"))


def profile_path(source: str | Path) -> Path:
    """The profile file ``source`` names: an existing file, or a shipped profile's name.

    Raises
    ------
    InputError
        When it is neither (the message lists the shipped profiles, closest first).
    """
    import difflib

    path = Path(source)
    if path.is_file():
        return path
    if str(source) in shipped_profiles():
        return _profiles_dir() / f"{source}.json"
    close = difflib.get_close_matches(str(source), shipped_profiles(), n=2, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise InputError(f"no such profile file or shipped profile; {hint}shipped: "
                     f"{', '.join(shipped_profiles())}", path=source, field="--profile")


@dataclass
class Profile:
    """A calibrated timing profile for one GPU (and the model/engine it was measured with)."""

    gpu: str
    llm: str
    engine: str
    timing_model: str
    params: TimingParams
    mape_pct: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list)
    data_sha256: str = ""
    cv: str = ""
    created: str = ""
    toolkit_version: str = ""
    power: dict | None = None
    timing_revision: int = TIMING_REVISION

    def stale(self) -> str | None:
        """Why this roofline profile's parameters no longer mean what they were fitted as, or
        None: its ``timing_revision`` differs from :data:`~kavier.models.timing.TIMING_REVISION`
        (whose docstring lists what each revision changed). The thesis model has not changed."""
        if self.timing_model != "roofline" or self.timing_revision == TIMING_REVISION:
            return None
        return (f"fitted against roofline revision {self.timing_revision}, this toolkit's is "
                f"{TIMING_REVISION} (kavier.models.timing.TIMING_REVISION lists the changes): "
                "its step times now differ from those its MAPE was measured with; refit it "
                "with kavier calibrate")

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = asdict(self)
        d["params"] = self.params.to_dict()
        return {"profile_version": PROFILE_VERSION, **d}

    def write(self, path: str | Path) -> Path:
        """Write the profile as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Profile:
        """Read a profile file.

        Raises
        ------
        InputError
            Unreadable file, invalid JSON, missing or unknown fields, unknown timing model.
        """
        path = profile_path(path)
        d = read_json_object(path, "profile")
        d.pop("profile_version", None)
        revision = d.setdefault("timing_revision", 1)
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
            raise InputError(f"expected a positive integer, got {revision!r}", path=path,
                             field="timing_revision")
        for key in ("gpu", "llm", "timing_model", "params"):
            if key not in d:
                raise InputError("missing in profile", path=path, field=key)
        if d["timing_model"] not in TIMING_MODELS:
            raise InputError(f"unknown timing model {d['timing_model']!r}", path=path,
                             field="timing_model")
        if not isinstance(d["params"], dict):
            raise InputError("expected an object of parameters", path=path, field="params")
        _check_params(d["params"], path)
        try:
            d["params"] = TimingParams(**d["params"])
            return cls(**d)
        except TypeError as exc:
            raise InputError(f"unexpected field: {exc}", path=path) from None

    @staticmethod
    def read_power(path: str | Path) -> dict:
        """The ``power`` section of a profile or of a power-only profile file.

        Raises
        ------
        InputError
            Unreadable file, invalid JSON, no ``power.model`` section, or a
            ``memory_bound_utilization`` that is not a number in [0, 1].
        """
        d = read_json_object(profile_path(path), "profile")
        if not isinstance(d.get("power"), dict) or not isinstance(d["power"].get("model"), dict):
            raise InputError("no power section (write one with kavier calibrate-power)",
                             path=path, field="power")
        phi = d["power"].get("memory_bound_utilization")
        if phi is not None and not (isinstance(phi, int | float) and not isinstance(phi, bool)
                                    and 0.0 <= phi <= 1.0):
            raise InputError(f"expected a number in [0, 1], got {phi!r}", path=path,
                             field="power.memory_bound_utilization")
        return d["power"]


_RANGES = {
    "compute_efficiency": (0.0, 1.0, False), "memory_efficiency": (0.0, 1.0, False),
    "attention_efficiency": (0.0, 1.0, True), "kv_memory_efficiency": (0.0, 1.0, True),
    "request_overhead_s": (0.0, None, False),
    "token_overhead_s": (0.0, None, False), "prefill_floor_s": (0.0, None, True),
    "prefill_sharpness": (1.0, None, True), "batch_step_overhead_s": (0.0, None, False),
    "batch_seq_overhead_s": (0.0, None, False), "allreduce_latency_s": (0.0, None, True),
    "link_efficiency": (0.0, 1.0, True), "compute_half_tokens": (0.0, None, False),
}
"""Physical range of each timing parameter: (low, high or None, may be null). Efficiencies are
fractions of a peak, in (0, 1]; overheads and the floor non-negative seconds; the soft-maximum
exponent >= 1; ``compute_half_tokens`` non-negative tokens."""


def _check_params(params: dict, path: Path) -> None:
    """Raise :class:`InputError` for a parameter that is not a finite number in its range."""
    for name, value in params.items():
        if name not in _RANGES:
            continue                         # TimingParams reports unknown names
        low, high, nullable = _RANGES[name]
        if value is None and nullable:
            continue
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value) and value >= low and (high is None or value <= high)
              and not (name.endswith("efficiency") and value == 0))
        if not ok:
            bound = f"in (0, {high:g}]" if name.endswith("efficiency") else f">= {low:g}"
            raise InputError(f"expected a finite number {bound}, got {value!r}",
                             path=path, field=f"params.{name}")
