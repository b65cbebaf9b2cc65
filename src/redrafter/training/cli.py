"""``redrafter datagen`` and ``redrafter train`` argument parsing."""

from __future__ import annotations

import argparse
import json


def add_datagen_parser(subparsers) -> None:
    from redrafter.models.loading import add_backend_arguments

    p = subparsers.add_parser("datagen", help="the target answers real prompts: drafter training data")
    p.add_argument("--model", default=None, help="model spec (default: smollm2-135m-instruct)")
    p.add_argument("--dataset", default="sharegpt", help="sharegpt, chitchat, or a prompts file")
    p.add_argument("--out", required=True)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy answers")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=64, help="prompts per shard (the unit of resumption)")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    add_backend_arguments(p)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answers", choices=("model", "dataset"), default="model",
                   help="model: the target writes the answers (self-distillation); dataset: keep the dataset's own")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_datagen_command)


def run_datagen_command(args: argparse.Namespace) -> int:
    import torch

    from redrafter.models.loading import DEFAULT_MODEL
    from redrafter.training.datagen import run_datagen

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run_datagen(model_spec=args.model or DEFAULT_MODEL, dataset=args.dataset, out=args.out,
                          num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, batch_size=args.batch_size, shard_size=args.shard_size,
                          dtype=args.dtype, device=args.device, backend=args.backend,
                          max_prompt_tokens=args.max_prompt_tokens,
                          seed=args.seed, answers=args.answers, progress=not args.no_progress, compile=args.compile,
                          weights=args.weights)
    print(json.dumps(summary))
    return 0


def add_train_parser(subparsers) -> None:
    from redrafter.models.loading import add_backend_arguments
    from redrafter.training.train import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("train", help="train a drafter for a model on datagen output")
    p.add_argument("--model", default=None, help="model spec (default: smollm2-135m-instruct)")
    p.add_argument("--data", required=True, nargs="+", help="datagen output directories; the held-out split comes from the first")
    p.add_argument("--out", required=True)
    p.add_argument("--draft-vocab-size", type=int, default=d.draft_vocab_size,
                   help="V_d most frequent tokens (0 = the full vocabulary)")
    p.add_argument("--exit-dim", type=int, default=None, help="residual width (default 2H, the reference)")
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--predict-tokens", type=int, default=d.predict_tokens,
                   help="drafted tokens trained per position; L-1 suits beams of length L (the drafter "
                        "shares its weights across steps, so deeper steps take capacity; docs/TRAINING.md, v8)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=float, default=d.warmup, help="fraction of steps")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight,
                   help="α: loss = (1-α) CE to the target's tokens + α KL to its distribution (0 = tokens only)")
    p.add_argument("--kl-top-k", type=int, default=d.kl_top_k,
                   help="KL to the target's k most likely draft tokens, renormalised (0 = all of the draft vocabulary)")
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default=d.mixed_precision,
                   help="bf16: the drafter's products in bfloat16 under autocast, weights and optimizer in float32 "
                        "(about 2x faster on CPUs with AVX-512-BF16/AMX and on GPUs; default no)")
    p.add_argument("--target-cache", default=None, help="safetensors file for the target's hidden states")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", default=None, metavar="DRAFTER_DIR",
                   help="start from this drafter (same shape; vocabulary rows carried over by token id) instead "
                        "of a random initialisation (with --resume the checkpoint wins)")
    p.add_argument("--keep-vocabulary", action="store_true",
                   help="with --init: keep its draft vocabulary (for fine-tuning on little data) instead of "
                        "the data's --draft-vocab-size most frequent tokens")
    add_backend_arguments(p, dtype_default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    import torch

    from redrafter.models.loading import DEFAULT_MODEL
    from redrafter.training.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(draft_vocab_size=args.draft_vocab_size or None, exit_dim=args.exit_dim,
                         num_layers=args.num_layers, predict_tokens=args.predict_tokens, epochs=args.epochs,
                         lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                         batch_tokens=args.batch_tokens, max_length=args.max_length,
                         eval_fraction=args.eval_fraction, eval_every=args.eval_every, save_every=args.save_every,
                         seed=args.seed, kl_weight=args.kl_weight, kl_top_k=args.kl_top_k,
                         mixed_precision=args.mixed_precision, keep_vocabulary=args.keep_vocabulary)
    summary = train(model_spec=args.model or DEFAULT_MODEL, data=args.data, out=args.out, config=config,
                    dtype=args.dtype, device=args.device, backend=args.backend, resume=args.resume, target_cache=args.target_cache,
                    progress=not args.no_progress, compile=args.compile, init=args.init,
                    weights=args.weights)
    print(json.dumps(summary))
    return 0
