"""``python -m bench.demo_conditioning MODEL_DIR [...]``: how much a demo model follows the prompt (issue 27).

For each diffusers folder given (the base model ``models/demo-base``, a run's ``final/``): (1) the relative
change of its prediction when the prompt "right" is swapped for "left" (same noisy held-out clip, sigma
0.95 / 0.8 / 0.5); (2) 32 held-out prompts (pairs 1,000,000+) sampled from seed 0 (20 Euler steps, the
demo's flow schedule): the motion reward against the prompt, and against the best of the four directions
(a blob that moves consistently, whichever way, scores high there; jitter about 0.2).
"""

from __future__ import annotations

import json
import sys

import torch

SHAPE = (16, 5, 8, 8)
N = 32


def measure(folder: str) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from pgdpo.train.data.synth import DIRECTIONS, direction_embedding, motion_pair, motion_reward
    from pgdpo.train.preview import latent_to_rgb
    from pgdpo.train.validation import HELD_OUT_FIRST_INDEX

    model = WanTransformer3DModel.from_pretrained(folder, local_files_only=True).eval()
    pairs = [motion_pair(HELD_OUT_FIRST_INDEX + i, latent_shape=SHAPE, text_len=16, text_dim=32, seed=0)
             for i in range(N)]
    text = torch.stack([p["encoder_hidden_states"] for p in pairs])
    prompts = [p["prompt"] for p in pairs]
    out = {"model": folder, "text_swap_change": {}}
    eps = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for sigma in (0.95, 0.8, 0.5):
            xt = (1 - sigma) * pairs[0]["chosen"][None] + sigma * eps
            pred = {d: model(xt, torch.tensor([sigma * 1000]), direction_embedding(d, 16, 32, 0)[None],
                             return_dict=False)[0] for d in ("right", "left")}
            out["text_swap_change"][str(sigma)] = float((pred["right"] - pred["left"]).norm()
                                                        / pred["right"].norm())
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(20)
        x = torch.randn((N, *SHAPE), generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(N), text, return_dict=False)[0], t, x).prev_sample
    rgb = latent_to_rgb(x)
    by_direction = torch.stack([motion_reward(rgb, [f"x {d}"] * N) for d in DIRECTIONS])
    jitter = latent_to_rgb(torch.stack([p["rejected"] for p in pairs]))
    jitter_best = torch.stack([motion_reward(jitter, [f"x {d}"] * N) for d in DIRECTIONS]).amax(0)
    out.update(reward=float(motion_reward(rgb, prompts).mean()),
               best_direction_reward=float(by_direction.amax(0).mean()),
               jitter_best_direction_reward=float(jitter_best.mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    folders = list(sys.argv[1:] if argv is None else argv) or ["models/demo-base"]
    torch.set_num_threads(1)
    for folder in folders:
        print(json.dumps(measure(folder)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
