"""Data and checkpoints that cannot rot silently: shard checksums, non-finite pairs, checkpoint manifests.

Real files throughout: a synthetic dataset written by ``DatasetWriter``, bytes flipped inside a shard's
tensor payload with its safetensors header left intact, a NaN written into a shard with safetensors, and
checkpoints of real (tiny) training runs with a damaged file.
"""

import json
import os
import shutil
import struct
import warnings

import pytest

from pgdpo.train.checkpoint import MANIFEST, CheckpointError, resolve_resume, verify_checkpoint
from pgdpo.train.cli import main as train_main
from pgdpo.train.data.cli import main as data_main
from pgdpo.train.data.dataset import PreferenceDataset
from pgdpo.train.data.format import DataError, read_meta, validate_dataset
from pgdpo.train.data.synth import synth_dataset
from pgdpo.train.integrity import checksum_matches, file_checksum

from .test_train import args, metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """8 pairs in 2 shards of 4 for tiny-wan-t2v."""
    path = tmp_path_factory.mktemp("good") / "pairs"
    synth_dataset(path, pairs=8, latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32, shard_size=4,
                  progress=False)
    return path


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def payload_offset(path) -> int:
    """First byte after the safetensors header (8-byte little-endian length, then the JSON header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def flip_payload_bytes(path, offset_in_payload=100, count=4):
    start = payload_offset(path) + offset_in_payload
    data = bytearray(open(path, "rb").read())
    assert start + count <= len(data)
    for i in range(start, start + count):
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


# --------------------------------------------------------------------------------------------- checksums


def test_checksum_streams_and_detects_a_change(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(3 << 20))
    digest = file_checksum(f)
    assert digest.startswith("blake2b:") and len(digest) == len("blake2b:") + 64
    assert checksum_matches(f, digest) == (True, digest)
    flip = bytearray(f.read_bytes())
    flip[12345] ^= 1
    f.write_bytes(bytes(flip))
    assert checksum_matches(f, digest)[0] is False
    with pytest.raises(ValueError, match="unknown checksum"):
        checksum_matches(f, "md5:abc")


def test_writer_records_a_checksum_per_shard(good):
    meta = read_meta(good)
    shards = sorted(p.name for p in good.glob("shard-*.safetensors"))
    assert len(shards) == 2 and sorted(meta.checksums) == shards
    for name in shards:
        assert meta.checksums[name] == file_checksum(good / name)
    validate_dataset(good, deep=True)  # a good dataset passes


def test_flipped_payload_bytes_are_refused_by_data_check_naming_the_shard(good, tmp_path, capsys):
    bad = copy(good, tmp_path / "bad")
    shard = bad / "shard-00001.safetensors"
    flip_payload_bytes(shard)
    # The header is intact and the flipped bytes are still finite floats or not: the header check alone
    # (what `data check` did before) cannot tell.
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        assert len(list(f.keys())) == 12
    for deep in ([], ["--deep"]):
        assert data_main(["check", str(bad), *deep]) == 1
        err = capsys.readouterr().err
        assert "shard-00001.safetensors" in err and "corrupt" in err and "checksum" in err
    with pytest.raises(DataError, match="shard-00001.safetensors: shard is corrupt"):
        validate_dataset(bad)


def test_training_refuses_a_damaged_shard_by_name_before_any_step(good, tmp_path, capsys):
    bad = copy(good, tmp_path / "bad")
    flip_payload_bytes(bad / "shard-00000.safetensors", offset_in_payload=2000)
    out = tmp_path / "run"
    assert train_main(args(out, str(bad), 4, "--save-every", "1", "--data.shuffle", "false")) == 2
    err = capsys.readouterr().err
    assert "shard-00000.safetensors: shard is corrupt" in err
    assert not list(out.glob("checkpoint-*")), "a checkpoint was written from damaged data"
    assert not (out / "metrics.jsonl").exists() or metrics(out) == []  # no step used it


def test_loader_verifies_each_shard_once_on_first_read(good, tmp_path):
    bad = copy(good, tmp_path / "bad")
    flip_payload_bytes(bad / "shard-00001.safetensors")
    ds = PreferenceDataset(bad, batch_size=2, shuffle=False)
    first = ds.make_batch([0, 1])  # shard 0 is good: read and verified
    assert first["chosen"].shape == (2, 16, 3, 8, 8) and ds.verified == {"shard-00000.safetensors"}
    ds.make_batch([2, 3])
    assert ds.verified == {"shard-00000.safetensors"}  # not hashed again
    with pytest.raises(DataError, match="shard-00001.safetensors: shard is corrupt"):
        ds.make_batch([4])
    assert ds.verify_seconds > 0
    unchecked = PreferenceDataset(bad, batch_size=2, shuffle=False, verify=False)
    unchecked.make_batch([4])  # verify=False reads it (the flipped bytes may be any finite float)


def nan_in_pair(root, pair, name="chosen"):
    """Write a NaN into one pair's tensor with safetensors, and record the new checksum (as a producer that
    bypasses DatasetWriter's own finiteness check would)."""
    from safetensors.torch import load_file, save_file

    entry = json.loads((root / "index.jsonl").read_text().splitlines()[pair])
    shard = root / entry["shard"]
    tensors = load_file(str(shard))
    tensors[entry["keys"][name]].view(-1)[7] = float("nan")
    save_file(tensors, str(shard))
    meta = json.loads((root / "dataset.json").read_text())
    meta["checksums"][entry["shard"]] = file_checksum(shard)
    (root / "dataset.json").write_text(json.dumps(meta))
    return entry["shard"]


def test_a_nan_in_a_shard_names_shard_and_pair(good, tmp_path, capsys):
    bad = copy(good, tmp_path / "nan")
    shard = nan_in_pair(bad, 5)
    assert data_main(["check", str(bad)]) == 0  # the checksum matches; only --deep reads the values
    capsys.readouterr()
    assert data_main(["check", str(bad), "--deep"]) == 1
    err = capsys.readouterr().err
    assert shard in err and "pair 5" in err and "NaN" in err
    with pytest.raises(DataError, match=rf"{shard}: pair 5 .*'chosen'.* 1 NaN/Inf"):
        PreferenceDataset(bad, batch_size=2, shuffle=False).make_batch([4, 5])
    out = tmp_path / "run"
    assert train_main(args(out, str(bad), 8, "--data.shuffle", "false", "--save-every", "0")) == 2
    err = capsys.readouterr().err
    assert f"{shard}: pair 5" in err and "the step was not run" in err


def test_datasets_without_checksums_load_with_a_warning(good, tmp_path):
    old = copy(good, tmp_path / "old")
    meta = json.loads((old / "dataset.json").read_text())
    del meta["checksums"]
    (old / "dataset.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no shard checksums"):
        ds = PreferenceDataset(old, batch_size=2)
    assert ds.make_batch([0, 1])["chosen"].shape[0] == 2 and ds.verified == {"shard-00000.safetensors"}
    with pytest.warns(UserWarning, match="no shard checksums"):
        validate_dataset(old, deep=True)


# --------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_manifest_damage_and_fallback(good, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--save-every", "1", "--checkpoint.keep_last", "0")
    assert train_main(args(out, str(good), 3, *common)) == 0
    ck2, ck3 = out / "checkpoint-2", out / "checkpoint-3"
    files = json.loads((ck3 / MANIFEST).read_text())["files"]
    on_disk = {n for n in os.listdir(ck3) if n not in (MANIFEST, "trainer_state.json")}
    assert set(files) == on_disk and {".metadata", "rank-0.pt", "trainer.pt", "config.yaml"} <= on_disk
    assert any(n.endswith(".distcp") for n in files)
    assert verify_checkpoint(str(ck3)) is True

    distcp = next(ck3.glob("*.distcp"))
    data = bytearray(distcp.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    distcp.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{distcp.name}: damaged: checksum"):
        verify_checkpoint(str(ck3))
    capsys.readouterr()
    # Named by path: refused, naming the file.
    assert train_main(args(out, str(good), 4, *common, "--resume", str(ck3))) == 2
    assert f"{distcp}: damaged" in capsys.readouterr().err
    # latest: falls back to the newest good one, saying so, and continues from it.
    assert train_main(args(out, str(good), 4, *common, "--resume", "latest")) == 0
    err = capsys.readouterr().err
    assert "skipping the damaged checkpoint-3" in err and "falling back to checkpoint-2" in err
    assert f"resumed from {ck2} at step 2" in err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert verify_checkpoint(str(out / "checkpoint-4")) and verify_checkpoint(str(out / "checkpoint-3"))

    # A truncated trainer.pt (size differs) is named too; when every checkpoint is bad, latest refuses.
    for step in (1, 2, 3, 4):
        trainer = out / f"checkpoint-{step}" / "trainer.pt"
        trainer.write_bytes(trainer.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        resolve_resume("latest", str(out))
    with pytest.raises(CheckpointError, match="trainer.pt: damaged: .* bytes"):
        resolve_resume(str(out / "checkpoint-4"), str(out))


def test_checkpoints_without_a_manifest_resume_with_a_warning(good, tmp_path):
    out = tmp_path / "run"
    assert train_main(args(out, str(good), 2, "--save-every", "1")) == 0
    os.remove(out / "checkpoint-2" / MANIFEST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_resume("latest", str(out)) == str(out / "checkpoint-2")
    assert any("no manifest.json" in str(w.message) for w in caught)
    assert train_main(args(out, str(good), 3, "--save-every", "1", "--resume", "latest")) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
