"""The old multi-GPU demo's entry point, kept so its commands still work:

    python launch.py --model_path /path/to/model --gpus "0,1,3" \
        --inference_steps 10 --port 7860 --share

It is `vibevoice-pool launch` with the same flags."""

import sys

from vibevoice_pool.cli import main

if __name__ == "__main__":
    sys.exit(main(["launch", *sys.argv[1:]]))
