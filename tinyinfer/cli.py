"""The `tinyinfer` command: generate, chat, batch, serve, info, bench, eval, plan.

Every option is checked by its argparse type before anything loads. A user's mistake, or an
optional dependency that is not installed, is one line on stderr and exit status 2, never a
traceback (main); a reader that goes away (`| head -1`) ends the command quietly."""

import argparse
import dataclasses
import ipaddress
import math
import os
import sys
import time
from pathlib import Path


import tinyinfer
from tinyinfer.batch_file import run_batch_file
from tinyinfer.bench import (CACHE_FOOTNOTE, GPU_BACKENDS, RANDOM_SHAPES, bound_cells, bound_source_cells,
                             graphs_cell, plot_batch_bench, plot_bench, random_model, run_batch_bench, run_bench)
from tinyinfer.chat import ChatSession
from tinyinfer.engine import EngineConfig
from tinyinfer.errors import CheckpointError, ContextLengthError, KVCacheTooSmallError, TokenizerMissingError
from tinyinfer.llm import COMPUTE_DTYPES, LLM
from tinyinfer.ops import BACKENDS, get_backend
from tinyinfer.default_model import default_model_path
from tinyinfer.loading import load_config
from tinyinfer.parallel.errors import ParallelConfigError, ParallelError
from tinyinfer.parallel.launch import InMemorySource, ParallelOptions
from tinyinfer.parallel.mpi import launched_rank, under_mpiexec
from tinyinfer.parallel.layout import ParallelLayout
from tinyinfer.parallel.link import LINKS, get_link
from tinyinfer.parallel.communicator import DEFAULT_TIMEOUT
from tinyinfer.parallel.plan import ParallelPlan, format_plan
from tinyinfer.roofline import ROOFLINES, this_machine
from tinyinfer.parallel.router import ROUTING
from tinyinfer.parallel.timeline import draw_prefill_timeline
from tinyinfer.plotting import pyplot
from tinyinfer.threads import available_cores, check_threads
from tinyinfer.quantize import WEIGHT_FORMATS, store_weights


# what each backend is, for --help
BACKEND_HELP = {
    "numpy": "the reference, plain NumPy: every op as written",
    "numba": "compiled CPU kernels, several times faster (the first run compiles them, then they are cached)",
    "cupy": 'an NVIDIA GPU (needs CuPy: pip install "tinyinfer[gpu]")',
}


def backends_help() -> str:
    return "; ".join(f"{name}: {BACKEND_HELP[name]}" for name in BACKENDS)


def add_model_arguments(parser: argparse.ArgumentParser, threads: bool = True):
    parser.add_argument("--model", help="a Hugging Face model directory or a llama2.c .bin (default: the bundled model, bard)")
    parser.add_argument("--tokenizer", help="tokenizer.json or llama2.c tokenizer.bin (if the model has none)")
    parser.add_argument("--backend", default="numpy", choices=list(BACKENDS),
                        help=f"where the ops run. {backends_help()}")
    parser.add_argument("--dtype", default="float32", choices=list(COMPUTE_DTYPES), help="compute dtype")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS,
                        help="store the matrices as float32, float16 or int8 (Q8_0) (default: the compute dtype)")
    if threads:
        add_threads_argument(parser)
    add_enforce_eager_argument(parser)


def add_enforce_eager_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run the model op by op, without the backend's compiled form (numba: compiled layers; "
                             "cupy: CUDA graphs of decode steps): the same numbers, to compare or debug")


def add_threads_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--threads", type=parse_threads, default="auto",
                        help="CPU threads for the kernels, or auto: the cores other programs leave free, looked at "
                             "before each forward pass (many threads on a busy machine wait for each other)")


def parse_threads(text: str) -> int | str:
    try:
        return check_threads("auto" if text == "auto" else int(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parallel_arguments(parser: argparse.ArgumentParser, data_parallel: bool = True):
    group = parser.add_argument_group("parallelism (simulated devices; one process per device under mpiexec)")
    group.add_argument("--tp", type=positive_int, default=1,
                       help="tensor-parallel devices: each layer's heads and MLP split")
    group.add_argument("--pp", type=positive_int, default=1, help="pipeline stages: each a range of layers")
    if data_parallel:
        group.add_argument("--dp", type=positive_int, default=1, help="data-parallel replicas of the whole model")
        group.add_argument("--routing", default="round_robin", choices=ROUTING,
                           help="how requests are handed to replicas")
    group.add_argument("--pp-layers", type=parse_layer_counts, help="layers of each stage, e.g. 6,6 (default: balanced)")
    group.add_argument("--micro-batches", type=positive_int,
                       help="split each step's sequences into this many (default: --pp)")
    group.add_argument("--link", default="nvlink", choices=sorted(LINKS), help="link model of simulated devices")
    group.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                       help="seconds a device waits for another inside a step before the group stops with an error")


# ---- option types: a bad value is a one-line usage error before anything loads -----------------
def int_at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`, or a one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {text!r}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def number_where(condition, expected: str):
    """An argparse type: a finite number for which `condition` holds, or a usage error that
    says what was `expected`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and condition(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_float = number_where(lambda v: v > 0, "a positive number")
non_negative_float = number_where(lambda v: v >= 0, "a number of at least 0")
fraction = number_where(lambda v: 0 <= v <= 1, "a number from 0 to 1")
nonzero_fraction = number_where(lambda v: 0 < v <= 1, "a number above 0 and at most 1")


def one_of(choices):
    """An argparse type for one item of a list option: a member of `choices`."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def list_of(item, example: str):
    """An argparse type: comma-separated items, each parsed by the type `item` -> a list."""
    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list such as {example}, got {text!r}")
        return [item(part) for part in parts]

    return parse


parse_layer_counts = list_of(positive_int, "6,6")
batch_sizes = list_of(positive_int, "1,4,16")


def port_number(text: str) -> int:
    port = int_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 0 to 65535, got {text!r}")
    return port


def parse_ids(text: str) -> list[int]:
    """--prompt-ids: token ids separated by commas or spaces."""
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        ids = []
    if not ids:
        raise argparse.ArgumentTypeError(f"expected token ids separated by commas or spaces, e.g. 1,403,407; "
                                         f"got {text!r}")
    return ids


def non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


def parallel_options(args) -> dict:
    """The tinyinfer.load keywords of the parallel arguments and of what each device runs."""
    return {"tp": args.tp, "pp": args.pp, "dp": getattr(args, "dp", 1), "pp_layers": args.pp_layers,
            "micro_batches": args.micro_batches, "link": args.link, "routing": getattr(args, "routing", "round_robin"),
            "timeout": args.timeout, "threads": args.threads, "enforce_eager": args.enforce_eager}


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float):
    defaults = tinyinfer.SamplingParams()
    parser.add_argument("--temperature", type=non_negative_float, default=temperature, help="0 is greedy")
    parser.add_argument("--top-k", type=non_negative_int, default=defaults.top_k,
                        help="keep the k most likely tokens; 0 disables")
    parser.add_argument("--top-p", type=nonzero_fraction, default=defaults.top_p,
                        help="keep the most likely tokens up to this total probability; 1 disables")
    parser.add_argument("--min-p", type=fraction, default=defaults.min_p,
                        help="drop tokens less likely than this times the most likely one; 0 disables")
    parser.add_argument("--repetition-penalty", type=positive_float, default=defaults.repetition_penalty,
                        help="above 1 discourages tokens already seen; 1 disables")
    parser.add_argument("--max-tokens", type=positive_int, default=defaults.max_tokens, help="new tokens at most")
    parser.add_argument("--stop", action="append", type=non_empty, default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=non_negative_int, default=None, help="the same seed gives the same text")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past end-of-sequence and the model's own stop strings")


def sampling_params(args) -> tinyinfer.SamplingParams:
    return tinyinfer.SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, stop=args.stop,
        seed=args.seed, ignore_eos=args.ignore_eos,
    )


def load_model(args) -> LLM:
    return tinyinfer.load(args.model, backend=args.backend, dtype=args.dtype, tokenizer=args.tokenizer,
                          weights=args.weights, **parallel_options(args))


# ---- commands --------------------------------------------------------------------------------
def cmd_generate(args):
    params = sampling_params(args)
    llm = load_model(args)
    if args.stop and llm.tokenizer is None:
        raise ValueError("--stop needs a tokenizer to find the text in the output, and this model has none: pass one "
                         "with --tokenizer PATH (a tokenizer.json, or a llama2.c tokenizer.bin)")
    if args.prompt_ids is not None:  # a model without a tokenizer works on ids
        out = llm.generate(args.prompt_ids, params)
        print(" ".join(map(str, out.token_ids)))
        if out.cut_by_context:
            print(context_full(llm), file=sys.stderr)
        return
    # encoded and checked (empty, too long, no tokenizer) before anything is printed
    request_id = llm.engine.add_request(args.prompt, params)
    sys.stdout.write(args.prompt)
    output = write_as_generated(llm, request_id)
    sys.stdout.write("\n")
    if output.cut_by_context:
        sys.stdout.flush()  # the text first, then the notice, where both go to one terminal
        print(context_full(llm), file=sys.stderr)


def write_as_generated(llm, request_id: int):
    """Step the engine, writing one request's text to stdout as it comes (as LLM.stream does);
    its GenerationOutput once it is done. Stopping early (Ctrl-C, a closed pipe) aborts it."""
    try:
        while True:
            for update in llm.engine.step():
                if update.request_id != request_id:
                    continue
                if update.new_text:
                    sys.stdout.write(update.new_text)
                    sys.stdout.flush()
                if update.finished:
                    return update.output
    finally:
        llm.engine.abort(request_id)  # a no-op once it has finished


def context_full(llm) -> str:
    """The notice for output that stopped because the prompt and output filled the context window."""
    return f"[stopped: the context window of {llm.config.max_context} tokens is full]"


def cmd_chat(args):
    params = sampling_params(args)
    llm = load_model(args)
    session = ChatSession(llm, system_prompt=args.system)
    mode = "chat template" if session.uses_template else "no chat template: plain continuation"
    print(f"tinyinfer chat: {llm.name} ({mode}). /reset starts over, /exit or Ctrl-D quits.")
    while True:
        try:
            user_text = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            print("\n(Ctrl-D or /exit to quit)")
            continue
        command = user_text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if not command:
            continue
        start = time.perf_counter()
        try:
            for piece in session.send(user_text, params):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C while answering stops the answer, not the program
            sys.stdout.write(" [interrupted]")
        except ContextLengthError as e:  # this turn alone does not fit
            print(f"error: {e}")
            continue
        sequence = session.last_sequence
        elapsed = time.perf_counter() - start
        cut = f"; stopped: the context window of {llm.config.max_context} tokens is full" if sequence.cut_by_context else ""
        print(
            f"\n[{len(sequence.output_ids)} tokens, {len(sequence.output_ids) / elapsed:.1f} tokens/s, "
            f"{session.reused_tokens} of {len(sequence.prompt_ids)} prompt tokens reused from the cache{cut}]"
        )
        if session.dropped_turns:  # the conversation outgrew the window: it goes on without its start
            dropped = "the oldest turn" if session.dropped_turns == 1 else f"the {session.dropped_turns} oldest turns"
            print(f"(dropped {dropped} to fit the context window of {llm.config.max_context} tokens)")


def cmd_info(args):
    llm = tinyinfer.load(args.path, tokenizer=args.tokenizer)
    config, path = llm.config, llm.path
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    if path.is_dir():
        from tinyinfer.loading.hf_checkpoint import stored_dtypes

        stored = ", ".join(stored_dtypes(path))
    else:
        stored = "F32 (llama2.c)"
    rows = [
        ("model", llm.name),
        ("path", path),  # where the bundled model lies, when no path was given
        ("architecture", config.architecture),
        ("parameters", f"{config.num_parameters:,} ({config.num_parameters / 1e6:.2f} M)"),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("MLP size", config.intermediate_size),
        ("heads", f"{config.num_heads} query, {config.num_kv_heads} key/value, head_dim {config.head_dim}"),
        ("vocab size", config.vocab_size),
        ("context length", config.max_context),
        ("rope", f"theta {config.rope_theta:g}" + (f", scaling {config.rope_scaling}" if config.rope_scaling else "")),
        ("tied embeddings", config.tie_word_embeddings),
        ("stored dtype", stored),
        ("bytes on disk", f"{sum(f.stat().st_size for f in files):,}"),
        ("bytes in memory", f"{llm.model.weights.nbytes:,} (weights as {llm.dtype})"),
        ("tokenizer", type(llm.tokenizer).__name__ if llm.tokenizer else "none (token ids only)"),
        ("chat template", "yes" if llm.tokenizer and llm.tokenizer.chat_template else "no"),
    ]
    for name, value in rows:
        print(f"{name:>16}: {value}")


def bench_models(args):
    """(name, LLM) for every backend and weight format the bench was asked for. A random model's
    weights are made once for them all (a 1 B model's take seconds)."""
    dtype = COMPUTE_DTYPES[args.dtype]
    options = ParallelOptions(**parallel_options(args))
    config, weights = random_model(args.random, dtype) if args.random else (None, None)
    for weight_format in args.weights:
        for backend in args.backend:
            if args.random:
                if options.wanted():
                    llm = LLM.on_parallel_group(InMemorySource(config, weights), options, backend, dtype, weight_format,
                                                Path(args.random))
                else:
                    llm = LLM(config, store_weights(weights, weight_format), None, get_backend(backend), dtype,
                              Path(args.random), args.threads, args.enforce_eager)
                yield f"random {args.random}" + parallel_label(llm), weight_format, llm
            else:
                llm = tinyinfer.load(args.model, backend=backend, dtype=args.dtype, weights=weight_format,
                                     **parallel_options(args))
                yield llm.name + parallel_label(llm), weight_format, llm
            llm.close()


def on_a_gpu(args) -> bool:
    """Whether a bench table has GPU rows, and so the columns that say whose memory bounds each
    row and whether it ran as CUDA graphs (a CPU-only table stays as it always was)."""
    return any(backend in GPU_BACKENDS for backend in args.backend)


def parallel_label(llm) -> str:
    """How a parallel model ran, for a bench row: its layout, and its clock (a simulation's
    times are its devices' virtual clocks, priced on a link model)."""
    group = llm.parallel
    if group is None:
        return ""
    how = f"simulated, {group.world.link.name}" if group.simulated else "MPI"
    return f", {group.layout.describe().split(' = ')[0]} ({how})"


def cmd_bench_batch(args):
    """Output throughput and per-token latency for each batch size, served by the engine."""
    rows = []
    gpu = on_a_gpu(args)
    for index, (name, weight_format, llm) in enumerate(bench_models(args)):
        if index == 0:  # once a model is loaded: under mpiexec only rank 0 gets here
            print("| model | backend | weights | " + ("CUDA graphs | " if gpu else "") + "batch | output tok/s | "
                  "median time/token | median first token | x batch 1 |")
            print("| --- | --- | --- | " + ("--- | " if gpu else "") + "---: | ---: | ---: | ---: | ---: |")
        first = None
        for size in args.batch:
            r = run_batch_bench(llm, size, args.prompt_tokens, args.new_tokens)
            first = first or r["output_tokens_per_s"]
            graphs = f"{graphs_cell(r, llm.ops.name)} | " if gpu else ""
            print(f"| {name} | {llm.ops.name} | {weight_format} | {graphs}{size} | {r['output_tokens_per_s']:.1f} | "
                  f"{r['median_time_per_output_token_ms']:.1f} ms | {r['median_time_to_first_token_ms']:.0f} ms | "
                  f"{r['output_tokens_per_s'] / first:.2f} |", flush=True)
            rows.append(r | {"label": row_label(name, llm, weight_format, r)})
    if args.plot:
        plot_batch_bench(rows, args.plot)
        print(f"plot: {args.plot}")


def row_label(name: str, llm, weight_format: str, result: dict) -> str:
    """A row's label in the plots: model, backend and weights, and on a GPU whether it ran as
    CUDA graphs or eagerly."""
    how = (", CUDA graphs" if result["cuda_graphs"] else ", eager") if llm.ops.name in GPU_BACKENDS else ""
    return f"{name}, {llm.ops.name}{how}, {weight_format}"


def cmd_bench(args):
    """One table row per (backend, weight format), all measured in this one run. With a GPU
    backend in the table, two more columns: whose memory bandwidth bounds each row (the CPU's
    read bandwidth, or the GPU's copy bandwidth) and whether a GPU row ran as CUDA graphs."""
    check_bench_arguments(args)
    if under_mpiexec() and (len(args.backend) > 1 or len(args.weights) > 1):
        if launched_rank() != 0:
            return 2  # rank 0 says why
        raise ValueError("under mpiexec, bench measures one --backend and one --weights per launch (the ranks "
                         "serving a group exit when it closes); run mpiexec once for each")
    if args.batch:
        return cmd_bench_batch(args)
    rows = []
    gpu = on_a_gpu(args)
    for index, (name, weight_format, llm) in enumerate(bench_models(args)):
        if index == 0:  # once a model is loaded: under mpiexec only rank 0 gets here
            bandwidth = "bandwidth | bound from | CUDA graphs" if gpu else "read bandwidth"
            print(f"| model | backend | weights | pp{args.prompt_tokens} tok/s | tg{args.new_tokens} tok/s | "
                  f"weights read/token | {bandwidth} | decode bound tok/s | tg / bound |")
            print("| --- | --- | --- | ---: | ---: | ---: | ---: | " + ("--- | --- | " if gpu else "") + "---: | ---: |")
        r = run_bench(llm, args.prompt_tokens, args.new_tokens, args.repetitions)
        rows.append(r | {"label": row_label(name, llm, weight_format, r)})
        bound, fraction = bound_cells(r)
        source = " | ".join(bound_source_cells(r, llm.ops.name)) + " | " if gpu else ""
        print(
            f"| {name} | {llm.ops.name} | {weight_format} | {r['prefill_tokens_per_s']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['weight_mb_per_token']:.1f} MB | "
            f"{r['bandwidth_gb_per_s']:.1f} GB/s | {source}{bound} | {fraction} |",
            flush=True,
        )
        if args.timeline:
            bubble = draw_prefill_timeline(llm.model, args.prompt_tokens, args.timeline, title=name)
            print(f"pipeline bubble: {bubble.describe()} -> {args.timeline}")
    if any(0.5 <= r["cached_share"] < 1 for r in rows):
        print(f"\n{CACHE_FOOTNOTE}")
    if args.plot:
        plot_bench(rows, args.plot)
        print(f"plot: {args.plot}")


def check_bench_arguments(args):
    """What argparse cannot check alone, before anything loads: --timeline's needs, and
    matplotlib for a chart (said now, not after the whole benchmark)."""
    if args.timeline:
        if args.pp < 2:
            raise ValueError("--timeline draws the stages of a pipeline: give --pp 2 or more")
        if args.batch or len(args.backend) > 1 or len(args.weights) > 1:
            raise ValueError("--timeline draws one run: give one --backend and one --weights, and no --batch")
    if args.plot or args.timeline:
        pyplot()  # matplotlib is there (or say so before the benchmark runs)


def cmd_eval(args):
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start}); eval scores a text "
                         "file") from None
    llm = load_model(args)
    result = llm.perplexity(text, context=args.context, max_chunks=args.chunks, progress=True)
    print(f"{llm.name} on {args.file}: {result.predicted_tokens} tokens predicted in {result.windows} windows "
          f"of up to {args.context or llm.config.max_context}")
    print(f"mean loss {result.mean_loss:.4f} nats/token, perplexity {result.perplexity:.2f}")


def cmd_batch(args):
    llm = load_model(args)
    llm.engine = llm.new_engine(EngineConfig(max_num_seqs=args.max_num_seqs))
    defaults = dataclasses.asdict(sampling_params(args))
    report = run_batch_file(llm, Path(args.input), Path(args.out), defaults)
    for record in report["errors"].values():
        print(f"tinyinfer: {args.input} line {record['line']}: {record['error']}", file=sys.stderr)
    seconds = report["seconds"]
    print(f"{report['run']} requests run, {len(report['errors'])} bad lines, {report['skipped']} already done; "
          f"{report['generated_tokens']} tokens in {seconds:.1f} s ({report['generated_tokens'] / seconds:.1f} tokens/s) "
          f"-> {args.out}")
    return 1 if report["errors"] else 0


def cmd_serve(args):
    """An OpenAI-compatible HTTP server (tinyinfer/server/) until Ctrl-C."""
    api_key = args.api_key if args.api_key is not None else os.environ.get("TINYINFER_API_KEY") or None
    check_bind_address(args.host, api_key, args.insecure)
    if args.threads is None:
        args.threads = max(1, available_cores() - 1)
    try:  # imported here: the other commands do not need the serve extra
        import uvicorn

        from tinyinfer.server import create_app
    except ImportError as e:
        raise ImportError(f"tinyinfer serve needs FastAPI, uvicorn and prometheus-client ({e.name} is not installed): "
                          'pip install "tinyinfer[serve]"') from None
    llm = load_model(args)
    try:
        llm.engine = llm.new_engine(EngineConfig(max_num_seqs=args.max_num_seqs))
        app = create_app(llm, model_name=args.served_model_name, api_key=api_key, max_waiting=args.max_waiting,
                         chunk_interval=args.chunk_interval)
        url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
        key = "an API key (Authorization: Bearer KEY)" if api_key else "no API key"
        print(f"tinyinfer serve: {app.state.served.name} at {url}/v1 (OpenAI API, {key}), chat page at {url}/, "
              "Ctrl-C stops", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        llm.close()


def check_bind_address(host: str, api_key: str | None, insecure: bool):
    """Only this machine may reach a server without a key: binding any other address (0.0.0.0,
    a LAN address, a host name) needs an API key, or --insecure to say it is meant."""
    if is_loopback(host) or api_key or insecure:
        return
    raise ValueError(f"--host {host} lets other machines reach the server, and it has no API key: give one "
                     "(--api-key KEY, or the TINYINFER_API_KEY environment variable), or pass --insecure to serve "
                     "without one")


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1 or localhost; a host name may resolve to anything, so it is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_plan(args):
    """Each device's weights and KV bytes, the bytes on each link, and a step's modelled time."""
    config = load_config(args.model) if args.model else load_config(default_model_path())
    roofline = this_machine() if args.device == "this-machine" else ROOFLINES[args.device]
    plan = ParallelPlan(config, ParallelLayout(args.tp, args.pp, args.dp), get_link(args.link), roofline,
                        args.weights, COMPUTE_DTYPES[args.dtype], args.pp_layers)
    print(format_plan(plan, args.prompt_tokens, args.batch, args.context, args.micro_batches))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where there is one to show (not None, off or an
    empty list) and its help does not say it already."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser, with defaults in --help and a usage error in one line (argparse's
    usage of a command with thirty options would bury it)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        if launched_rank() != 0:  # under mpiexec every rank parses the same command line: rank 0 says it
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tinyinfer", description="A teaching inference engine for transformer LMs.",
                    epilog=f"Backends (--backend): {backends_help()}. Each command's --help lists its options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {tinyinfer.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="stream the continuation of a prompt")
    add_model_arguments(generate)
    add_parallel_arguments(generate)
    add_sampling_arguments(generate, temperature=1.0)
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("prompt", nargs="?", help="the text to continue")
    prompt.add_argument("--prompt-ids", type=parse_ids, help="token ids instead of text, e.g. '1,403,407' (prints ids)")
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="talk to the model (uses its chat template when it has one)")
    add_model_arguments(chat)
    add_parallel_arguments(chat)
    add_sampling_arguments(chat, temperature=0.8)
    chat.add_argument("--system", help="a system prompt")
    chat.set_defaults(run=cmd_chat)

    info = commands.add_parser("info", help="what a checkpoint holds, and where it lies")
    info.add_argument("path", nargs="?", help="a model directory or a llama2.c .bin (default: the bundled model, bard)")
    info.add_argument("--tokenizer", help="tokenizer.json or llama2.c tokenizer.bin (if the model has none)")
    info.set_defaults(run=cmd_info)

    bench = commands.add_parser("bench", help="prefill and decode tokens/s (llama-bench style)")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--model", help="a model path (default: the bundled model, bard)")
    source.add_argument("--random", choices=sorted(RANDOM_SHAPES), help="a random-weight model of this shape")
    bench.add_argument("--backend", type=list_of(one_of(list(BACKENDS)), "numpy,numba"), default="numpy",
                       help=f"one or more, comma-separated. {backends_help()}")
    bench.add_argument("--dtype", default="float32", choices=list(COMPUTE_DTYPES), help="compute dtype")
    add_threads_argument(bench)
    add_enforce_eager_argument(bench)
    bench.add_argument("--weights", type=list_of(one_of(WEIGHT_FORMATS), "float32,int8"), default="float32",
                       help=f"one or more of {', '.join(WEIGHT_FORMATS)}, comma-separated")
    bench.add_argument("-p", "--prompt-tokens", type=positive_int, default=128, help="prompt tokens of each prefill")
    bench.add_argument("-n", "--new-tokens", type=positive_int, default=128, help="decode steps of each run")
    bench.add_argument("-r", "--repetitions", type=positive_int, default=5, help="runs of each, of which the median")
    bench.add_argument("--batch", type=batch_sizes,
                       help="batch sizes, e.g. 1,4,16,64: serve that many requests at once through the "
                            "engine (prompts of -p tokens, -n new tokens each) and report throughput")
    bench.add_argument("--plot", metavar="PNG",
                       help="save the table as a chart, this PNG (needs matplotlib): prefill, decode and "
                            "decode / bound per row; with --batch, throughput against latency")
    bench.add_argument("--timeline", metavar="PNG",
                       help="with --pp: then prefill max(micro-batches, pp) prompts of -p tokens once more and draw each "
                            "device's compute and transfers as a Gantt chart (needs matplotlib), with the pipeline bubble")
    add_parallel_arguments(bench)
    bench.set_defaults(run=cmd_bench)

    batch = commands.add_parser("batch", help="offline batch inference: a JSONL file of requests in, results out")
    add_model_arguments(batch)
    add_parallel_arguments(batch)
    add_sampling_arguments(batch, temperature=1.0)
    batch.add_argument("input", help='JSONL, one request per line: {"prompt": ...} or {"messages": [...]}, '
                                     'optional "id" and sampling settings such as "max_tokens"')
    batch.add_argument("--out", required=True, help="JSONL results, in input order; lines already there are skipped")
    batch.add_argument("--max-num-seqs", type=positive_int, default=16, help="requests served together at most")
    batch.set_defaults(run=cmd_batch)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server, with a chat page at / "
                                              '(needs pip install "tinyinfer[serve]")')
    add_model_arguments(serve, threads=False)
    serve.add_argument("--threads", type=parse_threads,
                       help="CPU threads for the kernels, or auto (the cores other programs leave free); default: "
                            "every core but one, left to the HTTP side (the server's event loop, and clients on this "
                            "machine): a kernel's threads all wait for the one that shares its core")
    add_parallel_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on; anything but loopback needs --api-key or --insecure")
    serve.add_argument("--port", type=port_number, default=8000, help="the TCP port")
    serve.add_argument("--api-key", type=non_empty,
                       help="the key /v1/... requires as `Authorization: Bearer KEY` (default: the TINYINFER_API_KEY "
                            "environment variable; none: no key)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a --host other than loopback without an API key")
    serve.add_argument("--served-model-name", type=non_empty,
                       help="the name clients pass as model (default: the model's, e.g. bard)")
    serve.add_argument("--max-num-seqs", type=positive_int, default=16, help="requests in one forward pass at most")
    serve.add_argument("--max-waiting", type=positive_int, default=256,
                       help="requests waiting for their first token at most; past it, 503 with Retry-After")
    serve.add_argument("--chunk-interval", type=number_where(lambda v: 0 <= v < 10, "seconds from 0 to 10"),
                       default=0.02, help="how often, in seconds, the tokens held back go out, each stream's as one "
                                          "chunk (the first text and the last token at once); 0 sends each alone")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (info logs each request)")
    serve.set_defaults(run=cmd_serve)

    plan = commands.add_parser("plan", help="what each device of a tp x pp layout holds and sends, and a step's "
                                            "modelled time (from the config alone)")
    plan.add_argument("model", nargs="?", help="a model directory, its config.json, or a llama2.c .bin "
                                                "(default: the bundled model, bard)")
    plan.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel devices")
    plan.add_argument("--pp", type=positive_int, default=1, help="pipeline stages")
    plan.add_argument("--dp", type=positive_int, default=1, help="data-parallel replicas")
    plan.add_argument("--pp-layers", type=parse_layer_counts, help="layers of each stage, e.g. 6,6")
    plan.add_argument("--link", default="nvlink", choices=sorted(LINKS), help="the link between devices")
    plan.add_argument("--device", default="h100", choices=sorted(ROOFLINES) + ["this-machine"],
                      help="each device's roofline (this-machine: measured here)")
    plan.add_argument("--weights", choices=WEIGHT_FORMATS, help="weight storage (default: the compute dtype)")
    plan.add_argument("--dtype", default="float32", choices=list(COMPUTE_DTYPES), help="compute dtype")
    plan.add_argument("--prompt-tokens", type=positive_int, default=512, help="the prefill to model")
    plan.add_argument("--batch", type=positive_int, default=1, help="sequences in the decode step to model")
    plan.add_argument("--context", type=non_negative_int, default=512,
                      help="tokens each decoding sequence already holds")
    plan.add_argument("--micro-batches", type=positive_int, help="micro-batches of the decode step (default: --pp)")
    plan.set_defaults(run=cmd_plan)

    evaluate = commands.add_parser("eval", help="perplexity of a text file (mean next-token loss)")
    add_model_arguments(evaluate)
    add_parallel_arguments(evaluate, data_parallel=False)
    evaluate.add_argument("file", help="a UTF-8 text file")
    evaluate.add_argument("--context", type=int_at_least(2),
                          help="window length in tokens (default: the model's context)")
    evaluate.add_argument("--chunks", type=positive_int, help="score only the first N windows (default: all)")
    evaluate.set_defaults(run=cmd_eval)
    return parser


# What a user's mistake or a missing optional dependency raises: said in one line, exit status
# 2, no traceback. The library's own errors (each message says what to do), then the kinds they
# derive from, which the standard library raises too: OSError for a file that is not there,
# ImportError for CuPy or mpi4py not installed (its message says what to pip install).
USER_ERRORS = (CheckpointError, ContextLengthError, KVCacheTooSmallError, ParallelConfigError, ParallelError,
               ImportError, OSError, ValueError, RuntimeError)
STDOUT_CLOSED = 128 + 13  # the status a shell reports for a program ended by SIGPIPE (13), as `yes | head -1`'s yes


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows up here at the latest, not as Python exits
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except TokenizerMissingError:
        return error(tokenizer_advice(args.command))
    except USER_ERRORS as e:
        return error(describe(e))
    return code or 0


def error(message: str) -> int:
    print(f"tinyinfer: error: {message}", file=sys.stderr)
    return 2


def describe(e: BaseException) -> str:
    """An error as one line, in the user's words: a file's error names the file first."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def tokenizer_advice(command: str) -> str:
    """A missing tokenizer, in the command line's terms (the library's message speaks of
    tinyinfer.load's tokenizer=PATH)."""
    ways = {"generate": ", or give token ids with --prompt-ids 1,2,3",
            "batch": ', or give each prompt as token ids: {"prompt": [1, 2, 3]}'}
    return ("this model has no tokenizer, so it cannot read or write text: pass one with --tokenizer PATH "
            f"(a tokenizer.json, or a llama2.c tokenizer.bin){ways.get(command, '')}")


def stdout_closed() -> int:
    """The reader of our output has gone (`tinyinfer generate ... | head -1`): stop quietly, as
    Unix tools do, with the status of a program that SIGPIPE ended (141: under `set -o
    pipefail` a script sees that the output was cut short, as it would for cat or yes).
    Python would report the closed pipe once more when it flushes stdout at exit, so stdout
    is pointed at /dev/null first (the Python docs' "Note on SIGPIPE", in the signal module)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (captured, in a test): nothing to flush at exit
        pass
    return STDOUT_CLOSED


if __name__ == "__main__":
    sys.exit(main())
