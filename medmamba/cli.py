"""The ``medmamba`` command line."""
from __future__ import annotations

import argparse
import sys

from .flops import complexity
from .registry import create_model, list_models


def _info(args: argparse.Namespace) -> int:
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    c = complexity(model, args.img_size, args.in_chans)
    print(f"{args.model}  img {args.img_size}px  {args.num_classes} classes  {args.in_chans} channels")
    print(f"  parameters                      {c.params / 1e6:8.2f} M")
    print(f"  GFLOPs, paper (conv + linear)   {c.paper_macs / 1e9:8.1f} G   ({c.paper_macs / 1e9:.3f})")
    print(f"  GFLOPs, full (+ einsum + scan)  {c.full_macs / 1e9:8.2f} G"
          f"   (einsum {c.einsum_macs / 1e9:.2f} G, scan {c.scan_macs / 1e9:.2f} G)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmamba", description="MedMamba: models, training, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters and FLOPs of a model variant")
    info.add_argument("model", choices=list_models())
    info.add_argument("--img-size", type=int, default=224)
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--in-chans", type=int, default=3)
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
