"""Print samples from a trained run's latest checkpoint: continuations (GPT) or translations (Transformer).

    python scripts/sample.py outputs/gpt-bytes --prompt "def " --temperature 0.8 --top_k 40 --num_samples 3
    python scripts/sample.py outputs/transformer-numbers_en_fr --prompt "three hundred and twelve" --beam_size 4

The run's composed config (`<run_dir>/.hydra/config.yaml`) rebuilds the data (for its tokenizer) and the model;
the weights come from `<run_dir>/checkpoints`. Runs imported by scripts/convert.py (GPT-2, Mamba) sample alike:

    python scripts/sample.py runs/gpt2 --prompt "The meaning of life is" --temperature 0.8 --top_k 40
"""

import argparse
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from models.gpt import generate
from models.mamba import MambaLM
from models.mamba import generate as mamba_generate

from train import config as _config  # noqa: F401  (registers the config resolvers)
from train import loop, pretrained


def load(run_dir: Path):
    """(run config, dataset for its tokenizer, eval-mode model of the newest checkpoint); one-line errors."""
    try:
        cfg, model = pretrained.load_model(run_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return cfg, loop.build(cfg.data), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", default="", help="text to continue (GPT) or to translate (Transformer)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: up to the model's max_len")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--beam_size", type=int, default=1, help="translation: 1 is greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg, dataset, model = load(args.run_dir)
    tokenizer = dataset.tokenizer
    if dataset.task == "seq2seq":
        from models.transformer import beam_search, greedy_decode

        ids = tokenizer.encode(args.prompt)[:model.src_len]
        src = np.zeros((1, model.src_len), np.int32)
        src[0, :len(ids)] = ids
        out = greedy_decode(model, src) if args.beam_size == 1 else beam_search(model, src, args.beam_size)
        print(dataset.detokenize(np.asarray(out[0])))
        return
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        prompt = np.array([tokenizer.encode("\n")[0]])  # an empty prompt starts at a line break
    prompts = np.tile(prompt, (args.num_samples, 1))
    if isinstance(model, MambaLM):  # recurrent mode: no length limit but the one asked for
        max_new = args.max_new_tokens or 256
        new = nnx.jit(mamba_generate, static_argnums=(2, 4))(model, prompts, max_new, jax.random.key(args.seed),
                                                              args.temperature)
        tokens = np.concatenate([prompts, np.asarray(new)], axis=1)
    else:
        max_new = args.max_new_tokens or model.max_len - len(prompt)
        tokens = generate(model, prompts, max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          rng=jax.random.key(args.seed))
    for i, row in enumerate(np.asarray(tokens)):
        print(f"---- sample {i} ----\n{dataset.detokenize(row)}")


if __name__ == "__main__":
    main()
