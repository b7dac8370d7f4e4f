"""What ``tracer bench`` sends: schedules of requests, as the field's load generators build
them (``vllm bench serve``, guidellm, inference-perf).

- **Poisson / gamma** (:func:`poisson_schedule`): ``--request-rate`` with gamma gaps of shape
  ``--burstiness`` (1: Poisson), fixed sizes.
- **Stages** (:func:`stages_schedule`): ``rate:duration`` steps one after another (a ramp, as
  guidellm's and inference-perf's load stages), each a Poisson process over its duration.
- **Trace replay** (:func:`trace_schedule`): an archive workload's arrivals and sizes.
- **Shared prefixes** (:func:`shared_prefix_schedule`): groups of system prompts, each
  followed by its own questions (inference-perf's ``shared_prefix`` data, SGLang's
  generated-shared-prefix benchmark): the prefix cache's workload, with exact token counts.
- **Prompt files** (:func:`prompts_schedule`): real prompts, ShareGPT conversations or
  token-id files (:mod:`tracer.prompts`), sent as :func:`poisson_schedule` sends, as
  ``vllm bench serve --dataset-name sharegpt`` does.
- **Multi-turn sessions** (:func:`sessions_schedule`): conversations whose every turn sends
  the whole conversation so far — earlier prompts and the answers the server gave — plus a
  new question, after the previous answer and a think time (chat serving's append-only
  prefix, the case the thesis's prefix cache was designed for).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from archive.errors import InputError


@dataclass(frozen=True)
class Schedule:
    """What to send: per request its send offset (s from the start), prompt and output
    tokens; a generator's own prompts (token ids, else built per size by the server's
    tokenizer), the load stage each request belongs to, and its shared-prefix group. In a
    multi-turn schedule (``session`` and ``turn`` set) ``prompts`` hold each turn's new
    question, only first turns are sent at their offsets, and each later turn goes
    ``think_s`` after the previous answer, its prompt the conversation so far."""

    offset_s: np.ndarray
    n_input_tokens: np.ndarray
    n_output_tokens: np.ndarray
    prompts: list[list[int]] | None = None
    stage: np.ndarray | None = None
    group: np.ndarray | None = None
    session: np.ndarray | None = None
    turn: np.ndarray | None = None
    think_s: float = 0.0

    def __len__(self) -> int:
        return int(self.offset_s.size)


def poisson_schedule(n: int, rate: float, input_len: int, output_len: int,
                     burstiness: float = 1.0, seed: int = 0) -> Schedule:
    """``n`` requests of fixed sizes with gamma(shape = burstiness, mean 1/rate) gaps (a
    Poisson process at burstiness 1; ``vllm bench serve``'s ``--burstiness``); the first one
    at 0 s. ``rate`` may be ``inf``: everything at once.

    Raises
    ------
    InputError
        For a non-positive count, rate, size or burstiness.
    """
    _positive(("num-prompts", n), ("request-rate", rate), ("input-len", input_len),
              ("output-len", output_len), ("burstiness", burstiness))
    offsets = _send_offsets(np.random.default_rng(seed), n, rate, burstiness)
    return Schedule(offsets, np.full(n, input_len), np.full(n, output_len))


def trace_schedule(table, n: int | None, rate_scale: float = 1.0) -> Schedule:
    """The first ``n`` requests of an archive workload (its arrivals divided by
    ``rate_scale``, and its sizes).

    Raises
    ------
    InputError
        When the trace has no arrival times, or ``rate_scale`` is not positive.
    """
    if "arrival_s" not in table.column_names:
        raise InputError("the trace has no arrival times to replay", field="trace")
    if not rate_scale > 0:
        raise InputError(f"must be positive, got {rate_scale}", field="rate-scale")
    rows = table.num_rows if n is None else min(n, table.num_rows)
    arrival = table.column("arrival_s").to_numpy()[:rows].astype(np.float64)
    return Schedule((arrival - arrival.min()) / rate_scale,
                    table.column("n_input_tokens").to_numpy()[:rows].astype(np.int64),
                    np.maximum(table.column("n_output_tokens").to_numpy()[:rows], 1)
                    .astype(np.int64))


def _positive(*named) -> None:
    """Raise :class:`InputError` (naming the option) for any ``(option, value)`` pair whose
    value is not positive."""
    for name, value in named:
        if not value > 0:
            raise InputError(f"must be positive, got {value}", field=name)


def _send_offsets(rng, n: int, rate: float, burstiness: float) -> np.ndarray:
    """Send times of ``n`` requests with :func:`_gaps` between them, the first at 0 s."""
    return np.concatenate(([0.0], np.cumsum(_gaps(rng, n, rate, burstiness)[:-1])))


def _gaps(rng, n: int, rate: float, burstiness: float) -> np.ndarray:
    """``n`` gamma(shape = burstiness, mean 1/rate) gaps (all 0 at an infinite rate; all
    ``1/rate`` at an infinite burstiness, the gamma's limit: a constant rate)."""
    if np.isinf(rate):
        return np.zeros(n)
    if np.isinf(burstiness):
        return np.full(n, 1.0 / rate)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), n)


def parse_stages(text: str) -> list[tuple[float, float, str]]:
    """``"2:30,5:100req"`` as ``[(2, 30, "s"), (5, 100, "req")]``: comma-separated
    ``rate:length`` stages, the rate in requests/s, the length in seconds (``30`` or ``30s``)
    or in requests (``100req``).

    Raises
    ------
    InputError
        For a malformed, non-positive or infinite entry, or a request count that is not a
        whole number.
    """
    stages = []
    for part in text.split(","):
        rate, _, length = part.strip().partition(":")
        unit = "req" if length.endswith("req") else "s"
        try:
            values = (float(rate), float(length.removesuffix(unit)))
        except ValueError:
            raise InputError(f"expected rate:seconds or rate:COUNTreq stages like "
                             f"2:30,5:100req, got {part!r}", field="stages") from None
        if not all(np.isfinite(v) and v > 0 for v in values):
            raise InputError(f"rates and lengths must be positive and finite, got {part!r}",
                             field="stages")
        if unit == "req" and not values[1].is_integer():
            raise InputError(f"a request count must be whole, got {part!r}", field="stages")
        stages.append((*values, unit))
    return stages


def stages_schedule(stages: list[tuple[float, float, str]], input_len: int, output_len: int,
                    burstiness: float = 1.0, seed: int = 0) -> Schedule:
    """Requests of fixed sizes in stages (:func:`parse_stages`): each a gamma(burstiness)
    process at its rate for its seconds, or for its number of requests, starting where the
    last one ended; every request knows its stage.

    Raises
    ------
    InputError
        For non-positive sizes or burstiness, or stages that send no request.
    """
    _positive(("input-len", input_len), ("output-len", output_len),
              ("burstiness", burstiness))
    rng = np.random.default_rng(seed)
    offsets, stage, begin = [], [], 0.0
    for k, (rate, length, unit) in enumerate(stages):
        if unit == "req":                  # a count: the next stage starts at its last send
            times = begin + np.cumsum(_gaps(rng, int(length), rate, burstiness))
            begin = float(times[-1])
        else:
            expected = int(rate * length)
            times = begin + np.cumsum(_gaps(rng, max(2 * expected + 10, 10), rate,
                                            burstiness))
            times = times[times < begin + length]
            begin += length
        offsets.append(times)
        stage.append(np.full(times.size, k))
    offset = np.concatenate(offsets)
    if not offset.size:
        raise InputError("the stages send no request (raise a rate or a duration)",
                         field="stages")
    offset -= offset[0]
    return Schedule(offset, np.full(offset.size, input_len), np.full(offset.size, output_len),
                    stage=np.concatenate(stage))


def shared_prefix_schedule(tokens: Callable[[str, int], list[int]], n: int, rate: float,
                           groups: int, prefix_len: int, question_len: int, output_len: int,
                           burstiness: float = 1.0, seed: int = 0) -> Schedule:
    """``n`` requests in ``groups`` groups: every request of a group starts with the group's
    system prompt (``prefix_len`` tokens) and ends with a question of its own
    (``question_len`` tokens); groups are drawn uniformly at random, sends as
    :func:`poisson_schedule`. ``tokens(text, n)`` returns exactly ``n`` token ids beginning
    with ``text`` (the server's tokenizer: :meth:`~tracer.client.VLLMClient.prompt_tokens`).

    A cache that keeps every system prompt hits ``prefix_len`` tokens of each request after
    the first of its group: a token hit rate of ``(n − groups) · prefix_len / (n ·
    (prefix_len + question_len))`` when all groups appear.

    Raises
    ------
    InputError
        For non-positive counts or sizes.
    """
    _positive(("num-prompts", n), ("request-rate", rate),
              ("prefix-groups", groups), ("prefix-len", prefix_len),
              ("input-len", question_len), ("output-len", output_len),
              ("burstiness", burstiness))
    rng = np.random.default_rng(seed)
    offsets = _send_offsets(rng, n, rate, burstiness)
    group = rng.integers(0, groups, n)
    prefixes = [tokens(f"System prompt {g}: you are assistant number {g}.", prefix_len)
                for g in range(groups)]
    prompts = [prefixes[g] + tokens(f"Question {i}:", question_len)
               for i, g in enumerate(group.tolist())]
    return Schedule(offsets, np.full(n, prefix_len + question_len), np.full(n, output_len),
                    prompts=prompts, group=group)


SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT_LEN, SHAREGPT_MAX_TOTAL_LEN = 4, 1024, 2048
"""vLLM's ShareGPT filter (``is_valid_sequence`` in ``vllm/benchmarks/datasets.py``): prompts
and outputs of at least 4 tokens, prompts of at most 1,024, both together at most 2,048."""


def prompts_schedule(records: list, tokenize: Callable[[str], list[int]], n: int, rate: float,
                     output_len: int | None = None, burstiness: float = 1.0, seed: int = 0
                     ) -> Schedule:
    """``n`` requests of a prompt file's prompts (:func:`tracer.prompts.read_prompt_file`),
    shuffled by ``seed`` and sent as :func:`poisson_schedule`'s. A ShareGPT prompt is
    tokenized by the server (``tokenize``, its ``/tokenize``) and sent as those token ids, so
    ``n_input_tokens`` is exact; its output length is its completion's token count, or
    ``output_len`` when given (vLLM's ``--sharegpt-output-len``). ShareGPT prompts outside
    vLLM's bounds (:data:`SHAREGPT_MIN_LEN` …) are passed over, as ``vllm bench serve``
    passes them over; token-id prompts are sent as they are, with their
    own output length unless ``output_len`` is given. Only as many prompts are tokenized as
    the schedule needs.

    Raises
    ------
    InputError
        For non-positive counts, rates or sizes, or fewer than ``n`` usable prompts (no
        prompt is sent twice).
    """
    _positive(("num-prompts", n), ("request-rate", rate), ("burstiness", burstiness),
              ("output-len", 1 if output_len is None else output_len))
    rng = np.random.default_rng(seed)
    prompts, n_out = [], []
    for k in rng.permutation(len(records)).tolist():
        record = records[k]
        if isinstance(record.prompt, str):
            ids = tokenize(record.prompt)
            out = output_len or len(tokenize(record.completion))
            if not (
                    len(ids) >= SHAREGPT_MIN_LEN and len(ids) <= SHAREGPT_MAX_PROMPT_LEN
                    and (output_len or out >= SHAREGPT_MIN_LEN)
                    and len(ids) + out <= SHAREGPT_MAX_TOTAL_LEN):
                continue
        else:
            ids, out = record.prompt, output_len or record.n_output_tokens
        prompts.append(list(ids))
        n_out.append(out)
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise InputError(f"only {len(prompts):,} usable prompts in the file, {n:,} asked "
                         "(lower --num-prompts)", field="num-prompts")
    offsets = _send_offsets(rng, n, rate, burstiness)
    return Schedule(offsets, np.array([len(p) for p in prompts], np.int64),
                    np.array(n_out, np.int64), prompts=prompts)


def sessions_schedule(tokens: Callable[[str, int], list[int]], sessions: int, turns: int,
                      rate: float, question_len: int, output_len: int, think_s: float = 0.0,
                      burstiness: float = 1.0, seed: int = 0) -> Schedule:
    """``sessions`` conversations of ``turns`` turns, starting as :func:`poisson_schedule`'s
    requests at ``rate`` sessions/s. Turn ``t`` asks a new ``question_len``-token question
    after the conversation so far, so its prompt is about ``t · (question_len + output_len) +
    question_len`` tokens (exact where the answer's text re-tokenizes to the tokens generated);
    ``n_input_tokens`` holds that expectation for the ``max_model_len`` check.

    Raises
    ------
    InputError
        For non-positive counts or sizes, or a negative think time.
    """
    _positive(("sessions", sessions), ("turns", turns), ("request-rate", rate),
              ("input-len", question_len), ("output-len", output_len),
              ("burstiness", burstiness))
    if not think_s >= 0:
        raise InputError(f"must be >= 0, got {think_s}", field="think-time")
    rng = np.random.default_rng(seed)
    starts = _send_offsets(rng, sessions, rate, burstiness)
    session = np.repeat(np.arange(sessions), turns)
    turn = np.tile(np.arange(turns), sessions)
    prompts = [tokens(f"Conversation {s}, question {t}:", question_len)
               for s, t in zip(session.tolist(), turn.tolist(), strict=True)]
    expected = turn * (question_len + output_len) + question_len
    return Schedule(starts[session], expected, np.full(session.size, output_len),
                    prompts=prompts, session=session, turn=turn, think_s=think_s)
