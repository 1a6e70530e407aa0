"""A tiny random text-to-image pipeline, built locally, for tests of the ``Text2Image`` tool.

The pipeline is a real diffusers ``StableDiffusionPipeline`` made of random tiny parts (UNet, VAE, CLIP text
model, a byte-level CLIP tokenizer written here) and saved with ``save_pretrained``, so that
``AutoPipelineForText2Image.from_pretrained(path)`` loads it offline exactly as it would load a real model.
Its images are noise; what it proves is the plumbing. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moss_agent.settings import cache_dir

__all__ = ["TINY_TEXT2IMAGE_VERSION", "cache_dir", "tiny_text2image_pipeline"]

TINY_TEXT2IMAGE_VERSION = "tiny-sd-v1"
"""Bumped whenever the recipe below changes, so that stale cached pipelines are not reused."""

_MARKER = "model_index.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _clip_tokenizer(max_length: int) -> Any:
    """A byte-level CLIP tokenizer: every byte alone and as a word end, plus a few English merges."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    # A handful of merges so that the BPE model is exercised, not only its byte fallback.
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    # The stub says list[str], but this tokenizers backend wants (left, right) pairs.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]


def _build(seed: int) -> Any:
    """Build the pipeline in memory from seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer(max_length=77)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_text2image_pipeline(path: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """Build (or reuse) a tiny random Stable Diffusion pipeline saved in diffusers' folder layout.

    The pipeline has a two-block UNet and VAE (the VAE scales by 2, so image sides must be multiples of 4; the
    default size is 16×16, 64×64 works), a 2-layer 16-wide CLIP text encoder and a byte-level tokenizer.
    Building it takes a few seconds (mostly imports); loading takes about 0.2 s and a 2-step 64×64 generation
    about 0.1 s on a CPU.

    Args:
        path: Where to save it. By default a folder under :func:`cache_dir` keyed by
            :data:`TINY_TEXT2IMAGE_VERSION` and ``seed``; an existing complete folder there is reused.
        seed: The seed for the random weights (same seed, same weights).

    Returns:
        The folder, loadable with ``AutoPipelineForText2Image.from_pretrained(folder)`` offline.
    """
    target = Path(path) if path is not None else cache_dir() / f"{TINY_TEXT2IMAGE_VERSION}-seed{seed}"
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Save into a sibling temporary folder and rename, so that parallel test workers never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _build(seed).save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():  # not another worker's finished copy: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
