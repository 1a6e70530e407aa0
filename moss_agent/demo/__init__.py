"""The demonstration model: synthetic MOSS dialogues and the tiny model trained on them."""
