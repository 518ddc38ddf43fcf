"""Write the chat demo's table (README.md's "A real chat model aligned on a laptop") from a run's demo_summary.json.

    python scripts/demo_chat_table.py runs/demo-chat-seeds/demo_summary.json --readme README.md

Without ``--readme`` the table is printed. The figures come only from the JSON (see preftune/demo/chat_stats.py).
"""

import argparse
import json
from pathlib import Path

from preftune.demo.chat_stats import markdown_table, write_into_readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="demo_summary.json of `preftune demo --model smollm2`")
    parser.add_argument("--readme", type=Path, help="Write the table between its markers in this file.")
    args = parser.parse_args()
    table = markdown_table(json.loads(args.summary.read_text(encoding="utf-8")))
    if args.readme:
        write_into_readme(args.readme, table)
        print(f"table written into {args.readme}")
    else:
        print(table)


if __name__ == "__main__":
    main()
