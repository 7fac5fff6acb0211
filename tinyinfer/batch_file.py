"""Offline batch inference: a JSONL file of requests in, a JSONL file of results out.

Each input line is one JSON object with a "prompt" (text) or "messages" (a chat, rendered with
the model's chat template), optionally an "id", and any sampling settings of SamplingParams
("max_tokens", "temperature", "top_p", "stop", "seed", ...), which override the defaults.
All requests go to the engine at once, which serves them together (continuous batching).

Each result line carries the input's line number (and id), the text, the token ids, why it
finished and its timings; a line that cannot be run gives {"line": n, "error": "..."} and the
others still run. Results are written as they complete, in input order, so an interrupted run
keeps what it finished; running the same command again skips every line that already has a
result, and the file ends sorted by line, the newest record for each line kept.
"""

import dataclasses
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from tinyinfer.errors import TokenizerMissingError
from tinyinfer.sampling import SamplingParams, is_integer, is_number, setting_problem

SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)}
REQUEST_KEYS = {"prompt", "messages", "id"}
ROLES = ("system", "user", "assistant")


def read_results(path: Path) -> dict[int, dict]:
    """{line number: result} of an earlier run's output (the last record for each line)."""
    if not path.exists():
        return {}
    results = {}
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip():
            try:
                record = json.loads(text)
                results[record["line"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path} line {number} is not a tinyinfer result; "
                                 "give --out a new file or an earlier run's output") from None
    return results


def parse_request(llm, text: str, defaults: dict) -> tuple[list[int], SamplingParams, object]:
    """One input line -> (prompt ids, sampling params, id). A ValueError says what is wrong, field
    by field: 'max_tokens: must be an integer >= 1, got "ten"'.
    Every field is checked here, before anything is tokenized or queued, so that no value of
    the wrong type reaches the engine (and a bad line never takes the run down)."""
    try:
        request = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(request, dict):
        raise ValueError(f"each line must be a JSON object {{...}}, got {shown(request)}")
    unknown = set(request) - SAMPLING_KEYS - REQUEST_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; use prompt or messages, id, and SamplingParams settings")
    if ("prompt" in request) == ("messages" in request):
        raise ValueError('give exactly one of "prompt" (text) or "messages" (a chat)')
    problems = [f"{name}: {problem}, got {shown(value)}" for name, value in request.items()
                if name in SAMPLING_KEYS and (problem := setting_problem(name, value))]
    if "id" in request and not (request["id"] is None or isinstance(request["id"], str) or is_number(request["id"])):
        problems.append(f"id: must be a string or a number, got {shown(request['id'])}")
    problems += prompt_problems(request["prompt"]) if "prompt" in request else messages_problems(request["messages"])
    if problems:
        raise ValueError("; ".join(problems))

    if "messages" in request:
        if llm.tokenizer is None or llm.tokenizer.chat_template is None:
            raise ValueError('"messages" needs a model with a chat template; give a "prompt" instead')
        try:
            text = llm.tokenizer.chat_template.render(request["messages"], add_generation_prompt=True)
        except ValueError as e:
            raise ValueError(f"messages: {e}") from None
        prompt_ids = llm.encode(text, add_special_tokens=False)
    else:
        if isinstance(request["prompt"], str) and llm.tokenizer is None:
            raise ValueError("prompt: text needs a tokenizer, and this model has none; load it with its tokenizer "
                             '(--tokenizer) or give token ids: "prompt": [1, 2, 3]')
        prompt_ids = llm.prompt_ids(request["prompt"])
    settings = defaults | {k: v for k, v in request.items() if k in SAMPLING_KEYS}
    try:
        params = SamplingParams(**settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad sampling settings: {e}") from None
    return prompt_ids, params, request.get("id")


def prompt_problems(prompt) -> list[str]:
    """What is wrong with a line's "prompt": text, or a list of token ids."""
    if isinstance(prompt, str):
        return [] if prompt else ["prompt: must not be empty"]
    if isinstance(prompt, list) and all(is_integer(t) for t in prompt):
        return [] if prompt else ["prompt: must not be empty (give at least one token id)"]
    return [f"prompt: must be text (a string) or a list of token ids (integers), got {shown(prompt)}"]


def messages_problems(messages) -> list[str]:
    """What is wrong with a line's "messages": a non-empty list of {"role", "content"} objects."""
    if not isinstance(messages, list) or not messages:
        return [f'messages: must be a non-empty list of {{"role": ..., "content": ...}} objects, got {shown(messages)}']
    problems = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(f'{where}: must be an object {{"role": ..., "content": ...}}, got {shown(message)}')
            continue
        missing = [key for key in ("role", "content") if key not in message]
        extra = sorted(set(message) - {"role", "content"})
        if missing or extra:
            problems.append(f"{where}: " + "; ".join(
                ([f"missing {' and '.join(missing)}"] if missing else []) + ([f"unknown keys {extra}"] if extra else [])
            ) + ' (each message is {"role": ..., "content": ...})')
            continue
        if message["role"] not in ROLES:
            problems.append(f"{where}.role: must be one of {', '.join(ROLES)}, got {shown(message['role'])}")
        if not isinstance(message["content"], str):
            problems.append(f"{where}.content: must be a string, got {shown(message['content'])}")
    return problems


def shown(value, limit: int = 60) -> str:
    """A value as it was written in the line (JSON), cut short if long."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_batch_file(llm, input_path: Path, output_path: Path, defaults: dict, progress: bool = True) -> dict:
    """Run every line of input_path not yet in output_path; returns what ran, the error
    records by line, what was skipped, and the tokens generated in how many seconds."""
    done = {n for n, r in read_results(output_path).items() if "error" not in r}
    lines = input_path.read_text(encoding="utf-8").splitlines()
    engine = llm.engine
    pending, errors = {}, {}  # request id -> (line, id); line -> error record
    for number, text in enumerate(lines, start=1):
        if number in done or not text.strip():
            continue
        try:
            prompt_ids, params, request_id = parse_request(llm, text, defaults)
            pending[engine.add_request(prompt_ids, params)] = (number, request_id)
        except (ValueError, TypeError, TokenizerMissingError) as e:  # this line only: the others still run
            errors[number] = {"line": number, "error": str(e)}

    finished = dict(errors)  # line -> record, waiting to be written in order
    order = sorted(set(finished) | {line for line, _ in pending.values()})
    written, generated, start = 0, 0, time.perf_counter()
    with open(output_path, "a", encoding="utf-8") as out, tqdm(total=len(order), unit="req", disable=not progress) as bar:
        def flush():
            nonlocal written
            while written < len(order) and order[written] in finished:
                out.write(json.dumps(finished.pop(order[written]), ensure_ascii=False) + "\n")
                written += 1
            out.flush()

        bar.update(len(errors))
        flush()
        while engine.has_unfinished():
            for update in engine.step():
                if update.finished and update.request_id in pending:
                    number, request_id = pending.pop(update.request_id)
                    finished[number] = result_record(number, request_id, update.output, llm.tokenizer is not None)
                    generated += len(update.output.token_ids)
                    bar.update(1)
                    bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tokens/s")
            flush()
    compact(output_path)
    return {"run": len(order) - len(errors), "errors": errors, "skipped": len(done),
            "generated_tokens": generated, "seconds": time.perf_counter() - start}


def result_record(line: int, request_id, output, has_text: bool) -> dict:
    record = {"line": line} | ({"id": request_id} if request_id is not None else {})
    if has_text:
        record["text"] = output.text
    return record | {
        "token_ids": output.token_ids,
        "finish_reason": output.finish_reason,
        "cut_by_context": output.cut_by_context,  # "length" from a full context window, not max_tokens
        "prompt_tokens": len(output.prompt_token_ids),
        "time_to_first_token": output.time_to_first_token,
        "time_per_output_token": output.time_per_output_token,
        "latency": output.total_time,
    }


def compact(path: Path):
    """Rewrite the results sorted by line, one (the newest) record per line; atomic."""
    results = read_results(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(results[n], ensure_ascii=False) + "\n" for n in sorted(results)), encoding="utf-8")
    os.replace(temporary, path)
