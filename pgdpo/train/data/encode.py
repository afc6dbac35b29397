"""Encode preference pairs (videos + prompts) into a latent dataset with local diffusers/transformers parts.

What is computed, per pair (the same tensors the Wan2.1 pipelines build at inference):

- ``chosen`` / ``rejected``: VAE latents of the videos (posterior mode), normalised. ``AutoencoderKLWan``:
  ``(z - latents_mean) / latents_std`` per channel, ``F' = (F - 1) / 4 + 1`` latent frames;
  ``AutoencoderKL`` (VideoCrafter2-style UNets): frame by frame, ``(z - shift_factor) * scaling_factor``.
- ``encoder_hidden_states``: the text encoder's last hidden state of the prompt tokenised to ``text_len``
  tokens (padded/truncated), zero on padding positions (as ``WanPipeline.encode_prompt``).
- image-to-video: ``image_condition`` = 4 frame-mask channels + the normalised VAE latent of the video
  ``[image, 0, 0, ...]`` (``WanImageToVideoPipeline.prepare_latents``), and ``encoder_hidden_states_image``
  = the CLIP vision encoder's penultimate hidden state of the image (``encode_image``). The image is the
  pair's ``image`` file if the pairs file has one, else the chosen video's first frame.

Every component is loaded from a local folder (``from_pretrained(..., local_files_only=True)``); a
diffusers pipeline folder can be given once with ``pipeline`` (``vae/``, ``text_encoder/``,
``tokenizer/``, ``image_encoder/``, ``image_processor/``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import latent_frames, latent_shape
from .format import DatasetMeta
from .media import fit_video, read_image, read_video
from .pairs import read_pairs
from .writer import DatasetWriter

VAE_CLASSES = ("AutoencoderKLWan", "AutoencoderKL")
TEXT_ENCODERS = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel", "clip_text_model": "CLIPTextModel"}


def _config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no config.json in {str(folder)!r} (expected a local "
                                "save_pretrained folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def load_vae(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """``AutoencoderKLWan`` or ``AutoencoderKL`` from a local folder (class from ``config.json``)."""
    import diffusers

    folder = Path(folder)
    name = _config(folder, "vae").get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(f"{folder}/config.json: VAE class {name!r} is not supported; "
                         f"expected one of {list(VAE_CLASSES)}")
    vae = getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """A UMT5 / T5 / CLIP text encoder from a local folder (class from ``model_type``)."""
    import transformers

    folder = Path(folder)
    model_type = _config(folder, "text encoder").get("model_type")
    if model_type not in TEXT_ENCODERS:
        raise ValueError(f"{folder}/config.json: text encoder model_type {model_type!r} is not supported; "
                         f"expected one of {sorted(TEXT_ENCODERS)}")
    cls = getattr(transformers, TEXT_ENCODERS[model_type])
    model = cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no pad token; prompts are padded to a fixed length")
    return tokenizer


def load_image_encoder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    from transformers import CLIPVisionModel

    folder = Path(folder)
    _config(folder, "image encoder")
    model = CLIPVisionModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_image_processor(folder: str | os.PathLike):
    from transformers import CLIPImageProcessor

    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"image processor: no preprocessor_config.json in {str(folder)!r}")
    return CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)


@dataclass
class Encoders:
    """The frozen parts that turn videos, prompts and images into training tensors."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    image_encoder: torch.nn.Module | None = None
    image_processor: object | None = None

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def is_wan_vae(self) -> bool:
        return type(self.vae).__name__ == "AutoencoderKLWan"

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.config.scale_factor_temporal or 4) if self.is_wan_vae else 1

    @property
    def spatial_factor(self) -> int:
        if self.is_wan_vae:
            return int(self.vae.config.scale_factor_spatial or 8)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        config = self.vae.config
        return int(config.z_dim if self.is_wan_vae else config.latent_channels)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent ``(C, F', H', W')`` this VAE makes of a ``frames x height x width`` video
        (:func:`pgdpo.train.models.latent_shape`, strict: a size it cannot encode exactly is a
        ``ValueError``)."""
        return latent_shape(frames, height, width, channels=self.latent_channels,
                            temporal_factor=self.temporal_factor, spatial_factor=self.spatial_factor,
                            strict=True)

    def latent_frames(self, frames: int) -> int:
        try:
            return latent_frames(frames, self.temporal_factor, strict=True)
        except ValueError as exc:
            raise ValueError(f"{exc} (use --frames to keep the first 4k+1)") from None

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in ``[-1, 1]`` -> normalised latents ``[B, C, F', H', W']`` (float32)."""
        vae = self.vae
        video = video.to(self.device, vae.dtype)
        if self.is_wan_vae:
            latent = vae.encode(video).latent_dist.mode().float()
            mean = torch.tensor(vae.config.latents_mean, device=latent.device).view(1, -1, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std, device=latent.device).view(1, -1, 1, 1, 1)
            return (latent - mean) / std
        b, _, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * f, 3, h, w)
        latent = vae.encode(frames).latent_dist.mode().float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latent = (latent - shift) * vae.config.scaling_factor
        return latent.reshape(b, f, *latent.shape[1:]).transpose(1, 2).contiguous()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], text_len: int) -> torch.Tensor:
        """``[B, text_len, D]`` last hidden states, zero on padding tokens (float32)."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=text_len, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    @torch.no_grad()
    def encode_image_condition(self, image: torch.Tensor, frames: int) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> ``[B, 4 + C, F', H', W']``: frame mask + first-frame latent."""
        b, _, h, w = image.shape
        video = torch.cat([image[:, :, None], image.new_zeros(b, 3, frames - 1, h, w)], dim=2)
        latent = self.encode_video(video)
        t = self.temporal_factor
        lf, lh, lw = latent.shape[-3:]
        mask = torch.ones(b, 1, frames, lh, lw, device=latent.device)
        mask[:, :, 1:] = 0
        mask = torch.cat([mask[:, :, :1].repeat_interleave(t, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(b, -1, t, lh, lw).transpose(1, 2)  # [B, t, F', H', W']
        return torch.cat([mask, latent], dim=1)

    @torch.no_grad()
    def encode_clip_image(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> CLIP penultimate hidden states ``[B, tokens, dim]``."""
        if self.image_encoder is None or self.image_processor is None:
            raise ValueError("image-to-video encoding needs an image encoder and an image processor "
                             "(--image-encoder / --image-processor, or --pipeline with image_encoder/)")
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        inputs = self.image_processor(images=list(pixels), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.image_encoder.dtype)
        out = self.image_encoder(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-2].float()


def load_encoders(*, vae: str | os.PathLike | None = None, text_encoder: str | os.PathLike | None = None,
                  tokenizer: str | os.PathLike | None = None, image_encoder: str | os.PathLike | None = None,
                  image_processor: str | os.PathLike | None = None, pipeline: str | os.PathLike | None = None,
                  task: str = "t2v", dtype: torch.dtype = torch.float32, device="cpu") -> Encoders:
    """Load the encoders from local folders; ``pipeline`` fills any folder not given from its subfolders."""
    def pick(given, sub):
        if given is not None:
            return Path(given)
        if pipeline is not None:
            return Path(pipeline) / sub
        return None

    vae, text_encoder = pick(vae, "vae"), pick(text_encoder, "text_encoder")
    tokenizer = pick(tokenizer, "tokenizer") or text_encoder
    if vae is None or text_encoder is None:
        raise ValueError("need --vae and --text-encoder folders (or --pipeline with vae/ and text_encoder/)")
    parts = Encoders(vae=load_vae(vae, dtype, device),
                     text_encoder=load_text_encoder(text_encoder, dtype, device),
                     tokenizer=load_tokenizer(tokenizer))
    if task == "i2v":
        image_encoder = pick(image_encoder, "image_encoder")
        image_processor = pick(image_processor, "image_processor") or image_encoder
        if image_encoder is None:
            raise ValueError("--task i2v needs --image-encoder (a CLIPVisionModel folder) or --pipeline")
        parts.image_encoder = load_image_encoder(image_encoder, dtype, device)
        parts.image_processor = load_image_processor(image_processor)
    return parts


def encode_dataset(pairs_file: str | os.PathLike, out: str | os.PathLike, encoders: Encoders, *,
                   task: str = "t2v", videos_root: str | os.PathLike | None = None, text_len: int = 512,
                   frames: int | None = None, height: int | None = None, width: int | None = None,
                   dtype: torch.dtype | str = torch.bfloat16, shard_size: int = 64, overwrite: bool = False,
                   progress: bool = True) -> DatasetMeta:
    """Encode every pair of ``pairs_file`` (``pgdpo data pairs`` output) into the dataset folder ``out``.

    Relative video/image paths are resolved against ``videos_root`` (default: the pairs file's folder).
    All videos must come out the same size (use ``frames``/``height``/``width`` to trim and resize).
    """
    from tqdm.auto import tqdm

    if task not in ("t2v", "i2v"):
        raise ValueError(f"task must be 't2v' or 'i2v', got {task!r}")
    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither")
    pairs = read_pairs(pairs_file)
    root = Path(videos_root) if videos_root is not None else Path(pairs_file).resolve().parent

    def resolve(path: str) -> Path:
        return Path(path) if os.path.isabs(path) else root / path

    writer = None
    shape = None
    for pair in tqdm(pairs, desc="encoding pairs", unit="pair", disable=not progress):
        videos = []
        for side in ("chosen", "rejected"):
            path = resolve(pair[side]["video"])
            video = fit_video(read_video(path), frames=frames, height=height, width=width)
            try:
                expected = encoders.latent_shape(*video.shape[1:])
            except ValueError as exc:
                raise ValueError(f"{path}: video {list(video.shape)} [3, F, H, W]: {exc} (use "
                                 "--frames/--height/--width)") from None
            if shape is None:
                shape = tuple(video.shape)
            elif tuple(video.shape) != shape:
                raise ValueError(f"{path}: video is {list(video.shape)} [3, F, H, W] but the first video was "
                                 f"{list(shape)}; all videos must match (use --frames/--height/--width)")
            videos.append(video)
        latents = encoders.encode_video(torch.stack(videos))
        if tuple(latents.shape[1:]) != expected:  # the VAE and the shared latent-shape formula disagree
            raise RuntimeError(f"{type(encoders.vae).__name__} encoded {list(shape)} [3, F, H, W] to "
                               f"{list(latents.shape[1:])}; pgdpo.train.models.latent_shape says "
                               f"{list(expected)}")
        text = encoders.encode_prompts([pair["prompt"]], text_len)[0]
        tensors = {"chosen": latents[0], "rejected": latents[1], "encoder_hidden_states": text}
        if task == "i2v":
            if pair.get("image") is not None:
                image = read_image(resolve(pair["image"]))
                if height is not None:
                    image = fit_video(image[:, None], height=height, width=width)[:, 0]
                if tuple(image.shape[-2:]) != shape[-2:]:
                    raise ValueError(f"{resolve(pair['image'])}: image is {list(image.shape[-2:])} but the "
                                     f"videos are {list(shape[-2:])} (height, width)")
            else:
                image = videos[0][:, 0]
            tensors["image_condition"] = encoders.encode_image_condition(image[None], shape[1])[0]
            tensors["encoder_hidden_states_image"] = encoders.encode_clip_image(image[None])[0]
        if writer is None:
            source = {"kind": "encoded", "pairs_file": os.fspath(pairs_file),
                      "vae": type(encoders.vae).__name__,
                      "text_encoder": type(encoders.text_encoder).__name__, "video_shape": list(shape)}
            i2v = task == "i2v"
            writer = DatasetWriter(
                out, task=task, latent_shape=latents.shape[1:], text_len=text_len, text_dim=text.shape[-1],
                dtype=dtype, image_condition_shape=tensors["image_condition"].shape if i2v else None,
                image_embed_shape=tensors["encoder_hidden_states_image"].shape if i2v else None,
                shard_size=shard_size, source=source, overwrite=overwrite)
        chosen, rejected = pair["chosen"], pair["rejected"]
        writer.add(prompt_id=pair["prompt_id"], prompt=pair["prompt"], score_chosen=chosen.get("score"),
                   score_rejected=rejected.get("score"), **tensors)
    return writer.close()
