"""MOSS's ``Text2Image(description)`` plugin as a LangChain tool, on a diffusers pipeline.

The pipeline (``AutoPipelineForText2Image``) is loaded on first use, on the GPU in half precision when there
is one, else on the CPU in fp32 (``moss_agent.checkpoints.hardware.torch_device_and_dtype``). Each image is written as a
PNG with a random name inside the output folder (nothing from the prompt reaches the file system); the tool
returns MOSS's ``Image generated successfully.`` and the file path as its artifact. Failures give
``No result.``.

The default model, `stabilityai/sd-turbo <https://huggingface.co/stabilityai/sd-turbo>`_ (a distilled
Stable Diffusion 2.1, about 2.6 GB in fp16; see its licence), draws a 512×512 image in one step without
guidance, which is why ``steps=1`` and ``guidance_scale=0.0`` are the defaults. It is downloaded from the
Hugging Face Hub the first time the tool draws, never at import or construction. For another model set
``model`` and its usual ``steps`` / ``guidance_scale`` (e.g. 25 and 7.5 for Stable Diffusion 1.5).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForToolRun
from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field, PrivateAttr, field_validator

from moss_agent.protocol.format import scrub
from moss_agent.protocol.plugins import NO_RESULT, TEXT2IMAGE_DONE, TEXT_TO_IMAGE

__all__ = ["DEFAULT_TEXT2IMAGE_MODEL", "TextToImageInput", "TextToImageTool", "text2image_problem"]

logger = logging.getLogger(__name__)

DEFAULT_TEXT2IMAGE_MODEL = "stabilityai/sd-turbo"
"""A small, fast text-to-image model: one step, 512×512, runs (slowly) even on a CPU."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def text2image_problem(model: str = DEFAULT_TEXT2IMAGE_MODEL) -> str | None:
    """Why the tool could not draw with ``model`` here, saying what to do; None when it can. Loads nothing.

    It can when diffusers is installed and ``model`` is a diffusers folder or already in the Hugging Face cache
    (a model that is not here is not downloaded behind the user's back: the message says how to get it).
    """
    if importlib.util.find_spec("diffusers") is None:
        return "it needs diffusers: pip install 'moss-agent[image]'"
    path = Path(model).expanduser()
    if path.is_dir():
        found = (path / "model_index.json").is_file()
        return None if found else f"{model} is not a diffusers model folder (no model_index.json)"
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # not a hub id either
        return f"{model} is neither a diffusers model folder nor a hub id"
    if isinstance(cached, str):
        return None
    size = " (about 2.6 GB)" if model == DEFAULT_TEXT2IMAGE_MODEL else ""
    return f"it needs the model {model}{size}, not on this machine: `hf download {model}`, or --image-model DIR"


def _dtype_keyword() -> str:
    """``dtype`` on diffusers versions that renamed ``torch_dtype`` (and warn on the old name), else that."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


class TextToImageInput(BaseModel):
    """Arguments of ``Text2Image``."""

    description: str = Field(description="What the image should show, in English, as a short description.")


class TextToImageTool(BaseTool):
    """Text-to-image in MOSS's result format (``Text2Image(description)``).

    The content is ``Image generated successfully.`` (or ``No result.``); the artifact is the PNG's path as a
    string (None on failure). Construction is cheap: diffusers and the weights load on the first call.

    Raises:
        ImportError: At construction, if diffusers is not installed (the ``image`` extra).
    """

    name: str = str(TEXT_TO_IMAGE.api)
    description: str = "Draw an image from a text description. Input: the description. Output: a status line."
    args_schema: type[BaseModel] = TextToImageInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"

    model: str = DEFAULT_TEXT2IMAGE_MODEL
    """A Hugging Face Hub id or a local folder in diffusers' layout."""
    output_dir: Path = Field(default_factory=lambda: Path("moss_images"))
    """Where the PNGs go (created on first use); made absolute at construction."""
    steps: int = Field(default=1, ge=1, le=200)
    """Denoising steps (``num_inference_steps``)."""
    guidance_scale: float = Field(default=0.0, ge=0.0)
    """Classifier-free guidance; 0 turns it off (as distilled models such as sd-turbo want)."""
    height: int = Field(default=512, ge=8, le=4096)
    """Image height in pixels (a multiple of the model's VAE scale, usually 8)."""
    width: int = Field(default=512, ge=8, le=4096)
    """Image width in pixels."""
    seed: int | None = None
    """A fixed seed makes the same description give the same image; None draws a new one each time."""
    max_prompt_chars: int = Field(default=500, ge=1)
    """Longer descriptions are cut (CLIP reads only 77 tokens anyway)."""
    device: str | None = None
    """Where to run, e.g. ``"cuda:0"``; chosen from the hardware when None."""
    dtype: Any = None
    """A torch dtype; fp16/bf16 on a GPU and fp32 on a CPU when None."""
    load_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra arguments for ``AutoPipelineForText2Image.from_pretrained`` (``variant``, ``revision``...)."""
    pipeline: Any = None
    """An already loaded diffusers pipeline to use instead of loading ``model``."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("pipeline") is None and importlib.util.find_spec("diffusers") is None:
            raise ImportError("TextToImageTool needs diffusers: pip install 'moss-agent[image]'")
        super().__init__(**kwargs)

    @field_validator("output_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def _load(self) -> Any:
        """Load the pipeline once (the caller holds the lock)."""
        if self.pipeline is None:
            from diffusers import AutoPipelineForText2Image

            from moss_agent.checkpoints.hardware import torch_device_and_dtype

            device, dtype = torch_device_and_dtype()
            device = self.device or device
            dtype = self.dtype or dtype
            kwargs = {_dtype_keyword(): dtype, "use_safetensors": True, **self.load_kwargs}
            logger.info("loading text-to-image model %s on %s (%s)", self.model, device, dtype)
            pipe = AutoPipelineForText2Image.from_pretrained(self.model, **kwargs).to(device)
            pipe.set_progress_bar_config(disable=True)
            self.pipeline = pipe
        return self.pipeline

    def _prompt(self, description: str) -> str:
        """The description as a prompt: scrubbed, control characters (NUL included) to spaces, capped."""
        return " ".join(_CONTROL.sub(" ", scrub(description)).split())[: self.max_prompt_chars]

    def _draw(self, prompt: str) -> Path:
        """Generate one image and save it under a fresh random name inside the output folder."""
        import torch

        with self._lock:  # diffusers pipelines are not thread-safe
            pipe = self._load()
            generator = None if self.seed is None else torch.Generator("cpu").manual_seed(self.seed)
            image = pipe(
                prompt=prompt,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                height=self.height,
                width=self.width,
                generator=generator,
            ).images[0]
        folder = self.output_dir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.png"
        # "xb": never overwrite, and refuse a planted file or link with the same name.
        with open(path, "xb") as handle:
            image.save(handle, format="PNG")
        return path

    def _run(self, description: str, run_manager: CallbackManagerForToolRun | None = None) -> tuple[str, str | None]:
        """Draw; every failure becomes ``No result.`` with a logged warning."""
        prompt = self._prompt(description)
        if not prompt:
            return NO_RESULT, None
        try:
            path = self._draw(prompt)
        except Exception as err:
            logger.warning("Text2Image(%r) failed with %s: %s", prompt[:80], type(err).__name__, err)
            return NO_RESULT, None
        return TEXT2IMAGE_DONE, os.fspath(path)
