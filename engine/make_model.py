"""Write a tiny qwen2 GGUF model with random weights and the real Qwen2.5 tokenizer.

The model gives llama.cpp's server something to run in tests. It generates
token ids of the real Qwen2.5 vocabulary at hundreds of tokens per second on
a CPU, so prompt and completion token counts match what the runner's
tokenizer computes. Its text is noise.

Usage: python engine/make_model.py OUTPUT [--tokenizer DIR] [--seed N]
       [--hidden N] [--layers N] [--heads N] [--kv-heads N] [--ffn N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "runner" / "tokenizers" / "qwen2.5"

# Values of Qwen2.5's config.json; they affect only numerics, never token ids.
ROPE_FREQ_BASE = 1_000_000.0
RMS_NORM_EPS = 1e-6
CONTEXT_LENGTH = 32_768
# Standard deviation of the random weights: small enough that activations
# stay finite through the layers, large enough that the output is not one
# repeated token.
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    """Model dimensions; hidden must be a multiple of 32 (the Q8_0 block size) and of heads."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128

    def __post_init__(self) -> None:
        if self.hidden % 32 or self.ffn % 32:
            raise ValueError(f"--hidden and --ffn must be multiples of 32, got {self.hidden} and {self.ffn}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden must be a multiple of --heads, got {self.hidden} and {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads must be a multiple of --kv-heads, got {self.heads} and {self.kv_heads}")

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


@dataclass(frozen=True)
class Vocabulary:
    """Qwen2.5 byte-level BPE vocabulary in the form GGUF stores it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eos_id: int
    pad_id: int
    chat_template: str


def load_vocabulary(tokenizer_dir: Path) -> Vocabulary:
    """Read vocab, merges, special tokens and chat template from a Hugging Face tokenizer folder."""
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))

    by_id: dict[int, tuple[str, int]] = {}
    for text, token_id in tokenizer["model"]["vocab"].items():
        by_id[token_id] = (text, gguf.TokenType.NORMAL)
    # Special added tokens (<|im_start|>, <|endoftext|>) are control tokens, which
    # llama.cpp leaves out of generated text. The others (<tool_call>) are
    # user-defined: matched whole in input, printed as text in output.
    for added in tokenizer["added_tokens"]:
        token_type = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], token_type)

    size = max(by_id) + 1
    if len(by_id) != size:
        raise ValueError(f"{tokenizer_dir}/tokenizer.json has gaps in its token ids (max id {size - 1}, {len(by_id)} tokens)")
    ids = {text: token_id for token_id, (text, _) in by_id.items()}

    # tokenizers writes merges either as "a b" strings or as [a, b] pairs.
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in tokenizer["model"]["merges"]]

    eos_text = config["eos_token"]
    pad_text = config.get("pad_token") or eos_text
    return Vocabulary(
        tokens=[by_id[i][0] for i in range(size)],
        token_types=[int(by_id[i][1]) for i in range(size)],
        merges=merges,
        eos_id=ids[eos_text],
        pad_id=ids[pad_text],
        chat_template=config["chat_template"],
    )


def random_matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.standard_normal((rows, cols), dtype=np.float32) * WEIGHT_STD).astype(np.float32)


def add_matrix(writer: gguf.GGUFWriter, name: str, matrix: np.ndarray) -> None:
    """Add a 2-D weight in Q8_0; numpy shape is (output features, input features)."""
    writer.add_tensor(name, gguf.quants.quantize(matrix, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def write_model(output: Path, vocab: Vocabulary, shape: Shape, seed: int) -> None:
    """Write the GGUF file: metadata, tokenizer and seeded random weights."""
    rng = np.random.default_rng(seed)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]
    # Write to a temporary name first so an interrupted run leaves no
    # truncated model that a later `make engine` would take as done.
    partial = output.with_name(output.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)

    writer.add_name(f"tiny-qwen2-random-h{shape.hidden}-l{shape.layers}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)

    # "gpt2" is GGUF's name for byte-level BPE and "qwen2" selects Qwen2's
    # pre-tokenizer regex, as llama.cpp's own converter writes for Qwen2.5.
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    # Qwen2.5 has no BOS token in its prompts (tokenizer_config add_bos_token=false).
    writer.add_bos_token_id(vocab.pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(vocab.chat_template)

    n_vocab = len(vocab.tokens)
    add_matrix(writer, "token_embd.weight", random_matrix(rng, n_vocab, shape.hidden))
    writer.add_tensor("output_norm.weight", np.ones(shape.hidden, dtype=np.float32))
    # A separate output head: with the head tied to the embeddings a random
    # model scores the last input token highest and repeats it forever.
    add_matrix(writer, "output.weight", random_matrix(rng, n_vocab, shape.hidden))

    for layer in range(shape.layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(shape.hidden, dtype=np.float32))
        add_matrix(writer, f"{prefix}.attn_q.weight", random_matrix(rng, shape.hidden, shape.hidden))
        add_matrix(writer, f"{prefix}.attn_k.weight", random_matrix(rng, shape.kv_dim, shape.hidden))
        add_matrix(writer, f"{prefix}.attn_v.weight", random_matrix(rng, shape.kv_dim, shape.hidden))
        # Qwen2 has biases on q, k and v (and only there).
        writer.add_tensor(f"{prefix}.attn_q.bias", np.zeros(shape.hidden, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_k.bias", np.zeros(shape.kv_dim, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_v.bias", np.zeros(shape.kv_dim, dtype=np.float32))
        add_matrix(writer, f"{prefix}.attn_output.weight", random_matrix(rng, shape.hidden, shape.hidden))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(shape.hidden, dtype=np.float32))
        add_matrix(writer, f"{prefix}.ffn_gate.weight", random_matrix(rng, shape.ffn, shape.hidden))
        add_matrix(writer, f"{prefix}.ffn_up.weight", random_matrix(rng, shape.ffn, shape.hidden))
        add_matrix(writer, f"{prefix}.ffn_down.weight", random_matrix(rng, shape.hidden, shape.ffn))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(output)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight qwen2 GGUF with the Qwen2.5 tokenizer.")
    parser.add_argument("output", type=Path, help="GGUF file to write")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="folder with tokenizer.json and tokenizer_config.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--hidden", type=int, default=Shape.hidden, help="embedding width")
    parser.add_argument("--layers", type=int, default=Shape.layers, help="number of transformer blocks")
    parser.add_argument("--heads", type=int, default=Shape.heads, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=Shape.kv_heads, help="key/value heads (grouped-query attention)")
    parser.add_argument("--ffn", type=int, default=Shape.ffn, help="feed-forward width")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # gguf logs its writing steps at INFO.
    logging.getLogger("gguf").setLevel(logging.WARNING)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        shape = Shape(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn)
        vocab = load_vocabulary(args.tokenizer)
    except (OSError, KeyError, ValueError) as error:
        logger.error("make_model: %s", error)
        return 1

    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_model(args.output, vocab, shape, args.seed)
    logger.info("make_model: wrote %s (%.1f MB, %d tokens)", args.output, args.output.stat().st_size / 1e6, len(vocab.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
