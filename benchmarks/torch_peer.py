"""The PyTorch peer of `tinyinfer bench`: the same random model in transformers, run eagerly.

What a GPU decode of this model costs in the framework most people would reach for: a
transformers LlamaForCausalLM with exactly the weights of tinyinfer.bench.random_model(shape)
(copied in, float32, on CUDA), run in PyTorch's eager mode (no torch.compile, no CUDA graphs;
attention by `--attention`, transformers' default sdpa). It prints one row in the columns of
`tinyinfer bench --backend cupy`:

- pp128: one forward pass over a prompt of 128 random tokens, prompt tokens per second;
- tg128: after that prompt, 128 greedy decode steps of one token each through the KV cache
  (the next token is the argmax of the last logits), tokens per second;
- each the median of `-r` runs after a warm-up, timed with torch.cuda.synchronize() on both sides;
- the decode bound: the weight bytes one token reads (tinyinfer's count: every matrix once, one
  row of the embedding) against the GPU's bandwidth by a device-to-device copy (2 x bytes /
  seconds, best of 10, as kernels/gpu_bandwidth.py measures it, here with torch's copy).

PyTorch and transformers are not dependencies of tinyinfer: where they are missing this says
so in one line and exits with status 2.

    python3 benchmarks/torch_peer.py --random stories110M
    python3 benchmarks/torch_peer.py --random llama-3.2-1B -r 3
"""

import argparse
import inspect
import statistics
import sys
import time

import numpy as np

from tinyinfer.bench import RANDOM_SHAPES, random_model

MISSING = ("torch_peer.py: PyTorch and transformers are not installed (they are not tinyinfer dependencies): "
           "pip install torch transformers")


def import_torch():
    """(torch, transformers), or exit with one line that says what is missing."""
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"{MISSING} ({e})", file=sys.stderr)
        raise SystemExit(2) from None
    return torch, transformers


def hf_config(config, transformers, attention: str = "sdpa"):
    """A transformers LlamaConfig of tinyinfer's ModelConfig (rope_theta is read by transformers
    4 as it is, and turned into rope_parameters by transformers 5)."""
    return transformers.LlamaConfig(attn_implementation=attention,
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_context, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )


def hf_arrays(weights, tied: bool) -> dict:
    """transformers' parameter names -> tinyinfer's float32 arrays (a tied LM head is the
    embedding, which transformers lists once)."""
    arrays = {"model.embed_tokens.weight": weights.embedding, "model.norm.weight": weights.final_norm}
    if not tied:
        arrays["lm_head.weight"] = weights.lm_head
    for i, layer in enumerate(weights.layers):
        prefix = f"model.layers.{i}."
        arrays |= {
            prefix + "input_layernorm.weight": layer.attention_norm,
            prefix + "self_attn.q_proj.weight": layer.wq, prefix + "self_attn.k_proj.weight": layer.wk,
            prefix + "self_attn.v_proj.weight": layer.wv, prefix + "self_attn.o_proj.weight": layer.wo,
            prefix + "post_attention_layernorm.weight": layer.mlp_norm,
            prefix + "mlp.gate_proj.weight": layer.w_gate, prefix + "mlp.up_proj.weight": layer.w_up,
            prefix + "mlp.down_proj.weight": layer.w_down,
        }
    return arrays


def hf_model(config, weights, torch, transformers, device: str = "cuda", attention: str = "sdpa"):
    """LlamaForCausalLM in float32 on `device`, holding exactly tinyinfer's weights: built on the
    device (its own random initialisation is fast there), then every parameter copied over."""
    torch.set_default_dtype(torch.float32)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config(config, transformers, attention))
    arrays = hf_arrays(weights, config.tie_word_embeddings)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name not in arrays:
                raise KeyError(f"transformers has a parameter {name} that tinyinfer's weights do not")
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(arrays.pop(name), dtype=np.float32)))
    if arrays:
        raise KeyError(f"tinyinfer weights that transformers has no parameter for: {sorted(arrays)[:3]}")
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("transformers did not tie the LM head to the embedding")
    return model.eval()


def synchronize(torch, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_keyword(model) -> str:
    """What the forward pass calls its KV cache: `past_key_values` until transformers 5.24,
    `cache` since (the output's field has the same name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def time_run(model, torch, prompt, new_tokens: int, device: str) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one prompt and new_tokens greedy steps after it."""
    keyword = cache_keyword(model)
    with torch.inference_mode():
        synchronize(torch, device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        synchronize(torch, device)
        prefill = time.perf_counter() - start
        cache, token = getattr(out, keyword), out.logits[:, -1:].argmax(-1)
        synchronize(torch, device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            cache, token = getattr(out, keyword), out.logits[:, -1:].argmax(-1)
        synchronize(torch, device)
        return prefill, time.perf_counter() - start


def copy_bandwidth(torch, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (less when memory is short), 2 x bytes /
    seconds, best of `repeats` after a warm-up, timed by CUDA events: kernels/gpu_bandwidth.py's
    probe, with torch's copy."""
    free, _ = torch.cuda.mem_get_info()
    nbytes = max(16 * 2**20, min(nbytes, free // 4)) // 16 * 16
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def memory_bound(torch, device: str) -> tuple[float, str]:
    """(bytes/s, where from): the GPU's copy bandwidth, or on the CPU tinyinfer's read probe."""
    if device.startswith("cuda"):
        return copy_bandwidth(torch), f"GPU copy (torch), {torch.cuda.get_device_name()}"
    from tinyinfer.kernels.bandwidth import read_bandwidth

    return read_bandwidth(), "CPU read"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", default="stories110M", choices=sorted(RANDOM_SHAPES), help="the model's shape")
    parser.add_argument("-p", "--prompt-tokens", type=int, default=128)
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="runs, of which the median")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu to try it without a GPU")
    parser.add_argument("--header", action=argparse.BooleanOptionalAction, default=True, help="print the table's header")
    args = parser.parse_args(argv)
    torch, transformers = import_torch()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("torch_peer.py: this PyTorch sees no CUDA GPU (give --device cpu to run it on the CPU)", file=sys.stderr)
        return 2

    config, weights = random_model(args.random)
    model = hf_model(config, weights, torch, transformers, args.device, args.attention)
    bytes_per_token = weights.decode_read_bytes
    del weights
    generator = torch.Generator().manual_seed(0)

    def prompt():
        return torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=generator).to(args.device)

    time_run(model, torch, prompt(), 4, args.device)  # warm-up: cuBLAS handles, kernels' first loads
    runs = [time_run(model, torch, prompt(), args.new_tokens, args.device) for _ in range(args.repetitions)]
    prefill = statistics.median(args.prompt_tokens / p for p, _ in runs)
    decode = statistics.median(args.new_tokens / d for _, d in runs)
    bandwidth, source = memory_bound(torch, args.device)
    bound = bandwidth / bytes_per_token
    if args.header:
        print(f"| model | backend | weights | pp{args.prompt_tokens} tok/s | tg{args.new_tokens} tok/s | "
              "weights read/token | bandwidth | bound from | CUDA graphs | decode bound tok/s | tg / bound |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    print(f"| random {args.random} | torch {torch.__version__} eager ({args.attention}), transformers "
          f"{transformers.__version__} | float32 | {prefill:.1f} | {decode:.1f} | {bytes_per_token / 1e6:.1f} MB | "
          f"{bandwidth / 1e9:.1f} GB/s | {source} | off | {bound:.1f} | {decode / bound:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
