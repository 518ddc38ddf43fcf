"""``preftune demo``: the built-in controlled-sentiment experiment (:mod:`preftune.demo`), or with ``--model smollm2``
iterative DPO on a real chat model (:mod:`preftune.demo.chat`)."""

from __future__ import annotations

from dataclasses import replace


def demo_arguments(parser) -> None:
    parser.add_argument("--output_dir", default=None, help="Where the demo writes its runs, report.html and "
                                                           "summary.json (default: runs/demo, or runs/demo-chat "
                                                           "with --model smollm2).")
    parser.add_argument("--quick", action="store_true", help="A smaller, faster version (for smoke tests).")
    parser.add_argument("--model", choices=["toy", "smollm2"], default="toy",
                        help="toy: a small model pretrained here on generated reviews, every method compared; "
                             "smollm2: SmolLM2-135M-Instruct aligned by iterative DPO to write positive, on-topic "
                             "product reviews.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="smollm2: one run per seed (default: seed 0), figures over all of them with 95%% "
                             "confidence intervals in demo_summary.json.")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                        help="Precision of every stage (default fp32, in which the README's figures were measured; "
                             "auto: bf16 where the hardware has fast bf16 products).")


def run_demo(args) -> int:
    if args.model == "smollm2":
        from ..demo.chat import ChatDemoScale, run_chat_demo

        scale = ChatDemoScale.quick() if args.quick else ChatDemoScale()
        run_chat_demo(args.output_dir or "runs/demo-chat", replace(scale, precision=args.precision), seeds=args.seeds)
        return 0
    from ..demo import run_demo as demo

    demo(args.output_dir or "runs/demo", quick=args.quick, precision=args.precision)
    return 0
