"""Prompt files for ``tracer bench --workload prompts``: real prompts instead of generated ones.

Two formats, told apart by their content:

- **ShareGPT** (the JSON file ``vllm bench serve --dataset-name sharegpt`` reads, e.g.
  ``ShareGPT_V3_unfiltered_cleaned_split.json``): a JSON array of conversations, each
  ``{"conversations": [{"from": "human", "value": TEXT}, {"from": "gpt", "value": TEXT},
  ...]}``. As vLLM's ``ShareGPTDataset`` does, the first turn is the prompt and the second the
  completion whose token count is the output length; conversations of fewer than two turns are
  left out.
- **Token ids** (JSON Lines, the workload files of LLMServingSim runs such as those behind the
  bundled ``vllm-serving-*`` datasets): one object per line with ``input_tok_ids`` (the prompt
  as token ids of the served model's tokenizer) and ``output_toks`` (the output length).

Errors name the file and the field: for ShareGPT its JSON path (``[3].conversations[1].value``,
0-based as ``jq`` writes it), for JSON Lines the line and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from archive.errors import InputError


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a file: its text (ShareGPT) or token ids, and the completion text
    (ShareGPT) or output length (token-id files) that sets its output token count."""

    prompt: str | list[int]
    completion: str | None = None
    n_output_tokens: int | None = None


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """The prompts of a ShareGPT JSON or token-id JSON Lines file, in file order.

    Raises
    ------
    InputError
        For an unreadable file, one in neither format, or an entry with a missing or
        mistyped field (file, entry and field named); for a file with no usable prompt.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the prompt file: {getattr(exc, 'strerror', exc)}",
                         path=path) from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON: {exc.msg}", path=path, row=exc.lineno) from None
        records = _sharegpt(data, path)
    else:
        records = _token_lines(text, path)
    if not records:
        raise InputError("holds no prompt with a completion to take the output length from",
                         path=path)
    return records


def _sharegpt(data, path: Path) -> list[PromptRecord]:
    records = []
    for k, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise InputError("expected an object with a 'conversations' list (ShareGPT)",
                             path=path, field=f"[{k}].conversations")
        if len(turns) < 2:                  # vLLM's ShareGPTDataset skips these too
            continue
        values = [t.get("value") if isinstance(t, dict) else None for t in turns[:2]]
        for t, value in enumerate(values):
            if not isinstance(value, str):
                raise InputError("expected a turn with a text 'value'", path=path,
                                 field=f"[{k}].conversations[{t}].value")
        records.append(PromptRecord(values[0], completion=values[1]))
    return records


def _token_lines(text: str, path: Path) -> list[PromptRecord]:
    records = []
    for row, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise InputError("neither a ShareGPT JSON array nor JSON Lines of token ids",
                             path=path, row=row) from None
        ids, n_out = (entry.get("input_tok_ids"), entry.get("output_toks")) if isinstance(
            entry, dict) else (None, None)
        if not (isinstance(ids, list) and ids and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            raise InputError("expected a non-empty list of token ids", path=path, row=row,
                             field="input_tok_ids")
        if not (isinstance(n_out, int) and not isinstance(n_out, bool) and n_out >= 1):
            raise InputError(f"expected a positive integer, got {n_out!r}", path=path,
                             row=row, field="output_toks")
        records.append(PromptRecord(ids, n_output_tokens=n_out))
    return records
