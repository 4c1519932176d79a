"""Command-line surface of the training program, in Megatron-LM's own argument names.

Pure argparse, importable without torch. The options defined here are the ones this program
implements (`implemented_keys()`); every other Megatron-LM / upstream FlagScale argument is added
from the vocabulary data (flagscale/config/vocabulary.py) so a command line written for Megatron-LM
parses, and `refused()` names those set to something this program would not honour. The launcher
runs the same checks (`validate()`, `schedule_problems()`) before anything starts.
Every option's `dest` is its name with dashes turned into underscores, so a YAML key `foo_bar`
is exactly the option `--foo-bar`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import math
import sys
from collections.abc import Sequence
from functools import cache

from flagscale.config import layout as parallel_layout
from flagscale.config import vocabulary
from flagscale.exceptions import ConfigError
from flagscale.train.tokenizer import TOKENIZER_TYPES
from flagscale.train.tokenizer import missing_arguments as missing_tokenizer_arguments

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
MOE_DISPATCHERS = ("allgather", "alltoall")
"""Megatron-LM's dispatchers less flex (DeepEP/HybridEP kernels, CUDA only)."""
MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
_MAX_PATTERN = 100_000


def _model(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--num-layers", type=int, help="Number of transformer layers.")
    p.add_argument("--hidden-size", type=int, help="Transformer hidden size.")
    p.add_argument(
        "--ffn-hidden-size", type=int, help="MLP hidden size (default 4*hidden, or ~8/3*hidden with --swiglu)."
    )
    p.add_argument("--num-attention-heads", type=int, help="Number of attention heads.")
    p.add_argument("--group-query-attention", action="store_true", help="Use grouped-query attention.")
    p.add_argument("--num-query-groups", type=int, help="Key/value head groups with --group-query-attention.")
    p.add_argument("--kv-channels", type=int, help="Head dimension (default hidden/heads).")
    p.add_argument("--seq-length", type=int, help="Training sequence length.")
    p.add_argument("--max-position-embeddings", type=int, help="Maximum positions (default --seq-length).")
    p.add_argument("--position-embedding-type", choices=("rope", "learned_absolute"), default="learned_absolute")
    p.add_argument(
        "--use-rotary-position-embeddings", action="store_true", help="Same as --position-embedding-type rope."
    )
    p.add_argument(
        "--no-position-embedding", action="store_true", help="Accepted for Megatron-LM configs that pair it with rope."
    )
    p.add_argument("--rotary-base", type=int, default=10000, help="RoPE base period.")
    p.add_argument("--rotary-percent", type=float, default=1.0, help="Fraction of the head dimension RoPE rotates.")
    p.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    p.add_argument("--norm-epsilon", type=float, default=1e-5)
    p.add_argument(
        "--apply-layernorm-1p",
        action="store_true",
        help="Zero-centred LayerNorm gamma (needs Apex's fused LayerNorm; refused at start without it).",
    )
    p.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (gated SiLU).")
    p.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    p.add_argument("--disable-bias-linear", action="store_true", help="No bias in linear layers.")
    p.add_argument("--attention-dropout", type=float, default=0.1)
    p.add_argument("--hidden-dropout", type=float, default=0.1)
    p.add_argument("--init-method-std", type=float, default=0.02)
    p.add_argument("--vocab-size", type=int, help="Vocabulary size for --tokenizer-type NullTokenizer.")
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this (times TP).",
    )
    p.add_argument("--use-mcore-models", action="store_true", help="Always on here (Megatron-Core GPTModel).")
    p.add_argument("--attention-softmax-in-fp32", action="store_true")
    p.add_argument("--no-masked-softmax-fusion", action="store_true")
    p.add_argument("--no-bias-gelu-fusion", action="store_true")
    p.add_argument("--no-bias-swiglu-fusion", action="store_true")
    p.add_argument("--no-bias-dropout-fusion", action="store_true")
    p.add_argument("--no-rope-fusion", action="store_true")
    p.add_argument("--no-gradient-accumulation-fusion", action="store_true")
    p.add_argument("--qk-layernorm", action="store_true", help="Normalise queries and keys.")
    p.add_argument("--multiple-of", type=int, help="Upstream FlagScale: SwiGLU width 2/3·4h rounded up to this.")
    p.add_argument("--hidden-dim-multiplier", type=float, help="Upstream FlagScale: scales that width first.")
    _rope_scaling(p)
    _moe(p)
    _moe_router(p)
    _moe_capacity(p)
    _mla(p)
    _mtp(p)


def _rope_scaling(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--use-rope-scaling", action="store_true", help="Llama 3.x RoPE frequency scaling.")
    p.add_argument("--rope-scaling-factor", type=float, default=8.0, help="Llama 3.x RoPE scaling factor.")
    p.add_argument(
        "--rope-type", choices=("rope", "yarn"),
        help="RoPE flavour (multi-latent attention defaults to yarn, other attention is always rope).",
    )


def _moe(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--num-experts", type=int, help="Experts per MoE layer (unset: a dense model).")
    p.add_argument("--moe-ffn-hidden-size", type=int, help="Hidden size of each expert (default ffn_hidden_size).")
    p.add_argument(
        "--moe-layer-freq", type=moe_freq_type, default=1,
        help="N: every N-th layer is MoE; or a pattern such as '[0]+[1]*26' (1 = MoE layer).",
    )
    p.add_argument("--moe-shared-expert-intermediate-size", type=int, help="Shared experts' total hidden size.")
    p.add_argument("--moe-shared-expert-gate", action="store_true", help="Gate the shared experts' output.")
    p.add_argument(
        "--moe-token-dispatcher-type", choices=MOE_DISPATCHERS, default="allgather",
        help="How tokens reach experts on other expert-parallel ranks (flex needs DeepEP/HybridEP: CUDA).",
    )
    p.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0, help="Load-balancing loss weight(s).")
    p.add_argument("--moe-z-loss-coeff", type=float, help="Router z-loss weight.")
    p.add_argument("--moe-input-jitter-eps", type=float, help="Multiplicative jitter on router inputs.")


def _moe_router(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--moe-router-topk", type=int, default=2, help="Experts each token is routed to.")
    p.add_argument("--moe-router-score-function", choices=("softmax", "sigmoid"), default="softmax")
    p.add_argument("--moe-router-pre-softmax", action="store_true", help="Softmax before top-k.")
    p.add_argument(
        "--moe-router-load-balancing-type", nargs="+", choices=MOE_LOAD_BALANCING, default="aux_loss",
        help="aux_loss (GShard), seq_aux_loss (per sequence), global_aux_loss, sinkhorn or none.",
    )
    p.add_argument("--moe-router-enable-expert-bias", action="store_true", help="Aux-loss-free expert bias.")
    p.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3, help="Expert-bias step per batch.")
    p.add_argument("--moe-router-num-groups", type=int, help="Expert groups (group-limited routing).")
    p.add_argument("--moe-router-group-topk", type=int, help="Groups each token may use.")
    p.add_argument("--moe-router-topk-scaling-factor", type=float, help="Scale of the top-k routing weights.")
    p.add_argument("--moe-router-dtype", choices=("fp32", "fp64"), help="Router computation precision.")


def _moe_capacity(p: argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--moe-expert-capacity-factor", type=float, help="Tokens an expert takes, × its fair share (unset: no drop)."
    )
    p.add_argument("--moe-pad-expert-input-to-capacity", action="store_true", help="Pad each expert to capacity.")
    p.add_argument(
        "--moe-token-drop-policy", choices=("probs", "position"), default="probs",
        help="Over capacity, drop the lowest-probability tokens or the last ones.",
    )


def _mla(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--multi-latent-attention", action="store_true", help="DeepSeek multi-latent attention.")
    p.add_argument("--q-lora-rank", type=int, help="Low-rank query projection (unset: a full projection).")
    p.add_argument("--kv-lora-rank", type=int, default=32, help="Low-rank key/value projection.")
    p.add_argument("--qk-head-dim", type=int, default=128, help="Query/key head dimension without RoPE.")
    p.add_argument("--qk-pos-emb-head-dim", type=int, default=64, help="Query/key RoPE head dimension.")
    p.add_argument("--v-head-dim", type=int, default=128, help="Value head dimension.")
    p.add_argument("--rotary-scaling-factor", type=float, default=1.0, help="YaRN scaling factor (MLA).")
    p.add_argument("--mscale", type=float, default=1.0, help="YaRN mscale (MLA).")
    p.add_argument("--mscale-all-dim", type=float, default=0.0, help="YaRN mscale_all_dim (MLA).")


def _mtp(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--mtp-num-layers", type=int, help="Multi-token prediction depth (extra future tokens).")
    p.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1, help="Weight of the mean MTP loss.")


def moe_freq_type(value: str | int) -> int | list[int]:
    """Megatron-LM's --moe-layer-freq: an int N, or a list expression such as "([1]*3+[0])*2".

    The expression is read with `ast` and only int/list literals, `+` and `*` are evaluated (no eval()).
    """
    if isinstance(value, int):
        return value
    try:
        if "[" not in value:
            return int(value)
        pattern = _list_expression(ast.parse(value.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"{value!r} is neither N nor a pattern like '[0]+[1]*3' ({err})") from None
    if not isinstance(pattern, list):
        raise argparse.ArgumentTypeError(f"{value!r} is a number, not a list pattern")
    return pattern


def _list_expression(node: ast.AST) -> int | list[int]:
    """Value of an expression of int and list literals joined by + and *."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        items = [_list_expression(item) for item in node.elts]
        if any(isinstance(item, list) for item in items):
            raise ValueError("nested lists")
        return items
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _list_expression(node.left), _list_expression(node.right)
        if isinstance(node.op, ast.Add) and type(left) is not type(right):
            raise TypeError("+ joins two lists or two numbers")
        if isinstance(node.op, ast.Mult) and isinstance(left, list) and isinstance(right, list):
            raise TypeError("* repeats a list a number of times")
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(left, list) or isinstance(right, list):
            items, times = (left, right) if isinstance(left, list) else (right, left)
            if len(items) * max(times, 0) > _MAX_PATTERN:
                raise ValueError(f"more than {_MAX_PATTERN} layers")
        return left * right
    raise ValueError(f"unsupported {type(node).__name__}")


def _parallel(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument(
        "--virtual-pipeline-model-parallel-size",
        type=int,
        help="Model chunks per pipeline rank (interleaved schedule).",
    )
    p.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        help="Alternative to --virtual-pipeline-model-parallel-size.",
    )
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1, help="Ranks the experts are split over.")
    p.add_argument(
        "--expert-tensor-parallel-size", type=int, help="Tensor parallel size of the experts (default: tp)."
    )
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, help="Layers on the first pipeline stage.")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, help="Layers on the last pipeline stage.")
    p.add_argument(
        "--sequence-parallel", action="store_true", help="Split norm/dropout activations by sequence over tp ranks."
    )
    p.add_argument(
        "--use-distributed-optimizer", action="store_true", help="Shard optimizer state over data parallel ranks."
    )
    p.add_argument("--overlap-grad-reduce", action="store_true")
    p.add_argument("--overlap-param-gather", action="store_true")
    p.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    p.add_argument("--distributed-backend", choices=("nccl", "gloo"), help="Default: nccl on CUDA, gloo on CPU.")
    p.add_argument("--distributed-timeout-minutes", type=int, default=10)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="FlagScale: where to train (auto = CUDA when present).",
    )


def _training(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, help="Default: micro batch × data parallel size.")
    p.add_argument("--train-iters", type=int)
    p.add_argument("--train-samples", type=int, help="Alternative to --train-iters (samples / global batch).")
    p.add_argument("--exit-interval", type=int, help="Stop (after saving) when iteration %% N == 0.")
    p.add_argument("--exit-duration-in-mins", type=float, help="Stop (after saving) after this many minutes.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--recompute-granularity", choices=("full", "selective"))
    p.add_argument("--recompute-method", choices=("uniform", "block"))
    p.add_argument("--recompute-num-layers", type=int)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    p.add_argument("--min-loss-scale", type=float, default=1.0)
    p.add_argument("--loss-scale", type=float, help="Static loss scale (fp16).")
    p.add_argument("--loss-scale-window", type=int, default=1000)
    p.add_argument("--hysteresis", type=int, default=2)


def _optimizer(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, help="Peak learning rate.")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="linear")
    p.add_argument("--lr-warmup-iters", type=int, default=0)
    p.add_argument("--lr-warmup-samples", type=int, default=0)
    p.add_argument("--lr-warmup-fraction", type=float, help="Warm-up as a fraction of the decay iterations.")
    p.add_argument("--lr-decay-iters", type=int, help="Default: --train-iters.")
    p.add_argument("--lr-decay-samples", type=int)
    p.add_argument("--lr-wsd-decay-style", choices=("exponential", "linear", "cosine"), default="exponential")
    p.add_argument("--lr-wsd-decay-iters", type=int)
    p.add_argument("--lr-wsd-decay-samples", type=int, help="Alternative to --lr-wsd-decay-iters.")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--start-weight-decay", type=float)
    p.add_argument("--end-weight-decay", type=float)
    p.add_argument("--weight-decay-incr-style", choices=("constant", "linear", "cosine"), default="constant")
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--sgd-momentum", type=float, default=0.9)
    p.add_argument("--clip-grad", type=float, default=1.0, help="Gradient-norm clip (0 disables).")
    p.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="On resume the command line's LR schedule wins (the default here unless the next option is set).",
    )
    p.add_argument(
        "--use-checkpoint-opt-param-scheduler", action="store_true", help="On resume the checkpoint's LR schedule wins."
    )


def _checkpoint(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--save", help="Checkpoint directory to save to.")
    p.add_argument("--load", help="Checkpoint directory to resume from (missing = start fresh).")
    p.add_argument("--save-interval", type=int, help="Save every N iterations (and always at the end).")
    p.add_argument(
        "--ckpt-format", choices=("torch_dist", "torch"), default="torch_dist",
        help="torch_dist (resharding) or torch (Megatron-LM's legacy per-rank files; same tp/pp to resume).",
    )
    p.add_argument("--no-save-optim", action="store_true")
    p.add_argument("--no-save-rng", action="store_true")
    p.add_argument("--no-load-optim", action="store_true")
    p.add_argument("--no-load-rng", action="store_true")
    p.add_argument("--finetune", action="store_true", help="Load weights only; restart at iteration 0.")
    p.add_argument("--ckpt-step", type=int, help="Load this iteration instead of the latest.")
    p.add_argument("--exit-on-missing-checkpoint", action="store_true")


def _data(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--data-path", nargs="*", help="Prefixes, or a blend 'W1 P1 W2 P2 ...'.")
    p.add_argument("--split", default="969,30,1", help="train,valid,test weights.")
    p.add_argument("--data-cache-path", help="Where dataset index caches go.")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes.")
    p.add_argument("--mock-data", action="store_true", help="Random tokens instead of --data-path.")
    p.add_argument("--no-mmap-bin-files", action="store_true", help="Read .bin files instead of memory-mapping them.")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", help="HuggingFaceTokenizer: a tokenizer folder; SentencePiece types: a .model.")
    p.add_argument("--tokenizer-path", help="HFTokenizerFS and other *FS types: a tokenizer folder or tokenizer.json.")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer, AquilaTokenizerFS: GPT-2 style vocab.json.")
    p.add_argument("--merge-file", help="GPT2BPETokenizer, AquilaTokenizerFS: BPE merges.txt.")
    p.add_argument("--special-tokens-file", help="AquilaTokenizerFS: special tokens, one per line.")
    p.add_argument("--vocab-extra-ids", type=int, default=0, help="SentencePieceTokenizer: <extra_id_N> sentinels.")
    p.add_argument("--reset-position-ids", action="store_true")
    p.add_argument("--reset-attention-mask", action="store_true")
    p.add_argument("--eod-mask-loss", action="store_true")


def _logging(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--eval-interval", type=int, default=1000)
    p.add_argument("--eval-iters", type=int, default=100)
    p.add_argument("--tensorboard-dir", help="Default: <metrics-dir>/tensorboard.")
    p.add_argument("--tensorboard-log-interval", type=int, default=1)
    p.add_argument("--log-throughput", action="store_true", help="Always on here (tokens/s in every log line).")
    p.add_argument("--metrics-dir", help="FlagScale: write metrics.jsonl, TensorBoard events and loss_curve.png here.")


_GROUPS = (
    ("model", _model),
    ("parallelism", _parallel),
    ("training", _training),
    ("optimizer and learning rate", _optimizer),
    ("checkpointing", _checkpoint),
    ("data and tokenizer", _data),
    ("logging and metrics", _logging),
)


def implemented_parser() -> argparse.ArgumentParser:
    """The options this program implements (its own help text)."""
    parser = argparse.ArgumentParser(
        prog="train_gpt.py",
        description="FlagScale GPT training on Megatron-Core (run under torchrun).",
        allow_abbrev=False,
    )
    for title, add in _GROUPS:
        add(parser.add_argument_group(title))
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole argument parser: this program's options, then the rest of Megatron-LM's vocabulary."""
    parser = implemented_parser()
    taken = set(parser._option_string_actions)
    group = parser.add_argument_group("other Megatron-LM arguments (parsed; see refused())")
    for argument in vocabulary.megatron_arguments().values():
        if not taken.intersection(argument.options):
            _add_generic(group, argument)
            taken.update(argument.options)
    return parser


def _add_generic(group: argparse._ArgumentGroup, argument: vocabulary.Argument) -> None:
    """An argument from the vocabulary data, parsed as Megatron-LM parses it."""
    options, dest = list(argument.options), argument.dest
    if argument.kind == "flag":
        group.add_argument(*options, dest=dest, action="store_true", default=bool(argument.default))
    elif argument.kind == "negated_flag":
        group.add_argument(*options, dest=dest, action="store_false", default=argument.default is not False)
    else:
        kind = {"int": int, "float": float}.get(argument.type or "", str)
        nargs = "*" if argument.kind == "list" else None
        group.add_argument(*options, dest=dest, type=kind, nargs=nargs, default=argument.default)


@cache
def implemented_keys() -> frozenset[str]:
    """The YAML keys this program implements (its own options, by option name with underscores)."""
    return frozenset(
        option[2:].replace("-", "_") for option in implemented_parser()._option_string_actions
        if option.startswith("--") and option != "--help"
    )


@cache
def implemented_choices(key: str) -> tuple[str, ...] | None:
    """The values this program implements for `key`, when it limits them (e.g. tokenizer_type)."""
    action = implemented_parser()._option_string_actions.get("--" + key.replace("_", "-"))
    return tuple(action.choices) if action is not None and action.choices else None


def known_keys() -> frozenset[str]:
    """Every YAML key the training program parses (Megatron-LM's and upstream FlagScale's names)."""
    return frozenset(vocabulary.megatron_arguments()) | implemented_keys()


def option_for_key(key: str) -> str | None:
    """`tensor_model_parallel_size` -> `--tensor-model-parallel-size`; None for an unknown key."""
    return "--" + key.replace("_", "-") if key in known_keys() else None


def refused(argv: Sequence[str], args: argparse.Namespace) -> list[str]:
    """Options on the command line that this program does not implement, set to a non-default value."""
    implemented, table = implemented_keys(), vocabulary.megatron_arguments()
    names = []
    for token in argv:
        key = vocabulary.normalize_key(token.split("=", 1)[0]) if token.startswith("--") else None
        argument = table.get(key) if key else None
        if argument is None or vocabulary.category(key, implemented) != "not_implemented":
            continue
        value = getattr(args, argument.dest, argument.default)
        if argument.kind in ("flag", "negated_flag") or value != argument.default:
            names.append(key)
    return names


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None) -> argparse.Namespace:
    """Parse, refuse what is not implemented, check and fill derived values (`checked`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    not_implemented = refused(argv, args)
    if not_implemented:
        raise ConfigError("Megatron-LM arguments not implemented by this training program yet: "
                          + ", ".join(not_implemented))
    return checked(args, world_size)


def checked(args: argparse.Namespace, world_size: int | None) -> argparse.Namespace:
    """`validate`, then `derive` (on a copy) and the checks that need derived values; the derived copy."""
    validate(args, world_size)
    derived = derive(copy.copy(args), world_size)
    problems = schedule_problems(derived)
    if problems:
        raise ConfigError("invalid training arguments:\n  - " + "\n  - ".join(problems))
    return derived


def parse_blend(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's `--data-path`: plain prefixes, or alternating `weight prefix` pairs."""
    items = list(data_path)
    if not items or not _is_number(items[0]):
        if any(_is_number(item) for item in items):
            raise ConfigError(f"data_path mixes weights and prefixes: {items}; use 'W1 P1 W2 P2 ...' or only prefixes")
        return items, None
    if len(items) % 2:
        raise ConfigError(f"data_path blend needs weight/prefix pairs, got {len(items)} items: {items}")
    weights, prefixes = items[0::2], items[1::2]
    bad = [w for w in weights if not _is_number(w) or float(w) < 0]
    if bad or any(_is_number(p) for p in prefixes):
        raise ConfigError(f"data_path blend must alternate non-negative weights and prefixes: {items}")
    return prefixes, [float(w) for w in weights]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def validate(args: argparse.Namespace, world_size: int | None) -> None:
    """Raise ConfigError listing every inconsistent setting (torch-free; the launcher calls it)."""
    problems = [
        *_model_problems(args),
        *_moe_problems(args),
        *_attention_problems(args),
        *_layout_problems(args, world_size),
        *_precision_problems(args),
        *_training_problems(args),
        *_data_problems(args),
    ]
    if problems:
        raise ConfigError("invalid training arguments:\n  - " + "\n  - ".join(problems))


def _required(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return [f"{n} is required (set --{n.replace('_', '-')})" for n in names if getattr(args, n) is None]


def _model_problems(args: argparse.Namespace) -> list[str]:
    problems = _required(args, ("num_layers", "hidden_size", "num_attention_heads", "seq_length"))
    if problems:
        return problems
    heads = args.num_attention_heads
    if args.kv_channels is None and args.hidden_size % heads:
        problems.append(
            f"hidden_size ({args.hidden_size}) is not divisible by num_attention_heads ({heads}); set kv_channels"
        )
    groups = args.num_query_groups if args.group_query_attention else None
    if groups is not None and (groups < 1 or heads % groups):
        problems.append(f"num_query_groups ({groups}) does not divide num_attention_heads ({heads})")
    if args.group_query_attention and groups is None:
        problems.append("group_query_attention needs num_query_groups")
    max_pos = args.max_position_embeddings
    if max_pos is not None and _rope(args) is False and args.seq_length > max_pos:
        problems.append(f"seq_length ({args.seq_length}) exceeds max_position_embeddings ({max_pos})")
    return problems


def _moe_problems(args: argparse.Namespace) -> list[str]:
    """What Megatron-Core's MoE layers and TransformerConfig assert, said before anything starts."""
    experts = args.num_experts or None
    if experts is None:
        return ["moe_ffn_hidden_size needs num_experts"] if args.moe_ffn_hidden_size is not None else []
    problems = [] if args.moe_router_topk <= experts else [
        f"moe_router_topk ({args.moe_router_topk}) exceeds num_experts ({experts})"
    ]
    problems += _moe_layer_freq_problems(args.moe_layer_freq, args.num_layers)
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        problems.append(f"num_experts with tensor_model_parallel_size ({args.tensor_model_parallel_size}) > 1 needs "
                        "sequence_parallel (Megatron-Core's MoE layer refuses to train without it); "
                        "or split the experts with expert_model_parallel_size instead")
    groups, group_topk = args.moe_router_num_groups, args.moe_router_group_topk
    if group_topk and not groups:
        problems.append("moe_router_group_topk needs moe_router_num_groups")
    elif group_topk and (experts % groups or group_topk > groups):
        problems.append(f"moe_router_num_groups ({groups}) must divide num_experts ({experts}) and be >= "
                        f"moe_router_group_topk ({group_topk})")
    types, coeffs = _as_list(args.moe_router_load_balancing_type), _as_list(args.moe_aux_loss_coeff)
    if len(types) > 1 and len(coeffs) != len(types):
        problems.append(f"moe_aux_loss_coeff needs one value per moe_router_load_balancing_type ({len(types)})")
    if args.moe_router_topk == 1 and args.moe_router_score_function == "softmax" and not (
        args.moe_router_pre_softmax or "sinkhorn" in types
    ):
        problems.append("moe_router_topk 1 with the softmax score function needs moe_router_pre_softmax")
    return problems


def _moe_layer_freq_problems(freq: int | list[int], num_layers: int | None) -> list[str]:
    if isinstance(freq, int):
        return [] if freq >= 1 else [f"moe_layer_freq ({freq}) must be >= 1"]
    if set(freq) - {0, 1}:
        return [f"moe_layer_freq pattern {freq} may hold only 0 (dense layer) and 1 (MoE layer)"]
    if num_layers is not None and len(freq) != num_layers:
        return [f"moe_layer_freq pattern has {len(freq)} layers, num_layers is {num_layers}"]
    return []


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _attention_problems(args: argparse.Namespace) -> list[str]:
    """Multi-latent attention, RoPE flavours and multi-token prediction."""
    problems = []
    if args.multi_latent_attention and args.group_query_attention:
        problems.append("multi_latent_attention and group_query_attention exclude each other")
    if args.rope_type == "yarn" and not args.multi_latent_attention:
        problems.append("rope_type yarn needs multi_latent_attention (other attention uses rope)")
    if args.mtp_num_layers is not None and args.mtp_num_layers < 1:
        problems.append(f"mtp_num_layers ({args.mtp_num_layers}) must be >= 1 (or unset)")
    elif args.mtp_num_layers and not _rope(args):
        problems.append("multi-token prediction (mtp_num_layers) needs position_embedding_type rope")
    return problems


def _layout_problems(args: argparse.Namespace, world_size: int | None) -> list[str]:
    """Parallel sizes, layers per pipeline stage and batch sizes: the rules the auto-tuner prunes by too."""
    return parallel_layout.problems(layout_of(args), model_shape_of(args), world_size, args.device)


def layout_of(args: argparse.Namespace) -> parallel_layout.Layout:
    """The parallel layout the arguments ask for."""
    return parallel_layout.Layout.from_values(vars(args))


def model_shape_of(args: argparse.Namespace) -> parallel_layout.ModelShape:
    """The model facts the layout rules read, with Megatron-LM's defaults for unset ones."""
    values = dict(vars(args))
    values["num_query_groups"] = args.num_query_groups if args.group_query_attention else None
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        values["ffn_hidden_size"] = _default_ffn(args)
    return parallel_layout.ModelShape.from_values(values)


def _precision_problems(args: argparse.Namespace) -> list[str]:
    return ["fp16 and bf16 are both set; choose one"] if args.fp16 and args.bf16 else []


def _training_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if (args.train_iters is None) == (args.train_samples is None):
        problems.append("set exactly one of train_iters and train_samples")
    if args.lr is None:
        problems.append("lr is required (set --lr)")
    elif args.min_lr > args.lr:
        problems.append(f"min_lr ({args.min_lr}) is larger than lr ({args.lr})")
    if args.recompute_method and args.recompute_granularity != "full":
        problems.append("recompute_method needs recompute_granularity: full")
    if args.recompute_granularity == "full" and (args.recompute_method is None or args.recompute_num_layers is None):
        problems.append("recompute_granularity full needs recompute_method and recompute_num_layers")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        problems.append("set only one of override_opt_param_scheduler and use_checkpoint_opt_param_scheduler")
    if args.save_interval is not None and args.save is None:
        problems.append("save_interval needs save (a checkpoint directory)")
    problems += [
        f"{n} must be > 0" for n in ("log_interval", "eval_interval") if getattr(args, n) <= 0
    ]
    return problems


def _data_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if not args.mock_data and not args.data_path:
        problems.append("data_path is required unless mock_data is set")
    if args.data_path:
        try:
            parse_blend(args.data_path)
        except ConfigError as err:
            problems.append(str(err))
    missing = missing_tokenizer_arguments(args)
    if missing:
        problems.append(f"tokenizer_type {args.tokenizer_type} needs {' and '.join(missing)}")
    if args.vocab_extra_ids and args.tokenizer_type != "SentencePieceTokenizer":
        problems.append(f"vocab_extra_ids applies to SentencePieceTokenizer only, not {args.tokenizer_type}")
    return problems


def _rope(args: argparse.Namespace) -> bool:
    return args.position_embedding_type == "rope" or args.use_rotary_position_embeddings


def derive(args: argparse.Namespace, world_size: int | None) -> argparse.Namespace:
    """Fill the values Megatron-LM derives from others (defaults that depend on other options)."""
    world = world_size or 1
    args.world_size = world
    args.data_parallel_size = world // (
        args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    )
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    if _rope(args):
        args.position_embedding_type = "rope"
    args.ffn_hidden_size = args.ffn_hidden_size or _default_ffn(args)
    args.kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    args.num_query_groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if args.bf16 and not getattr(args, "grad_reduce_in_bf16", False):  # Megatron-LM: bf16 reduces grads in fp32
        args.accumulate_allreduce_grads_in_fp32 = True
    _derive_moe(args)
    _derive_iters(args)
    if args.num_layers_per_virtual_pipeline_stage:
        stage_layers = args.num_layers // args.pipeline_model_parallel_size
        args.virtual_pipeline_model_parallel_size = stage_layers // args.num_layers_per_virtual_pipeline_stage
    return args


def _derive_moe(args: argparse.Namespace) -> None:
    """Megatron-LM's MoE defaults: no experts for 0, expert width and expert tp from the dense ones."""
    args.num_experts = args.num_experts or None
    if args.num_experts and args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = args.tensor_model_parallel_size
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        value = getattr(args, name)
        if isinstance(value, (list, tuple)):
            setattr(args, name, value[0] if len(value) == 1 else list(value))


def _default_ffn(args: argparse.Namespace) -> int:
    if args.swiglu and args.multiple_of:  # upstream FlagScale (Llama/Aquila): 2/3 of 4h rounded up
        width = int(4 * args.hidden_size * 2 / 3)
        if args.hidden_dim_multiplier is not None:
            width = int(width * args.hidden_dim_multiplier)
        return args.multiple_of * -(-width // args.multiple_of)
    if args.swiglu:  # Megatron-LM: 2/3 of 4h, rounded down to a multiple of 64
        return int((4 * args.hidden_size * 2 / 3) / 64) * 64 or 4 * args.hidden_size
    return 4 * args.hidden_size


def _derive_iters(args: argparse.Namespace) -> None:
    gbs = args.global_batch_size
    if args.train_iters is None:
        args.train_iters = math.ceil(args.train_samples / gbs)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = math.ceil(args.lr_decay_samples / gbs) if args.lr_decay_samples else args.train_iters
    if args.lr_warmup_fraction is not None:
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    elif args.lr_warmup_samples:
        args.lr_warmup_iters = math.ceil(args.lr_warmup_samples / gbs)
    if args.lr_wsd_decay_iters is None and args.lr_wsd_decay_samples:
        args.lr_wsd_decay_iters = math.ceil(args.lr_wsd_decay_samples / gbs)


def schedule_problems(args: argparse.Namespace) -> list[str]:
    """What Megatron-Core's OptimizerParamScheduler asserts, on derived arguments (steps = iterations)."""
    problems = []
    if args.lr_decay_iters <= 0:
        problems.append(f"lr_decay_iters ({args.lr_decay_iters}) must be > 0")
    elif args.lr_warmup_iters >= args.lr_decay_iters:
        problems.append(f"lr_warmup_iters ({args.lr_warmup_iters}) must be smaller than lr_decay_iters "
                        f"({args.lr_decay_iters}; default: train_iters): lower the warm-up or train longer")
    if args.min_lr < 0:
        problems.append(f"min_lr ({args.min_lr}) must be >= 0")
    if args.lr_decay_style == "WSD" and not (args.lr_wsd_decay_iters or args.lr_wsd_decay_samples):
        problems.append("lr_decay_style WSD needs lr_wsd_decay_iters (or lr_wsd_decay_samples)")
    start = args.weight_decay if args.start_weight_decay is None else args.start_weight_decay
    end = args.weight_decay if args.end_weight_decay is None else args.end_weight_decay
    if start < 0 or end < start:
        problems.append(f"weight decay must satisfy 0 <= start_weight_decay ({start}) <= end_weight_decay ({end})")
    if args.weight_decay_incr_style == "constant" and start != end:
        problems.append("start_weight_decay and end_weight_decay differ but weight_decay_incr_style is constant")
    return problems


def drop_cuda_only(args: argparse.Namespace) -> list[str]:
    """On a device without CUDA: reset every set CUDA-only performance option to its default; their names."""
    actions = build_parser()._option_string_actions
    dropped = []
    for name in vocabulary.megatron_arguments():
        action = actions.get("--" + name.replace("_", "-"))
        if action is None or vocabulary.category(name, frozenset()) != "cuda_only":
            continue
        if getattr(args, action.dest, action.default) != action.default:
            setattr(args, action.dest, action.default)
            dropped.append(name)
    return dropped
