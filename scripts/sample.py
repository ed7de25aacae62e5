"""Print samples from a trained run's latest checkpoint: continuations (GPT) or translations (Transformer).

    python scripts/sample.py outputs/gpt-bytes --prompt "def " --temperature 0.8 --top_k 40 --num_samples 3
    python scripts/sample.py outputs/transformer-numbers_en_fr --prompt "three hundred and twelve" --beam_size 4

The run's composed config (`<run_dir>/.hydra/config.yaml`) rebuilds the data (for its tokenizer) and the model;
the state comes from `<run_dir>/checkpoints`.
"""

import argparse
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf

from train import config as _config  # noqa: F401  (registers the config resolvers)
from train import loop
from train.checkpoint import Checkpoints


def load(run_dir: Path):
    """(experiment, eval-mode model) of the newest checkpoint in `run_dir`; one-line errors when absent."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.exists():
        raise SystemExit(f"error: {config_file} not found: {run_dir} is not a training run directory")
    exp = loop.setup(OmegaConf.load(config_file), run_dir)
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=exp.cfg.checkpoint.keep, async_save=False)
    if not checkpoints.steps():
        raise SystemExit(f"error: no checkpoint in {checkpoints.directory}")
    state, _ = checkpoints.restore(checkpoints.steps()[-1], exp.abstract_state)
    checkpoints.close()
    return exp, loop.eval_model(exp, state)


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

    exp, model = load(args.run_dir)
    tokenizer = exp.dataset.tokenizer
    if exp.task == "seq2seq":
        from models.transformer import beam_search, greedy_decode

        ids = tokenizer.encode(args.prompt)[:model.src_len]
        src = np.zeros((1, model.src_len), np.int32)
        src[0, :len(ids)] = ids
        out = greedy_decode(model, src) if args.beam_size == 1 else beam_search(model, src, args.beam_size)
        print(exp.dataset.detokenize(np.asarray(out[0])))
        return
    from models.gpt import generate

    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        prompt = np.array([tokenizer.encode("\n")[0]])  # an empty prompt starts at a line break
    max_new = args.max_new_tokens or model.max_len - len(prompt)
    tokens = generate(model, np.tile(prompt, (args.num_samples, 1)), max_new, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, rng=jax.random.key(args.seed))
    for i, row in enumerate(np.asarray(tokens)):
        print(f"---- sample {i} ----\n{exp.dataset.detokenize(row)}")


if __name__ == "__main__":
    main()
