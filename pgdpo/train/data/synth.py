"""Synthetic preference datasets: seeded latents, for the demo, tests and throughput runs without videos.

Two kinds; per pair ``i`` the generator is seeded with ``(seed, i)``, so pair ``i`` does not depend on how
many pairs are made.

``kind="motion"`` (the demo's: a preference a model can learn and a person can see): a coloured blob
(a Gaussian in space, whose channel vector previews as orange through :mod:`pgdpo.train.preview`) on a faint
noise background, moving over the latent frames. The prompt names a direction (right, left, down, up:
a fixed random "word" embedding per direction on the first token rows, plus per-pair noise). In
``chosen`` the blob moves smoothly in the prompt's direction along a path centred on the frame (so it
starts on the side it comes from); in ``rejected``, from the same start, it jitters in place (options:
``rejected="walk"`` a random walk, ``wrong_fraction`` of the pairs moving another way). Chosen and
rejected share the background (faint noise plus a fixed layout the preview does not show,
:func:`position_code`: it lets the relative-position transformer tell where the blob is), so a pair
differs only in the motion. Scores 1 and 0. On the demo's
randomly initialised tiny model this is learnt in about 100 steps; with the path's start independent of
the direction (only the prompt telling it), it was not learnt in 250 steps (implicit accuracy stayed
below 0.5): the tiny model is slow to learn the text conditioning.

``kind="motion-wrong"``: the same, the rejected blob moving another way instead of jittering.
``kind="motion-mix"`` (the SFT data of the demo's base model, ``models/demo-base``): the motion pairs with
chosen and rejected swapped in :data:`MIX_JITTER_FRACTION` of them, so the first clips move the prompt's
way or jitter. ``first_index`` writes a later slice of the same sequence (held-out prompts).

``kind="random"``:

- ``chosen`` ~ N(0, 1) of ``[C, F, H, W]`` (unit variance, like normalised Wan latents);
- ``rejected = sqrt(1 - d^2) * chosen + d * noise``: unit variance, correlation ``sqrt(1 - d^2)`` with
  chosen, ``E||chosen - rejected||^2 / numel ~ 2 - 2 sqrt(1 - d^2)``; ``d = difference`` in ``[0, 1]``;
- ``encoder_hidden_states`` ~ N(0, 1) of ``[L, D]`` on the first ``n`` token rows and zero after them
  (``n`` uniform in ``[1, L]``), like a zero-padded UMT5 embedding;
- scores 1 and ``1 - d`` (margin ``d``);
- i2v: ``image_condition`` = 4 mask channels (1 on the first latent frame, 0 after it) and the chosen
  latent's first frame (zeros after it), the Wan2.1 I2V layout; ``encoder_hidden_states_image`` ~ N(0, 1).
"""

from __future__ import annotations

import math
import os

import torch

from ..preview import latent_rgb_factors, rgb_to_latent
from .format import MASK_CHANNELS, DatasetMeta
from .writer import DatasetWriter

KINDS = ("random", "motion", "motion-wrong", "motion-mix")
#: the motion dataset's prompt directions: name -> (dy, dx) per latent frame, in latent pixels
DIRECTIONS = {"right": (0.0, 1.0), "left": (0.0, -1.0), "down": (1.0, 0.0), "up": (-1.0, 0.0)}
#: the kinds of blob clips: ``motion`` (rejected jitters), ``motion-wrong`` (rejected moves another way),
#: ``motion-mix`` (``motion`` with chosen and rejected swapped in a fraction of the pairs)
MOTION_KINDS = ("motion", "motion-wrong", "motion-mix")
#: ``kind="motion-mix"`` (the demo base model's SFT data): the fraction of clips in which the blob jitters
MIX_JITTER_FRACTION = 0.5
#: RGB (in [0, 1]) of the blob's centre in the latent preview
BLOB_RGB = (1.0, 0.55, 0.1)
#: amplitude of the motion clips' fixed "scene layout" (:func:`position_code`). Wan's transformer knows
#: positions only relative to each other (RoPE), so a model sampling from noise cannot tell where in the
#: frame it is, nor which frame comes first: the prompt's direction, tied to where the blob starts, was
#: barely learnt (swapping "right" for "left" moved the demo base model's prediction by 1-4%, its samples'
#: reward against the prompt about 0.02 after 600 SFT steps on motion clips). With the code in every clip
#: (a fixed background, as a real scene has a layout) the same 600 steps reach 0.98 (amplitude 2; 0.77
#: with 1).
POSITION_CODE_AMPLITUDE = 2.0


def _blob(c: int, f: int, h: int, w: int, centres: torch.Tensor, radius: float, color: torch.Tensor):
    """``[C, F, H, W]``: per frame a Gaussian of ``radius`` at ``centres[t] = (y, x)`` (wrapping around the
    frame edges, so the motion never stops at a border) times the channel vector ``color``."""
    ys = torch.arange(h, dtype=torch.float32).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w)
    frames = []
    for t in range(f):
        cy, cx = float(centres[t, 0]), float(centres[t, 1])
        dy = torch.remainder(ys - cy + h / 2, h) - h / 2
        dx = torch.remainder(xs - cx + w / 2, w) - w / 2
        frames.append(torch.exp(-(dy ** 2 + dx ** 2) / (2 * radius ** 2)))
    g = torch.stack(frames)  # [F, H, W]
    return color.view(c, 1, 1, 1) * g.unsqueeze(0)


def position_code(c: int, f: int, h: int, w: int, amplitude: float = POSITION_CODE_AMPLITUDE) -> torch.Tensor:
    """``[C, F, H, W]``: the motion clips' fixed background, invisible in the latent preview.

    Sines and cosines of x and y (one period across the frame) and a ramp over the frames, each on its own
    latent channel direction in the null space of the preview's RGB factors (so the preview, the GIFs and
    the motion reward do not see it): a coordinate frame the model draws along with the clip and then
    places the blob by. Fewer patterns with fewer than 4 spare channel directions; none with 3 channels
    or fewer."""
    factors, _ = latent_rgb_factors(c)
    basis, _, _ = torch.linalg.svd(factors)  # [C, C]: columns 3.. span the preview's null space
    null = basis[:, 3:]
    ys = torch.arange(h, dtype=torch.float32) * (2 * math.pi / h)
    xs = torch.arange(w, dtype=torch.float32) * (2 * math.pi / w)
    ramp = torch.linspace(-1.0, 1.0, f) if f > 1 else torch.zeros(1)
    patterns = [torch.sin(xs).view(1, 1, w), torch.cos(xs).view(1, 1, w), torch.sin(ys).view(1, h, 1),
                torch.cos(ys).view(1, h, 1), ramp.view(f, 1, 1)]
    code = torch.zeros(c, f, h, w)
    for k, pattern in enumerate(patterns[:null.shape[1]]):
        code += amplitude * null[:, k].view(c, 1, 1, 1) * pattern.expand(f, h, w)
    return code


def direction_embedding(direction: str, text_len: int, text_dim: int, seed: int) -> torch.Tensor:
    """The fixed ``[text_len, text_dim]`` "prompt embedding" of a direction (zero past its tokens)."""
    k = list(DIRECTIONS).index(direction)
    gen = torch.Generator().manual_seed((int(seed) * 7_919 + 104_729 * (k + 1)) % (2 ** 63))
    text = torch.randn(text_len, text_dim, generator=gen)
    text[max(1, text_len // 2):] = 0
    return text


def motion_pair(index: int, *, latent_shape, text_len: int, text_dim: int, seed: int,
                speed: float | None = None, radius: float | None = None, background: float = 0.1,
                amplitude: float = 3.0, start_spread: float = 0.0, wrong_fraction: float = 0.0,
                directions: tuple[str, ...] | None = None, rejected: str = "jitter") -> dict:
    """Tensors (float32), prompt and scores of pair ``index`` of the ``kind="motion"`` dataset."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))
    c, f, h, w = (int(s) for s in latent_shape)
    speed = max(1.0, min(h, w) / max(2 * (f - 1), 1)) if speed is None else float(speed)
    radius = max(0.8, min(h, w) / 8) if radius is None else float(radius)
    names = list(directions or DIRECTIONS)
    direction = names[int(torch.randint(len(names), (1,), generator=gen))]
    centre = torch.tensor([h / 2.0, w / 2.0])
    # The path is centred on the frame: it starts behind the centre (seen from its direction), ends past it.
    offset = -0.5 * speed * (f - 1) * torch.tensor(DIRECTIONS[direction])
    start = centre + offset + start_spread * (torch.rand(2, generator=gen) * 2 - 1)
    steps = torch.arange(f, dtype=torch.float32).view(f, 1)
    good = start + speed * steps * torch.tensor(DIRECTIONS[direction])
    if float(torch.rand(1, generator=gen)) < wrong_fraction:  # a wrong direction
        others = [n for n in DIRECTIONS if n != direction]
        wrong = others[int(torch.randint(len(others), (1,), generator=gen))]
        bad = start + speed * steps * torch.tensor(DIRECTIONS[wrong])
        how = f"moves {wrong}"
    elif rejected == "walk":  # a random walk: steps of the chosen speed in random directions
        angles = torch.rand(f - 1, generator=gen) * (2 * math.pi)
        walk = speed * torch.stack([torch.sin(angles), torch.cos(angles)], dim=1)
        bad = start + torch.cat([torch.zeros(1, 2), walk.cumsum(0)])
        how = "wanders"
    else:  # jitter around the start
        bad = start + speed * (torch.rand(f, 2, generator=gen) * 2 - 1)
        bad[0] = start
        how = "jitters"
    color = amplitude * rgb_to_latent(torch.tensor(BLOB_RGB), c)
    back = background * torch.randn(c, f, h, w, generator=gen) + position_code(c, f, h, w)
    chosen = back + _blob(c, f, h, w, good, radius, color)
    rejected = back + _blob(c, f, h, w, bad, radius, color)
    text = direction_embedding(direction, text_len, text_dim, seed)
    text = text + 0.1 * torch.randn(text_len, text_dim, generator=gen) * (text != 0)
    return {"chosen": chosen, "rejected": rejected, "encoder_hidden_states": text, "score_chosen": 1.0,
            "score_rejected": 0.0, "prompt": f"an orange ball moving {direction}", "rejected_motion": how}


def synth_pair(index: int, *, task: str, latent_shape, text_len: int, text_dim: int, difference: float,
               seed: int, image_len: int = 257, image_dim: int = 1280) -> dict:
    """Tensors (float32) and scores of synthetic pair ``index``."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))
    c, f, h, w = (int(s) for s in latent_shape)
    chosen = torch.randn(c, f, h, w, generator=gen)
    noise = torch.randn(c, f, h, w, generator=gen)
    rejected = math.sqrt(1.0 - difference ** 2) * chosen + difference * noise
    text = torch.randn(text_len, text_dim, generator=gen)
    used = int(torch.randint(1, text_len + 1, (1,), generator=gen))
    text[used:] = 0
    out = {"chosen": chosen, "rejected": rejected, "encoder_hidden_states": text,
           "score_chosen": 1.0, "score_rejected": 1.0 - difference}
    if task == "i2v":
        mask = torch.zeros(MASK_CHANNELS, f, h, w)
        mask[:, 0] = 1.0
        first = torch.zeros(c, f, h, w)
        first[:, 0] = chosen[:, 0]
        out["image_condition"] = torch.cat([mask, first], dim=0)
        out["encoder_hidden_states_image"] = torch.randn(image_len, image_dim, generator=gen)
    return out


def synth_dataset(out: str | os.PathLike, *, pairs: int, task: str = "t2v", latent_shape=(16, 3, 8, 8),
                  text_len: int = 16, text_dim: int = 32, difference: float = 0.5, seed: int = 0,
                  image_len: int = 257, image_dim: int = 1280, dtype: torch.dtype | str = torch.float32,
                  shard_size: int = 64, overwrite: bool = False, progress: bool = True,
                  kind: str = "random", first_index: int = 0) -> DatasetMeta:
    """Write ``pairs`` synthetic pairs of ``kind`` (:data:`KINDS`) to the folder ``out``; returns its meta.

    ``first_index``: the pairs are ``first_index .. first_index + pairs - 1`` of the kind's sequence (pair
    ``i`` depends only on ``seed`` and ``i``): a held-out set is the same kind from an index past the
    training pairs (same prompt "words", new per-pair noise, backgrounds and starts)."""
    from tqdm.auto import tqdm

    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if not 0.0 <= difference <= 1.0:
        raise ValueError(f"difference must be in [0, 1], got {difference}")
    latent_shape = [int(s) for s in latent_shape]
    if len(latent_shape) != 4 or min(latent_shape) < 1:
        raise ValueError(f"latent_shape must be 4 positive integers C,F,H,W, got {latent_shape}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    source = {"kind": "synthetic", "seed": seed, "difference": difference}
    if kind in MOTION_KINDS:
        source = {"kind": f"synthetic-{kind}", "seed": seed, "directions": list(DIRECTIONS),
                  "first_index": first_index}
    with DatasetWriter(out, task=task, latent_shape=latent_shape, text_len=text_len, text_dim=text_dim,
                       dtype=dtype, image_embed_shape=[image_len, image_dim] if task == "i2v" else None,
                       shard_size=shard_size, source=source, overwrite=overwrite) as writer:
        for i in tqdm(range(first_index, first_index + pairs), desc="synth pairs", unit="pair",
                      disable=not progress):
            if kind in MOTION_KINDS:
                pair = motion_pair(i, latent_shape=latent_shape, text_len=text_len, text_dim=text_dim,
                                   seed=seed, wrong_fraction=1.0 if kind == "motion-wrong" else 0.0)
                pair.pop("rejected_motion")
                if kind == "motion-mix" and _mix_swapped(i, seed):  # this pair's clip jitters
                    pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
                    pair["score_chosen"], pair["score_rejected"] = 0.0, 1.0
                if task == "i2v":
                    extra = synth_pair(i, task=task, latent_shape=latent_shape, text_len=text_len,
                                       text_dim=text_dim, difference=difference, seed=seed,
                                       image_len=image_len, image_dim=image_dim)
                    mask = extra["image_condition"][:MASK_CHANNELS]
                    first = torch.zeros_like(pair["chosen"])
                    first[:, 0] = pair["chosen"][:, 0]
                    pair["image_condition"] = torch.cat([mask, first], dim=0)
                    pair["encoder_hidden_states_image"] = extra["encoder_hidden_states_image"]
                writer.add(prompt_id=f"motion-{i}", **pair)
                continue
            pair = synth_pair(i, task=task, latent_shape=latent_shape, text_len=text_len, text_dim=text_dim,
                              difference=difference, seed=seed, image_len=image_len, image_dim=image_dim)
            writer.add(prompt_id=f"synth-{i}", prompt=f"synthetic prompt {i}", **pair)
    return writer.meta


def _mix_swapped(index: int, seed: int) -> bool:
    """``kind="motion-mix"``: whether pair ``index``'s first clip is the jittering one (a fair coin per pair,
    from its own generator, so it does not depend on how many pairs are made)."""
    gen = torch.Generator().manual_seed((int(seed) * 2_000_029 + 7 * int(index) + 1) % (2 ** 63))
    return float(torch.rand(1, generator=gen)) < MIX_JITTER_FRACTION


def motion_reward(videos: torch.Tensor, prompts: list) -> torch.Tensor:
    """A reward for the ``kind="motion"`` demo (``validation.reward: pgdpo.train.data.synth:motion_reward``).

    ``videos`` ``[N, F, H, W, 3]`` in ``[0, 1]`` (latent previews or decoded), ``prompts`` their prompt
    strings ("... moving right"). Per video: the blob's centre per frame (circular mean of the orange-ness
    ``max(R - B - 0.2, 0)``, so a blob wrapping around an edge is followed), the frame-to-frame steps,
    and the score ``sum(step . direction) / sum(|step|)`` in ``[-1, 1]``: 1 for straight motion the
    prompt's way, about 0 for jitter or no blob, -1 for the opposite way. Prompts without a direction score 0.
    """
    n, f, h, w, _ = videos.shape
    weight = (videos[..., 0] - videos[..., 2] - 0.2).clamp(min=0) + 1e-6  # [N, F, H, W]
    scores = []
    for i in range(n):
        direction = next((d for d in DIRECTIONS if prompts[i] and prompts[i].endswith(d)), None)
        if direction is None or f < 2:
            scores.append(0.0)
            continue
        centres = []
        for t in range(f):
            wt = weight[i, t]
            cy = _circular_mean(wt.sum(1), h)
            cx = _circular_mean(wt.sum(0), w)
            centres.append((cy, cx))
        steps = [((centres[t + 1][0] - centres[t][0] + h / 2) % h - h / 2,
                  (centres[t + 1][1] - centres[t][1] + w / 2) % w - w / 2) for t in range(f - 1)]
        dy, dx = DIRECTIONS[direction]
        along = sum(s[0] * dy + s[1] * dx for s in steps)
        travelled = sum(math.hypot(*s) for s in steps)
        scores.append(0.0 if travelled < 1e-3 else along / travelled)
    return torch.tensor(scores)


def _circular_mean(mass: torch.Tensor, size: int) -> float:
    angle = torch.arange(size, dtype=torch.float32) * (2 * math.pi / size)
    s, c = float((mass * torch.sin(angle)).sum()), float((mass * torch.cos(angle)).sum())
    return (math.atan2(s, c) % (2 * math.pi)) * size / (2 * math.pi)
