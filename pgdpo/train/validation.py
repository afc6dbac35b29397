"""Validation samples during training: what the policy generates for a few fixed prompts.

At step 0, every ``validation.every`` steps and at the end, the current policy samples videos for the
first ``validation.num_prompts`` pairs' conditions (text embeddings, and the image condition for I2V) of
``validation.data`` (a dataset folder; default the training dataset), from noise drawn with a fixed seed,
so that the samples of different steps differ only by the weights. The sampler is our own loop over the
diffusers scheduler of the training schedule: ``FlowMatchEulerDiscreteScheduler`` (same shift) for flow
matching (Wan), ``DDIMScheduler`` from the ``DDPMScheduler`` config (same betas and prediction type) for
the UNet.

Under FSDP2 / DDP every rank runs the same sampling (the sharded forwards are collective) and rank 0
writes. Decoding: with the VAE of ``validation.vae`` (a local diffusers folder: ``AutoencoderKLWan`` for
Wan, ``AutoencoderKL`` per frame for the UNet), else the linear latent-to-RGB preview of
:mod:`pgdpo.train.preview`. Written:

- ``<output_dir>/samples/step-XXXXXX/prompt-NN.gif`` (frames upscaled ``validation.scale`` times) and
  ``videos.safetensors`` (the RGB samples, for comparison grids);
- ``<output_dir>/samples/before_after.png`` at the end: per prompt a row of frames at the first sampled
  step, at the last, and of the dataset's chosen video (recipe in ``before_after.json``; ``pgdpo train
  --compare`` adds the second run's last samples as a column);
- ``<output_dir>/samples/validation.jsonl``: per validation step the optional reward's scores, over
  ``validation.num_seeds`` noise seeds (the GIFs are of the first);
- TensorBoard / W&B: one frame strip per prompt (``validation/prompt-NN``) and ``validation/reward``.

Held-out prompts: ``validation.data: "{output_dir}/heldout"`` with ``data.synthesize`` writes
``num_prompts`` synthetic pairs from index :data:`HELD_OUT_FIRST_INDEX` there (same prompt "words", pairs
no training set holds), as ``configs/demo.yaml`` does.

The optional reward hook ``validation.reward = "module:function"`` is called as
``function(videos, prompts)`` with ``videos`` ``[N, F, H, W, 3]`` float in ``[0, 1]`` (decoded or
preview) and the prompt strings (None where unknown), and returns ``N`` scores (a list or tensor).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import textwrap
import warnings
from contextlib import nullcontext

import numpy as np
import torch

from .config import ConfigError
from .data.collate import collate
from .data.dataset import PreferenceDataset
from .data.format import META_FILE, DataError, read_meta
from .data.synth import synth_dataset
from .models import find_model_folder
from .preview import latent_to_rgb

SAMPLES_DIR = "samples"


def load_reward(spec: str, what: str = "validation.reward"):
    """The callable named by ``"module:function"`` (an error naming ``what`` otherwise; ``pgdpo data
    score`` and ``pgdpo eval`` load their ``--reward`` hooks with it too)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what} must be 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # The `pgdpo` console script (unlike `python -m pgdpo`) does not put the working folder on sys.path,
        # where a user's own reward module usually sits: look there too before giving up.
        here = os.getcwd()
        if here in sys.path:
            raise ConfigError(f"{what} {spec!r}: cannot import {module_name!r} ({exc})") from None
        sys.path.append(here)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            sys.path.remove(here)
            raise ConfigError(f"{what} {spec!r}: cannot import {module_name!r} ({exc}; looked in the "
                              f"working folder {here} too)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r}: {module_name} has no callable {attr!r}")
    return fn


class Validator:
    """Samples, decodes, writes and logs validation videos (collective: every rank builds and runs one).

    Its dependencies are explicit: the run's ``config`` (its ``validation`` section, and the data, model and
    method names for labels and held-out prompts), the run's folder ``out``, the process group ``dist``,
    the training ``dataset`` (the default prompts and the held-out data's shapes), the model family
    ``adapter`` (a :class:`~pgdpo.train.models.ModelSpec`), the policy ``model`` it samples, the training
    ``schedule`` (:class:`~pgdpo.train.diffusion.Schedule`: the sampler's scheduler config), the forward's
    ``autocast_dtype``, the ``metrics`` log (its trackers get the frames) and the run's ``log``.
    """

    def __init__(self, config, *, out: str, dist, dataset: PreferenceDataset, adapter, model, schedule,
                 autocast_dtype, metrics, log):
        cfg = config.validation
        self.config, self.cfg = config, cfg
        self.dist, self.adapter, self.model, self.schedule = dist, adapter, model, schedule
        self.autocast_dtype, self.metrics, self.log = autocast_dtype, metrics, log
        self.out = os.path.join(out, SAMPLES_DIR)
        device = dist.device
        if cfg.data:
            folder = os.path.expanduser(cfg.data.replace("{output_dir}", config.output_dir))
            if config.data.synthesize:  # rank 0 writes the held-out prompts when they are missing or too few
                dist.on_rank0(lambda: _holds_pairs(folder, cfg.num_prompts)
                              or synthesize_held_out(config, adapter, dataset.meta, folder, log))
            source = PreferenceDataset(folder, batch_size=1, shuffle=False, drop_last=False)
        else:
            source = dataset
        n = min(cfg.num_prompts, source.num_pairs)
        pairs = [source.read_pair(i) for i in range(n)]
        batch = collate(pairs, dtype=torch.float32)
        self.chosen = batch.pop("chosen")
        batch.pop("rejected")
        self.cond = {k: v.to(device) for k, v in batch.items()}
        self.prompts = [source.entries[i].prompt for i in range(n)]
        self.reward_fn = load_reward(cfg.reward) if cfg.reward else None
        self.vae = self._load_vae(cfg.vae) if cfg.vae else None
        self.first: torch.Tensor | None = None  # RGB of the first validation run, for before/after
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.first_reward: float | None = None
        self.last_reward: float | None = None

    # ------------------------------------------------------------------------------------------ when

    def due(self, step: int, max_steps: int) -> bool:
        return step == max_steps or (self.cfg.every > 0 and step % self.cfg.every == 0)

    # ------------------------------------------------------------------------------------------ sampling

    def _scheduler(self):
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        schedule = self.schedule
        if schedule.name == "flow":
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(schedule.scheduler.config)
        else:
            scheduler = DDIMScheduler.from_config(schedule.scheduler.config)
        scheduler.set_timesteps(self.cfg.steps, device=self.dist.device)
        return scheduler

    @torch.no_grad()
    def sample(self, seed: int | None = None) -> torch.Tensor:
        """``[N, C, F, H, W]`` latents sampled by the current policy from the fixed seed (``validation.seed``
        unless ``seed`` is given)."""
        adapter, model, device = self.adapter, self.model, self.dist.device
        shape = (self.chosen.shape[0], *self.chosen.shape[1:])
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed if seed is None else seed)
        latents = torch.randn(shape, generator=gen).to(device)
        scheduler = self._scheduler()
        autocast = self.autocast_dtype
        ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
        was_training = model.training
        model.eval()
        try:
            for timestep in scheduler.timesteps:
                ts = adapter.model_timesteps(timestep.expand(shape[0]).to(device))
                with ctx:
                    pred = adapter.predict(model, latents.to(adapter.input_dtype(model)), ts, self.cond,
                                           paired=False)
                latents = scheduler.step(pred.float(), timestep, latents).prev_sample
        finally:
            model.train(was_training)
        return latents.float()

    # ------------------------------------------------------------------------------------------ decoding

    def _load_vae(self, path: str):
        import diffusers

        try:
            folder = find_model_folder(os.path.expanduser(path), what="validation.vae", subfolders=("vae",))
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        with open(os.path.join(folder, "config.json")) as f:
            name = json.load(f).get("_class_name", "")
        if name not in ("AutoencoderKLWan", "AutoencoderKL"):
            raise ConfigError(f"validation.vae: {folder} holds a {name or 'an unknown class'}; expected "
                              "AutoencoderKLWan (Wan) or AutoencoderKL (UNet)")
        vae = getattr(diffusers, name).from_pretrained(folder, local_files_only=True)
        return vae.to(self.dist.device).eval().requires_grad_(False)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, C, F, H, W]`` latents -> ``[N, F, H, W, 3]`` float RGB in ``[0, 1]`` on the CPU."""
        if self.vae is None:
            return latent_to_rgb(latents)
        vae = self.vae
        z = latents.to(vae.device, vae.dtype)
        if type(vae).__name__ == "AutoencoderKLWan":
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
            video = vae.decode(z * std + mean, return_dict=False)[0]  # [N, 3, F', H', W']
        else:  # image VAE, frame by frame
            n, c, f, h, w = z.shape
            frames = z.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w) / vae.config.scaling_factor
            images = vae.decode(frames, return_dict=False)[0]
            video = images.reshape(n, f, *images.shape[1:]).permute(0, 2, 1, 3, 4)
        return ((video.float().cpu().permute(0, 2, 3, 4, 1) + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------------------ a run

    def run(self, step: int) -> dict | None:
        """Sample, and on rank 0 write the GIFs, log them and the reward; returns the record (rank 0).

        The GIFs are of the first seed (``validation.seed``); the reward is over all ``validation.num_seeds``
        seeds (``reward``: per prompt and seed, seed-major; ``reward_by_seed``: each seed's mean)."""
        seeds = [self.cfg.seed + k for k in range(self.cfg.num_seeds)]
        runs = [self.sample(seed) for seed in seeds]  # every rank: the sharded forwards are collective
        if not self.dist.is_main:
            return None
        all_videos = [self.decode(latents) for latents in runs]
        videos = all_videos[0]
        if self.first is None:
            self.first, self.first_step = videos, step
        self.last, self.last_step = videos, step
        folder = os.path.join(self.out, f"step-{step:06d}")
        os.makedirs(folder, exist_ok=True)
        paths = [write_gif(os.path.join(folder, f"prompt-{i:02d}.gif"), v, self.cfg.scale, self.cfg.fps)
                 for i, v in enumerate(videos)]
        from safetensors.torch import save_file

        save_file({"videos": videos.contiguous()}, os.path.join(folder, VIDEOS_FILE))  # for comparison grids
        record = {"step": step, "samples": paths, "seeds": seeds}
        if self.reward_fn is not None:
            by_seed = []
            for v in all_videos:
                scores = self.reward_fn(v, list(self.prompts))
                by_seed.append([float(s) for s in torch.as_tensor(scores, dtype=torch.float64).reshape(-1)])
            scores = [s for run in by_seed for s in run]
            record["reward"] = scores
            record["reward_by_seed"] = [sum(run) / max(1, len(run)) for run in by_seed]
            record["reward_mean"] = sum(scores) / max(1, len(scores))
            if self.first_reward is None:
                self.first_reward = record["reward_mean"]
            self.last_reward = record["reward_mean"]
        with open(os.path.join(self.out, "validation.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        self._log(step, videos, record)
        return record

    def _log(self, step: int, videos: torch.Tensor, record: dict) -> None:
        for tracker in self.metrics.trackers:
            try:
                images = {f"validation/prompt-{i:02d}": frame_strip(v, self.cfg.scale)
                          for i, v in enumerate(videos)}
                if tracker.name == "tensorboard":
                    tracker.log_images(images, step=step, dataformats="HWC")
                else:
                    tracker.log_images(images, step=step)
                if "reward_mean" in record:
                    tracker.log({"validation/reward": record["reward_mean"]}, step=step)
            except Exception as exc:  # noqa: BLE001 - a tracker failing must not stop training
                warnings.warn(f"pgdpo train: tracker {tracker.name} did not take the validation samples: "
                              f"{exc}", stacklevel=2)

    def finish(self) -> str | None:
        """Write ``before_after.png`` and its recipe ``before_after.json`` (rank 0); returns the PNG path."""
        if not self.dist.is_main or self.first is None:
            return None
        from safetensors.torch import save_file

        model = self.config.model
        start = f"{model.name} (random init)"
        if model.path:
            start = os.path.basename(os.path.normpath(model.path))
        columns = [{"label": f"step {self.first_step}: {start}", "step": self.first_step,
                    "reward": self.first_reward},
                   {"label": f"step {self.last_step}: {self.config.method.name}", "step": self.last_step,
                    "reward": self.last_reward}]
        for c in columns:
            c["videos"] = os.path.join(self.out, f"step-{c['step']:06d}", VIDEOS_FILE)
        data = None
        if self.vae is None:
            data = os.path.join(self.out, "data_chosen.safetensors")
            save_file({"videos": latent_to_rgb(self.chosen).contiguous()}, data)
        recipe = {"columns": columns, "data": data, "prompts": self.prompts, "scale": self.cfg.scale}
        with open(os.path.join(self.out, "before_after.json"), "w") as f:
            json.dump(recipe, f, indent=1)
        return write_comparison(os.path.join(self.out, "before_after.png"), recipe)


#: each validation step's first-seed RGB samples ``[N, F, H, W, 3]`` (safetensors, key ``videos``)
VIDEOS_FILE = "videos.safetensors"
#: where the held-out validation prompts of a synthetic dataset start: past the pairs of any synthetic
#: training set (pair ``i`` depends only on the seed and ``i``), the demo's base model's SFT set included
HELD_OUT_FIRST_INDEX = 1_000_000


def _holds_pairs(folder: str, n: int) -> bool:
    """Whether ``folder`` is a dataset of at least ``n`` pairs (a held-out set written for fewer prompts is
    written again)."""
    if not os.path.isfile(os.path.join(folder, META_FILE)):
        return False
    try:
        return read_meta(folder).num_pairs >= n
    except DataError:
        return False


def synthesize_held_out(config, adapter, meta, folder: str, log) -> None:
    """Write ``validation.num_prompts`` synthetic pairs of the training data's kind (``meta``: the training
    dataset's) that no training set holds (indices from :data:`HELD_OUT_FIRST_INDEX`), with the same prompt
    "words" (the data seed)."""
    data = config.data
    kind = "motion" if data.synth_kind == "motion-mix" else data.synth_kind  # chosen: the prompt's way
    log.info(f"writing {config.validation.num_prompts} held-out synthetic {kind} prompts (pairs "
             f"{HELD_OUT_FIRST_INDEX}+) to {folder}")
    synth_dataset(folder, pairs=config.validation.num_prompts, task=adapter.task,
                  latent_shape=meta.latent_shape, text_len=meta.text_len, text_dim=adapter.text_dim,
                  difference=data.synth_difference, seed=config.seed, overwrite=True, progress=False,
                  kind=kind, first_index=HELD_OUT_FIRST_INDEX, **adapter.synthetic_extras())


def write_comparison(path: str, recipe: dict) -> str:
    """The before/after grid from a ``before_after.json`` recipe: per prompt a row with one frame strip per
    column (``label``, ``videos`` file, mean validation ``reward`` in the title) and the data's chosen clip
    (``data``, when there is one)."""
    from safetensors.torch import load_file

    columns = [load_file(c["videos"])["videos"] for c in recipe["columns"]]
    labels = [c["label"] if c.get("reward") is None else f"{c['label']}\nreward {c['reward']:+.2f}"
              for c in recipe["columns"]]
    if recipe.get("data"):
        columns.append(load_file(recipe["data"])["videos"])
        labels.append("data: chosen")
    rows = [[videos[i] for videos in columns] for i in range(columns[0].shape[0])]
    return write_grid(path, rows, labels, recipe["prompts"], recipe.get("scale", 1))


# ---------------------------------------------------------------------------------------------- images


def _to_uint8(frames: torch.Tensor, scale: int):
    """``[F, H, W, 3]`` in [0, 1] -> uint8 numpy ``[F, H*scale, W*scale, 3]`` (nearest upscaling)."""
    x = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return x.numpy()


def write_gif(path: str, frames: torch.Tensor, scale: int = 1, fps: int = 4) -> str:
    """An animated GIF of ``[F, H, W, 3]`` frames in [0, 1], looping."""
    from PIL import Image

    images = [Image.fromarray(f) for f in _to_uint8(frames, scale)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / max(fps, 1)), loop=0)
    return path


def frame_strip(frames: torch.Tensor, scale: int = 1, gap: int = 2):
    """``[H, F*W + gaps, 3]`` uint8: the frames side by side (for trackers and the grid)."""
    x = _to_uint8(frames, scale)
    f, h, w, _ = x.shape
    strip = np.full((h, f * w + (f - 1) * gap, 3), 255, dtype=np.uint8)
    for i in range(f):
        strip[:, i * (w + gap): i * (w + gap) + w] = x[i]
    return strip


def write_grid(path: str, rows: list[list[torch.Tensor]], labels: list[str], prompts: list, scale: int):
    """A PNG: one row per prompt, one frame strip per column (``labels`` on top, prompts at the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, m = len(rows), len(rows[0])
    fig, axes = plt.subplots(n, m, figsize=(3.2 * m, 1.4 * n + 0.6), squeeze=False)
    for i, row in enumerate(rows):
        for j, frames in enumerate(row):
            ax = axes[i][j]
            ax.imshow(frame_strip(frames, scale))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(labels[j], fontsize=9)
            if j == 0:  # horizontal and wrapped: a rotated label is longer than a row of frame strips
                ax.set_ylabel(textwrap.fill((prompts[i] or f"prompt {i}")[:60], 18), fontsize=7, rotation=0,
                              ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
