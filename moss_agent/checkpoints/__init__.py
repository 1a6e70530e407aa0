"""MOSS checkpoints: files, sizes, the load plan, hardware, loading and conversion."""
