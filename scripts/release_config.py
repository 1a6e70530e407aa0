"""Write ``moss_agent/checkpoints/release_config.json``: the config the release's ``MossConfig`` saves.

Runs the release's own ``configuration_moss.py`` under its pinned transformers 4.25.1 in a scratch virtualenv
(``python -m venv /tmp/tf425 && /tmp/tf425/bin/pip install transformers==4.25.1 tokenizers==0.13.3``; no torch
needed) and prints ``MossConfig(**released_extras).to_dict()`` for the moss-moon-003 sizes.

Usage:
    /tmp/tf425/bin/python scripts/release_config.py [RELEASE_DIR] > moss_agent/checkpoints/release_config.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RELEASE = Path(__file__).resolve().parents[1].parent / "shared" / "moss_release"
EXTRAS = {  # what the released config.json files carry beyond the class's own arguments (CodeGen lineage)
    "architectures": ["MossForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_moss.MossConfig",
        "AutoModel": "modeling_moss.MossModel",
        "AutoModelForCausalLM": "modeling_moss.MossForCausalLM",
    },
    "torch_dtype": "float16",
    "tokenizer_class": "GPT2Tokenizer",
    "gradient_checkpointing": False,
    "scale_attn_weights": True,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
}


def main() -> None:
    """Print the config as JSON."""
    sys.path.insert(0, str(Path(sys.argv[1]) if len(sys.argv) > 1 else RELEASE))
    from configuration_moss import MossConfig  # type: ignore[import-not-found]

    config = MossConfig(**EXTRAS)
    config._name_or_path = "fnlp/moss-moon-003-sft"
    print(json.dumps(config.to_dict(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
