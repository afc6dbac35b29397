"""Preference datasets: format round trip, rank sharding, resume, validation errors, pairs, encode."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from pgdpo.train.data import (
    DataError,
    PreferenceDataset,
    check_compatible,
    collate,
    make_pairs,
    read_meta,
    synth_dataset,
    validate_dataset,
)
from pgdpo.train.data.synth import synth_pair

SHAPE = (16, 3, 4, 4)


def _synth(path, pairs, task="t2v", shard_size=6, dtype=torch.float32, **kw):
    kw = {"latent_shape": SHAPE, "text_len": 8, "text_dim": 32, "seed": 7, **kw}
    if task == "i2v":
        kw = {"image_len": 5, "image_dim": 24, **kw}
    synth_dataset(path, pairs=pairs, task=task, shard_size=shard_size, dtype=dtype, progress=False, **kw)
    return path


@pytest.fixture(scope="module")
def ds20(tmp_path_factory):
    return _synth(tmp_path_factory.mktemp("ds") / "d20", 20)


def _ids(loader):
    return [b["pair_id"].tolist() for b in loader]


# ------------------------------------------------------------------------------------------ round trip


def test_synth_round_trip_shapes_dtypes_and_values(ds20):
    loader = PreferenceDataset(ds20, batch_size=4, seed=1, with_ids=True)
    assert len(loader) == 5 and loader.num_pairs == 20 and len(loader.shards) == 4
    seen = []
    for batch in loader:
        assert set(batch) == {"chosen", "rejected", "encoder_hidden_states", "pair_id", "margin"}
        assert batch["chosen"].shape == (4, *SHAPE) and batch["rejected"].shape == (4, *SHAPE)
        assert batch["encoder_hidden_states"].shape == (4, 8, 32)
        assert batch["chosen"].dtype == torch.float32
        for row, pair in enumerate(batch["pair_id"].tolist()):
            want = synth_pair(pair, task="t2v", latent_shape=SHAPE, text_len=8, text_dim=32,
                              difference=0.5, seed=7)
            for key in ("chosen", "rejected", "encoder_hidden_states"):
                assert torch.equal(batch[key][row], want[key]), (pair, key)
            assert batch["margin"][row].item() == pytest.approx(0.5)
        seen += batch["pair_id"].tolist()
    assert sorted(seen) == list(range(20))
    # default batches are exactly the PreferenceStep format
    plain = next(iter(PreferenceDataset(ds20, batch_size=2)))
    assert set(plain) == {"chosen", "rejected", "encoder_hidden_states"}


def test_bf16_storage_and_cast(tmp_path):
    path = _synth(tmp_path / "bf", 4, dtype=torch.bfloat16)
    assert read_meta(path).dtype == "bfloat16"
    batch = next(iter(PreferenceDataset(path, batch_size=2, shuffle=False)))
    assert batch["chosen"].dtype == torch.bfloat16
    want = synth_pair(0, task="t2v", latent_shape=SHAPE, text_len=8, text_dim=32, difference=0.5, seed=7)
    assert torch.equal(batch["chosen"][0], want["chosen"].bfloat16())
    cast = next(iter(PreferenceDataset(path, batch_size=2, dtype=torch.float32)))
    assert cast["chosen"].dtype == torch.float32


def test_i2v_round_trip_and_compatible_with_tiny_wan_i2v(tmp_path):
    path = _synth(tmp_path / "i2v", 4, task="i2v")
    batch = next(iter(PreferenceDataset(path, batch_size=2, shuffle=False)))
    assert batch["image_condition"].shape == (2, 20, *SHAPE[1:])
    assert batch["encoder_hidden_states_image"].shape == (2, 5, 24)
    mask = batch["image_condition"][:, :4]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)
    assert torch.equal(batch["image_condition"][:, 4:, 0], batch["chosen"][:, :, 0])
    check_compatible(read_meta(path), "tiny-wan-i2v")  # no error


def test_collate_rejects_mismatched_samples():
    a = {"chosen": torch.zeros(2, 1), "rejected": torch.zeros(2, 1), "encoder_hidden_states": torch.zeros(3, 4)}
    b = dict(a, chosen=torch.zeros(3, 1))
    assert collate([a, a])["chosen"].shape == (2, 2, 1)
    with pytest.raises(ValueError, match="sample 1 field 'chosen'"):
        collate([a, b])


# ------------------------------------------------------------------------------------------ ranks, epochs


def test_rank_sharding_disjoint_complete_and_equal(ds20):
    # 20 pairs, 2 ranks x 5 pairs = global batch 10: divides, so every pair once.
    per_rank = [_ids(PreferenceDataset(ds20, batch_size=5, rank=r, world_size=2, seed=3, with_ids=True))
                for r in range(2)]
    flat = [sorted(p for b in ids for p in b) for ids in per_rank]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert not set(flat[0]) & set(flat[1])
    assert sorted(flat[0] + flat[1]) == list(range(20))
    # 20 pairs over 3 ranks x 2: drop_last -> 3 batches each, disjoint; pad -> 4 each, every pair seen.
    dropped = [_ids(PreferenceDataset(ds20, batch_size=2, rank=r, world_size=3, seed=3, with_ids=True))
               for r in range(3)]
    assert [len(x) for x in dropped] == [3, 3, 3]
    pairs = [p for ids in dropped for b in ids for p in b]
    assert len(pairs) == len(set(pairs)) == 18
    padded = [_ids(PreferenceDataset(ds20, batch_size=2, rank=r, world_size=3, seed=3, drop_last=False,
                                     with_ids=True)) for r in range(3)]
    assert [len(x) for x in padded] == [4, 4, 4]
    assert {p for ids in padded for b in ids for p in b} == set(range(20))


def test_shuffle_is_seeded_per_epoch(ds20):
    a = PreferenceDataset(ds20, batch_size=4, seed=5)
    b = PreferenceDataset(ds20, batch_size=4, seed=5)
    c = PreferenceDataset(ds20, batch_size=4, seed=6)
    assert a.epoch_batches(0) == b.epoch_batches(0) and a.epoch_batches(1) == b.epoch_batches(1)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(0) != c.epoch_batches(0)
    assert PreferenceDataset(ds20, batch_size=4, shuffle=False).epoch_batches(3)[0] == [0, 1, 2, 3]


def _run(loader, n):
    out = []
    for batch in loader.stream():
        out.append(batch)
        if len(out) == n:
            return out


@pytest.mark.parametrize("stop", [3, 5, 7])  # mid-epoch, at the epoch boundary, in the second epoch
def test_resume_mid_epoch_yields_the_same_batches(ds20, stop):
    def make(**kw):
        return PreferenceDataset(ds20, batch_size=2, rank=1, world_size=2, seed=11, with_ids=True, **kw)

    full = _run(make(), 12)  # 5 batches per epoch: 2.4 epochs
    first = make()
    head = _run(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # it is plain JSON
    resumed = make()
    resumed.load_state_dict(state)
    tail = _run(resumed, 12 - stop)
    for got, want in zip(head + tail, full):
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), key


def test_resume_with_same_global_batch_on_other_world_size(ds20):
    old = [PreferenceDataset(ds20, batch_size=2, rank=r, world_size=2, seed=2, with_ids=True) for r in range(2)]
    for loader in old:
        _run(loader, 1)
    state = old[0].state_dict()
    new = [PreferenceDataset(ds20, batch_size=1, rank=r, world_size=4, seed=2, with_ids=True) for r in range(4)]
    for loader in new:
        loader.load_state_dict(state)
    want = {p for loader in old for p in next(iter(loader))["pair_id"].tolist()}
    got = {p for loader in new for p in next(iter(loader))["pair_id"].tolist()}
    assert got == want and len(got) == 4
    with pytest.raises(ValueError, match="seed"):
        PreferenceDataset(ds20, batch_size=2, world_size=2, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        PreferenceDataset(ds20, batch_size=3, world_size=2, seed=2).load_state_dict(state)


def test_resume_on_another_split_of_the_step(ds20):
    """4 ranks x 1 pair x 2 micro-batches per step -> 2 ranks x 1 pair x 4 (step_pairs 8): the epoch is cut
    to whole steps (16 of 20 pairs) whatever the split, and a saved position (a global pair index)
    continues with the pairs the 4-rank run would have had next, into the next epoch."""
    def step_pairs(loaders, micro):
        return [p for loader in loaders for _ in range(micro) for p in next(loader)["pair_id"].tolist()]

    four = [PreferenceDataset(ds20, batch_size=1, rank=r, world_size=4, seed=5, with_ids=True, step_pairs=8)
            for r in range(4)]
    assert len(four[0]) == 4  # 2 steps of 2 micro-batches: 16 pairs, 4 dropped
    streams = [loader.stream() for loader in four]
    steps = [step_pairs(streams, 2) for _ in range(4)]  # two epochs
    assert [sorted(s) for s in steps[:2]] == [sorted(four[0].global_order(0)[:8]),
                                              sorted(four[0].global_order(0)[8:16])]
    for saved_after in (1, 2, 3):  # mid-epoch, at the epoch's end, in the second epoch
        ran = [PreferenceDataset(ds20, batch_size=1, rank=r, world_size=4, seed=5, with_ids=True,
                                 step_pairs=8) for r in range(4)]
        ran_streams = [loader.stream() for loader in ran]
        for _ in range(saved_after):
            step_pairs(ran_streams, 2)
        state = json.loads(json.dumps(ran[1].state_dict()))
        two = [PreferenceDataset(ds20, batch_size=1, rank=r, world_size=2, seed=5, with_ids=True, step_pairs=8)
               for r in range(2)]
        for loader in two:
            loader.load_state_dict(state)
        got = step_pairs([loader.stream() for loader in two], 4)
        assert sorted(got) == sorted(steps[saved_after]), saved_after
    with pytest.raises(ValueError, match="pairs per step"):  # another step size: the order would differ
        PreferenceDataset(ds20, batch_size=1, world_size=2, seed=5, step_pairs=4).load_state_dict(state)


# ------------------------------------------------------------------------------------------ validation


@pytest.fixture
def ds_copy(ds20, tmp_path):
    return shutil.copytree(ds20, tmp_path / "copy")


def test_corrupt_shard_names_the_file(ds_copy):
    shard = ds_copy / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = b"\xff" * 8  # header length: garbage
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00001.safetensors.*corrupt or truncated"):
        PreferenceDataset(ds_copy, batch_size=2)


def test_truncated_shard_names_the_file(ds_copy):
    shard = ds_copy / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="shard-00002.safetensors.*corrupt or truncated"):
        validate_dataset(ds_copy)
    # without the start-up check the error comes when the shard is first read, naming it too
    loader = PreferenceDataset(ds_copy, batch_size=20, validate=False)
    with pytest.raises(DataError, match="shard-00002.safetensors"):
        next(iter(loader))


def test_missing_files_are_named(ds_copy):
    (ds_copy / "shard-00003.safetensors").unlink()
    with pytest.raises(DataError, match="shard-00003.safetensors: shard file is missing"):
        PreferenceDataset(ds_copy, batch_size=2)
    (ds_copy / "dataset.json").unlink()
    with pytest.raises(DataError, match="dataset.json: missing"):
        PreferenceDataset(ds_copy, batch_size=2)


def test_index_entry_disagreeing_with_meta_is_named(ds_copy):
    index = ds_copy / "index.jsonl"
    lines = index.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["shapes"]["chosen"] = [16, 3, 4, 8]
    lines[2] = json.dumps(entry)
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"index.jsonl:3: shape of 'chosen' is \[16, 3, 4, 8\] but dataset.json"):
        PreferenceDataset(ds_copy, batch_size=2)


def test_shard_tensor_disagreeing_with_index_is_named(ds_copy):
    from safetensors.torch import load_file, save_file

    shard = ds_copy / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    tensors["00000004.rejected"] = torch.zeros(16, 3, 4, 5)
    save_file(tensors, str(shard))
    with pytest.raises(DataError, match="shard-00000.safetensors: tensor '00000004.rejected' is float32"):
        PreferenceDataset(ds_copy, batch_size=2)


def test_check_compatible_names_each_mismatch(ds20):
    meta = read_meta(ds20)
    check_compatible(meta, "tiny-wan-t2v")  # 16 channels, text dim 32
    with pytest.raises(DataError, match="task: the dataset is t2v but the model"):
        check_compatible(meta, "tiny-wan-i2v")
    with pytest.raises(DataError, match="text dim: dataset text_dim = 32, model text_dim = 4096"):
        check_compatible(meta, "wan2.1-t2v-14b")
    with pytest.raises(DataError, match="latent channels: dataset latent_shape\\[0\\] = 16, model has 4"):
        check_compatible(str(ds20), "tiny-unet3d")


# ------------------------------------------------------------------------------------------ CLI: synth, pairs


def test_cli_synth_and_check(tmp_path, capsys):
    from pgdpo.cli import main

    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--pairs", "5", "--task", "i2v", "--latent-shape",
                 "16,1,2,2", "--text-len", "4", "--text-dim", "8", "--image-len", "3", "--image-dim", "6",
                 "--shard-size", "2"]) == 0
    meta = read_meta(out)
    assert (meta.num_pairs, meta.num_shards, meta.image_condition_shape) == (5, 3, [20, 1, 2, 2])
    assert main(["data", "check", str(out), "--deep"]) == 0
    assert main(["data", "synth", "--out", str(out), "--pairs", "5"]) == 1  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err
    (out / "shard-00001.safetensors").write_bytes(b"garbage")
    assert main(["data", "check", str(out)]) == 1
    assert "shard-00001.safetensors" in capsys.readouterr().err


def _scores(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_best_vs_worst_min_margin_ties(tmp_path, capsys):
    from pgdpo.cli import main

    rows = [{"prompt_id": "a", "prompt": "cat", "video": f"a{i}.npy", "score": s} for i, s in enumerate([.2, .9, .5, .1])]
    rows += [{"prompt_id": "b", "prompt": "dog", "video": f"b{i}.npy", "score": s} for i, s in enumerate([.4, .45])]
    rows += [{"prompt_id": "c", "prompt": "cow", "video": "c0.npy", "score": .3}]
    rows += [{"prompt_id": "d", "prompt": "owl", "video": f"d{i}.npy", "score": .7} for i in range(3)]
    scores = _scores(tmp_path / "scores.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "pairs", "--scores", str(scores), "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prompt_id"] for p in pairs] == ["a", "b"]
    assert pairs[0]["chosen"] == {"video": "a1.npy", "score": .9}
    assert pairs[0]["rejected"] == {"video": "a3.npy", "score": .1}
    assert pairs[0]["margin"] == pytest.approx(.8) and pairs[0]["num_generations"] == 4
    report = capsys.readouterr().out
    assert "-> 2 pairs" in report and "1 prompt(s) with one generation, 1 tie(s), 0 below" in report
    assert main(["data", "pairs", "--scores", str(scores), "--out", str(out), "--min-margin", "0.1"]) == 0
    assert [json.loads(line)["prompt_id"] for line in out.read_text().splitlines()] == ["a"]
    assert "1 below the minimum margin" in capsys.readouterr().out


def test_pairs_written_elsewhere_keep_pointing_at_the_videos(tmp_path):
    """Relative video and image paths of the scores file are relative to its folder; pairs written to
    another folder get paths relative to theirs (what `pgdpo data encode` resolves), absolute ones stay."""
    from pgdpo.cli import main

    gen = tmp_path / "gen"
    gen.mkdir()
    rows = [{"prompt_id": "a", "prompt": "cat", "video": f"videos/a{i}.npy", "score": s, "image": "img/a.png"}
            for i, s in enumerate([.2, .9])]
    rows += [{"prompt_id": "b", "prompt": "dog", "video": str(tmp_path / f"abs{i}.npy"), "score": s}
             for i, s in enumerate([.1, .3])]
    scores = _scores(gen / "scores.jsonl", rows)
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "elsewhere" / "pairs.jsonl"
    assert main(["data", "pairs", "--scores", str(scores), "--out", str(out)]) == 0
    a, b = [json.loads(line) for line in out.read_text().splitlines()]
    assert a["chosen"]["video"] == os.path.join("..", "gen", "videos", "a1.npy")
    assert (out.parent / a["rejected"]["video"]).resolve() == (gen / "videos" / "a0.npy").resolve()
    assert a["image"] == os.path.join("..", "gen", "img", "a.png")
    assert b["chosen"]["video"] == str(tmp_path / "abs1.npy")


def test_pairs_score_key_and_errors(tmp_path):
    from pgdpo.train.data import read_scores

    rows = [{"prompt": "cat", "video": "x.npy", "scores": {"Overall": 1.5}},
            {"prompt": "cat", "video": "y.npy", "scores": {"Overall": -0.5}}]
    records = read_scores(_scores(tmp_path / "s.jsonl", rows), score_key="scores.Overall")
    pairs, report = make_pairs(records)
    assert pairs[0]["chosen"]["video"] == "x.npy" and pairs[0]["margin"] == 2.0 and report.pairs == 1
    bad = _scores(tmp_path / "bad.jsonl", rows[:1] + [{"prompt": "cat", "video": "z.npy"}])
    with pytest.raises(ValueError, match="bad.jsonl:2: no score at key 'scores.Overall'"):
        read_scores(bad, score_key="scores.Overall")


# ------------------------------------------------------------------------------------------ encode


@pytest.fixture(scope="module")
def encoders_dir(tmp_path_factory):
    """Tiny random AutoencoderKLWan, UMT5 encoder, WordLevel tokenizer, CLIP vision encoder, saved locally."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        PreTrainedTokenizerFast,
        UMT5Config,
        UMT5EncoderModel,
    )

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(root / "vae")
    UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder")
    words = ["<pad>", "</s>", "<unk>", *"a cat dog surfing on the wave red running".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
                    ).save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(root / "image_processor")
    rng = np.random.default_rng(0)
    rows = []
    for p, prompt in enumerate(["a cat surfing on the wave", "red dog running"]):
        for g in range(2):
            np.save(root / f"p{p}g{g}.npy", rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))
            rows.append({"prompt_id": f"p{p}", "prompt": prompt, "video": f"p{p}g{g}.npy", "score": g + p})
    _scores(root / "scores.jsonl", rows)
    return root


def test_encode_writes_a_readable_dataset_with_the_encoders_outputs(encoders_dir, tmp_path):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from pgdpo.cli import main

    root = encoders_dir
    assert main(["data", "pairs", "--scores", str(root / "scores.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 0
    out = tmp_path / "ds"
    assert main(["data", "encode", "--pairs", str(tmp_path / "p.jsonl"), "--videos", str(root), "--pipeline",
                 str(root), "--out", str(out), "--text-len", "8", "--dtype", "float32"]) == 0
    meta = validate_dataset(out, deep=True)
    assert (meta.task, meta.latent_shape, meta.text_len, meta.text_dim) == ("t2v", [16, 3, 4, 4], 8, 32)
    check_compatible(meta, "tiny-wan-t2v")
    batch = next(iter(PreferenceDataset(out, batch_size=2, shuffle=False)))
    # recompute pair 0 independently: chosen = the higher-scoring generation p0g1
    vae = AutoencoderKLWan.from_pretrained(str(root / "vae"))
    video = torch.from_numpy(np.load(root / "p0g1.npy")).float().div(255).mul(2).sub(1).permute(3, 0, 1, 2)
    with torch.no_grad():
        z = vae.encode(video[None]).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(batch["chosen"][0], ((z - mean) / std)[0], rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(str(root / "text_encoder"))
    ids = tokenizer(["a cat surfing on the wave"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state[0]
    n = int(ids.attention_mask.sum())
    torch.testing.assert_close(batch["encoder_hidden_states"][0, :n], hidden[:n], rtol=1e-4, atol=1e-4)
    assert torch.all(batch["encoder_hidden_states"][0, n:] == 0)


def test_encode_i2v_builds_the_wan_image_condition(encoders_dir, tmp_path):
    from pgdpo.train.data import encode_dataset, load_encoders
    from pgdpo.train.data.pairs import read_scores, write_pairs

    pairs, _ = make_pairs(read_scores(encoders_dir / "scores.jsonl"))
    write_pairs(pairs, tmp_path / "p.jsonl")
    enc = load_encoders(pipeline=encoders_dir, task="i2v")
    meta = encode_dataset(tmp_path / "p.jsonl", tmp_path / "ds", enc, task="i2v", videos_root=encoders_dir,
                          text_len=8, dtype=torch.float32, progress=False)
    assert meta.image_condition_shape == [20, 3, 4, 4] and meta.image_embed_shape == [17, 24]
    check_compatible(meta, "tiny-wan-i2v")
    batch = next(iter(PreferenceDataset(tmp_path / "ds", batch_size=2, shuffle=False)))
    mask = batch["image_condition"][:, :4]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        enc.latent_frames(8)
    # the shared latent-shape formula with this VAE's factors predicts what the real VAE produced
    video_shape = meta.source["video_shape"]  # [3, F, H, W]
    assert enc.latent_shape(*video_shape[1:]) == tuple(meta.latent_shape)
    with pytest.raises(ValueError, match="height must be a multiple of the VAE's spatial factor"):
        enc.latent_shape(video_shape[1], video_shape[2] + 1, video_shape[3])
