"""Train from the command line, with the settings of notebook 03 in a YAML file:

    python -m helpers.train --config configs/run.yaml                # one process
    python -m helpers.train --config configs/run.yaml --check        # check the file, show the recipe, train nothing
    accelerate launch --num_processes 2 -m helpers.train --config configs/run.yaml              # DDP, one per GPU
    accelerate launch --config_file configs/accelerate_fsdp_qlora.yaml -m helpers.train --config run_fsdp.yaml

The file holds the names of notebook 03's parameters cell (helpers.run_config.PARAMETERS); what it leaves out
keeps the notebook's default. The recipe and the train() arguments come from helpers.run_config, as in the notebook.
docs/multi_gpu.md describes the runs on several GPUs.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from helpers.distributed import check_launch, end_processes, is_main_process
from helpers.run_config import RunConfigError, load_run_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file of run settings (notebook 03's parameter names)")
    parser.add_argument("--check", action="store_true",
                        help="check the file, print the recipe and the train() arguments, and stop")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_run_config(args.config, create_output_dir=not args.check)
        if not args.check:
            check_launch(config.parameters["fsdp"])
    except (RunConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        shown = {k: str(v) if k == "out_dir" else v for k, v in config.train_kwargs().items()}
        print(json.dumps({"recipe": asdict(config.recipe), "train": shown, "fsdp": config.parameters["fsdp"]},
                         ensure_ascii=False, indent=1))
        return 0
    from helpers.training import train  # imports transformers (seconds); --check stays fast without it

    run = train(config.recipe, **config.train_kwargs())
    end_processes()
    if is_main_process():
        card = run.summary
        print(f"{card['collapse_text']}; {card['global_step']} steps on {card['processes']} process(es), "
              f"{card['real_tokens_per_s']} tokens/s; run card: {config.out_dir / 'run_card.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
