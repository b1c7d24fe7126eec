"""`jaxrisk zoo`: train clean and trojaned MNIST classifiers with their ground truth."""

from __future__ import annotations

from jaxrisk.cli.common import POSITIVE, add_progress_flag, add_seed_flag, comma_list, int_at_least
from jaxrisk.errors import InputError
from jaxrisk.io import prepare_out_dir


def add_parser(sub) -> None:
    p = sub.add_parser("zoo", help="train clean and trojaned MNIST classifiers with their ground truth")
    p.add_argument("--mnist", metavar="DIR", required=True, help="directory with the four MNIST IDX files")
    p.add_argument("--out", required=True, help="where to write NAME.safetensors / NAME.json per model")
    p.add_argument("--trojaned", type=int_at_least(0), default=8)
    p.add_argument("--clean", type=int_at_least(0), default=8)
    p.add_argument("--epochs", type=POSITIVE, default=1, help="epochs per model (default 1)")
    p.add_argument("--max-epochs", type=POSITIVE, default=3,
                   help="train a model below the bar (clean accuracy 98%%, attack success 95%%) one more epoch at a "
                        "time up to this many (default 3); a later build with a larger value goes on from there")
    p.add_argument("--kinds", type=comma_list(str, "trigger kinds", "patch,sig"),
                   help="trigger kinds to cycle through (default: patch, sparse, checkerboard, blend, warp, sig, "
                        "patch_large, all_to_all)")
    p.add_argument("--archs", type=comma_list(str, "architectures", "mnist_cnn,lenet5"),
                   help="architectures to cycle through (default: mnist_cnn, lenet5, resnet8)")
    add_seed_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_zoo)


def cmd_zoo(args) -> int:
    from jaxrisk.zoo.build import ZOO_ARCHS, ZOO_KINDS, build_zoo

    if args.trojaned + args.clean == 0:
        raise InputError("--trojaned and --clean are both 0: nothing to build")
    build_zoo(prepare_out_dir(args.out), mnist_dir=args.mnist, n_trojaned=args.trojaned, n_clean=args.clean,
              epochs=args.epochs, max_epochs=args.max_epochs, seed=args.seed, kinds=tuple(args.kinds or ZOO_KINDS),
              archs=tuple(args.archs or ZOO_ARCHS), progress=not args.no_progress)
    return 0
