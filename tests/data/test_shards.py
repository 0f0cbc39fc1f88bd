"""WebDataset shards (directclr/data/shards.py): `directclr prepare shards`, both loaders on them
with the folder loaders' guarantees (same batches, equal ranks, exact resume, damaged samples
named), brace patterns and directories, --data errors, and a killed run on shards resuming."""
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from directclr import cli
from directclr.config import path_problem
from directclr.data import (
    ImageFolderIndex,
    ShardIndex,
    build_pretrain_loader,
    prepare_synthetic,
    shards,
    write_shards,
)
from directclr.data.images import CorruptImageError
from tests.faults.helpers import (
    STEPS,
    Work,
    fresh,
    kill_at_checkpoint,
    pretrain_args,
    run,
    same_weights,
    set_arg,
    steps,
)
from tests.helpers import ENV_ONE_THREAD

SIZE = 32
SHARD_SIZE = 13  # tiny's 40 images: shards of 13, 13, 13 and 1
FIRST_THREE = "shard-{000000..000002}.tar"  # 39 samples: an odd count to pad for 2 ranks


@pytest.fixture(scope="module")
def tiny_shards(tiny, tmp_path_factory):
    """The tiny dataset as shards, written by the prepare command."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "directclr", "prepare", "shards", "--from",
                           str(tiny), "--out", str(out), "--shard-size", str(SHARD_SIZE)],
                          capture_output=True, text=True, timeout=240, env=ENV_ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote shard-000000.tar to shard-000003.tar" in proc.stdout
    return out


@pytest.fixture(scope="module")
def one_class_each(tmp_path_factory):
    """Shards of 24 images in 24 classes: a batch's labels say which samples it holds."""
    root = tmp_path_factory.mktemp("distinct")
    prepare_synthetic(root / "tree", n=24, classes=24, min_side=36, max_side=60,
                      progress=False)
    write_shards(root / "tree", root / "shards", shard_size=10, progress=False)
    return root / "shards"


@pytest.fixture(params=["torchvision", "dali"])
def backend(request):
    if request.param == "dali":
        pytest.importorskip("nvidia.dali")
    return request.param


def loader(data, **kwargs):
    args = dict(backend="torchvision", device="cpu", image_size=SIZE, seed=3, recipe="small")
    args.update(kwargs)
    args.setdefault("num_threads", 2 if args["backend"] == "dali" else 0)
    batch_size = args.pop("batch_size", 8)
    return build_pretrain_loader(data, batch_size, **args)


def same(batches, others) -> bool:
    return len(batches) == len(others) and all(
        torch.equal(x, y) for batch, other in zip(batches, others) for x, y in zip(batch, other))


# --------------------------------------------------------------------------- prepare
def test_prepare_writes_every_image_once_with_its_label(tiny, tiny_shards):
    folder, index = ImageFolderIndex(tiny), ShardIndex(tiny_shards)
    assert [Path(s).name for s in index.shards] == [f"shard-{n:06d}.tar" for n in range(4)]
    assert torch.bincount(torch.as_tensor(index.shard_of)).tolist() == [13, 13, 13, 1]
    assert index.classes == folder.classes
    assert (tiny_shards / "classes.txt").read_text() == "".join(f"{c}\n" for c in folder.classes)
    # A key is the image's position in the tree; its bytes and label come back as they were.
    positions = [int(key) for key in index.keys]
    assert sorted(positions) == list(range(len(folder)))
    assert positions != sorted(positions)  # written in a shuffled order
    for i, position in enumerate(positions):
        assert index.read(i) == folder.read(position)
        assert index.labels[i] == folder.labels[position]
    # Plain WebDataset: <key>.cls holding the class as text, then <key>.jpg.
    with tarfile.open(index.shards[0]) as tar:
        names = tar.getnames()
        assert names[:2] == [f"{index.keys[0]}.cls", f"{index.keys[0]}.jpg"]
        assert tar.extractfile(names[0]).read() == str(index.labels[0]).encode()
    assert all((tiny_shards / f"shard-{n:06d}.index.json").is_file() for n in range(4))


def test_prepare_is_reproducible_and_keeps_out_of_a_folder_with_shards(tiny, tiny_shards,
                                                                        tmp_path):
    again = write_shards(tiny, tmp_path / "again", SHARD_SIZE, progress=False)
    assert [p.read_bytes() for p in again] == [
        (tiny_shards / p.name).read_bytes() for p in again]
    other_seed = write_shards(tiny, tmp_path / "other", SHARD_SIZE, seed=1, progress=False)
    assert other_seed[0].read_bytes() != again[0].read_bytes()
    with pytest.raises(ValueError, match="holds .tar files already"):
        write_shards(tiny, tmp_path / "again", SHARD_SIZE, progress=False)


# --------------------------------------------------------------------------- the loaders
def test_same_seed_same_batches_and_labels_follow_the_order(backend, tiny_shards):
    first = loader(tiny_shards, backend=backend)
    batches = list(first)
    assert len(batches) == 40 // 8
    assert same(batches, list(loader(tiny_shards, backend=backend)))
    assert not torch.equal(batches[0][0], next(iter(loader(tiny_shards, backend=backend,
                                                           seed=4)))[0])
    order = first.order(0)
    for b, (view1, view2, labels) in enumerate(batches):
        assert view1.shape == view2.shape == (8, 3, SIZE, SIZE)
        assert labels.tolist() == [first.index.labels[i] for i in order[b * 8:(b + 1) * 8]]


def test_both_loaders_give_the_same_samples_in_the_same_batches(one_class_each):
    """One class per image: equal labels are the same samples, batch for batch, two epochs."""
    pytest.importorskip("nvidia.dali")
    data = {name: loader(one_class_each, backend=name, batch_size=6)
            for name in ("torchvision", "dali")}
    for _ in range(2):
        labels = {name: [batch[2].tolist() for batch in each] for name, each in data.items()}
        assert labels["torchvision"] == labels["dali"]
        assert sorted(sum(labels["dali"], [])) == list(range(24))


def test_two_ranks_get_equal_disjoint_shares(backend, tiny_shards):
    """39 samples on 2 ranks: 20 each (one repeated to pad), 5 batches of 4 each, together
    every sample."""
    ranks = [loader(tiny_shards / FIRST_THREE, backend=backend, batch_size=4, rank=rank,
                    world_size=2) for rank in range(2)]
    assert len(ranks[0].index) == 39
    seen = []
    for rank in ranks:
        batches = list(rank)
        assert len(batches) == len(rank) == 5
        assert all(len(labels) == 4 for _, _, labels in batches)
        order = rank.order(0).tolist()
        assert [label for _, _, labels in batches for label in labels.tolist()] == [
            rank.index.labels[i] for i in order]
        seen += order
    assert len(seen) == 40 and set(seen) == set(range(39))


def test_resume_mid_epoch_continues_exactly(backend, tiny_shards):
    expected = list(loader(tiny_shards, backend=backend))[2:]
    interrupted = loader(tiny_shards, backend=backend)
    batches = iter(interrupted)
    for _ in range(2):
        next(batches)
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 2
    resumed = loader(tiny_shards, backend=backend)
    resumed.load_state_dict(state)
    assert same(list(resumed), expected)
    assert resumed.state_dict()["epoch"] == 1


def test_workers_give_the_same_batches(tiny_shards):
    """The index travels to DataLoader worker processes (pickled), which read by offset."""
    script = textwrap.dedent(f"""
        import torch
        from directclr.data import build_pretrain_loader
        if __name__ == "__main__":
            args = dict(backend="torchvision", device="cpu", image_size={SIZE}, seed=3,
                        recipe="small")
            a = list(build_pretrain_loader("{tiny_shards}", 8, num_threads=2, **args))
            b = list(build_pretrain_loader("{tiny_shards}", 8, num_threads=0, **args))
            assert len(a) == len(b) == 5
            assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
            print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, env=ENV_ONE_THREAD)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr[-3000:]


def damage_in_place(shard: Path, offset: int, size: int) -> None:
    """Stuffed 0xff bytes (a bad Huffman code) over the middle third of the entropy-coded data
    of the JPEG at `offset`, its size and the tar's layout unchanged."""
    data = bytearray(shard.read_bytes())
    image = bytes(data[offset:offset + size])
    sos = image.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(image[sos + 2:sos + 4], "big")
    third = (image.rindex(b"\xff\xd9") - start) // 3
    at = offset + start + third
    data[at:at + 2 * (third // 2)] = b"\xff\x00" * (third // 2)
    shard.write_bytes(bytes(data))


def test_a_damaged_sample_is_refused_naming_shard_and_key(backend, tiny_shards, tmp_path):
    copy = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    data = loader(copy, backend=backend)
    victim = int(data.order(0)[0])  # in the first batch
    shard = Path(data.index.shards[data.index.shard_of[victim]])
    key = data.index.keys[victim]
    damage_in_place(shard, int(data.index.offsets[victim]), int(data.index.sizes[victim]))
    with pytest.raises(CorruptImageError) as caught:
        list(loader(copy, backend=backend))
    assert str(caught.value) == (f"cannot decode image {shard} (key {key}): Corrupt JPEG data: "
                                 "bad Huffman code")


def test_a_brace_pattern_a_list_and_a_directory_name_the_same_samples(tiny_shards):
    whole = ShardIndex(tiny_shards)
    pattern = ShardIndex(tiny_shards / "shard-{000000..000003}.tar")
    assert (pattern.shards, pattern.keys, pattern.labels) == (whole.shards, whole.keys,
                                                              whole.labels)
    listed = ShardIndex(tiny_shards / "shard-{000003,000000}.tar")
    assert [Path(s).name for s in listed.shards] == ["shard-000003.tar", "shard-000000.tar"]
    assert listed.keys == whole.keys[39:] + whole.keys[:13]
    assert same([next(iter(loader(tiny_shards)))],
                [next(iter(loader(tiny_shards / "shard-{000000..000003}.tar")))])


def test_brace_expansion_as_webdataset_writes_it():
    assert shards.expand_braces("a-{0008..0011}.tar") == [
        "a-0008.tar", "a-0009.tar", "a-0010.tar", "a-0011.tar"]
    assert shards.expand_braces("{1..3}-{x,y}.tar") == [
        "1-x.tar", "1-y.tar", "2-x.tar", "2-y.tar", "3-x.tar", "3-y.tar"]
    assert shards.expand_braces("a-{9..10}.tar") == ["a-9.tar", "a-10.tar"]
    assert shards.expand_braces("a-{03..1}.tar") == ["a-03.tar", "a-02.tar", "a-01.tar"]
    assert shards.expand_braces("{b}.tar") == ["{b}.tar"]


@pytest.mark.parametrize("data, problem", [
    ("none-{0000..0003}.tar", "none of its 4 .tar files exists (first: {tmp}/none-0000.tar)"),
    ("shards/shard-{000002..000005}.tar",
     "2 of its 4 .tar files do not exist (first: {tmp}/shards/shard-000004.tar)"),
    ("missing.tar", "no such file"),
])
def test_bad_data_is_one_error_naming_the_flag(tiny_shards, tmp_path, capsys, data, problem):
    shutil.copytree(tiny_shards, tmp_path / "shards")
    value = f"{tmp_path}/{data}"
    assert cli.main(["pretrain", "--data", value, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"directclr pretrain: error: --data {value}: "
                                f"{problem.format(tmp=tmp_path)} (see directclr pretrain --help)"]


def test_a_shard_pattern_passes_the_path_check(tiny_shards):
    assert path_problem("dataset", f"{tiny_shards}/shard-{{000000..000003}}.tar") is None
    assert path_problem("dataset", f"{tiny_shards}/shard-000003.tar") is None


def test_a_directory_that_is_not_clearly_shards_or_a_tree_says_what_it_expected(tiny,
                                                                                tmp_path):
    with pytest.raises(ValueError, match=re.escape("(expected root/<class>/<image>, or .tar "
                                                   "shards)")):
        loader(tmp_path)
    mixed = Path(shutil.copytree(tiny, tmp_path / "mixed"))
    (mixed / "backup.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="holds both .tar files and folders"):
        loader(mixed)


def test_prepare_shards_needs_from(tmp_path, capsys):
    assert cli.main(["prepare", "shards", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("directclr prepare: error: prepare shards needs --from "
                                       "ROOT, the ImageFolder tree to write\n")


# --------------------------------------------------------------------------- format errors
def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


@pytest.mark.parametrize("members, problem", [
    ({"a.cls": b"0", "a.jpg": b"x", "b.jpg": b"y"}, "(key b): no .cls member"),
    ({"a.cls": b"zero", "a.jpg": b"x"}, "(key a): .cls holds b'zero', not a class index"),
    ({"a.cls": b"-1", "a.png": b"x"}, "(key a): .cls holds b'-1', not a class index"),
    ({"a.cls": b"0", "a.json": b"{}"}, "(key a): 0 images"),
    ({"d/a.cls": b"0", "d/a.jpg": b"x", "d/a.png": b"y"}, "(key d/a): 2 images"),
])
def test_a_malformed_sample_is_an_error_naming_shard_and_key(tmp_path, members, problem):
    shard = write_tar(tmp_path / "s.tar", members)
    with pytest.raises(ValueError, match=re.escape(f"{shard} {problem}")):
        ShardIndex(shard)


def test_members_that_are_not_samples_are_ignored_and_classes_txt_names_the_classes(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {
        "x/a.CLS": b" 2\n", "x/a.JPEG": b"image", "x/a.json": b"{}", ".hidden.jpg": b"",
        "README": b"no extension"})
    index = ShardIndex(shard)
    assert (index.keys, index.labels, index.classes) == (["x/a"], [2], ["0", "1", "2"])
    assert index.read(0) == b"image"
    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\nfox\n")
    assert ShardIndex(shard).classes == ["cat", "dog", "emu", "fox"]
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=re.escape(f"{shard} (key x/a): class 2, but")):
        ShardIndex(shard)


# --------------------------------------------------------------------------- the index cache
def test_the_index_is_cached_and_made_anew_when_the_shard_changes(tiny_shards, tmp_path,
                                                                  monkeypatch):
    copy = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    for cached in copy.glob("*.index.json"):
        cached.unlink()
    first = ShardIndex(copy)
    assert len(list(copy.glob("*.index.json"))) == 4
    scanned = []
    original_scan = shards._scan
    monkeypatch.setattr(shards, "_scan", lambda shard: scanned.append(shard.name)
                        or original_scan(shard))
    assert ShardIndex(copy).keys == first.keys and scanned == []
    shard = copy / "shard-000001.tar"
    os.utime(shard, ns=(0, 0))  # a shard rewritten in place
    assert ShardIndex(copy).keys == first.keys and scanned == ["shard-000001.tar"]


def test_an_index_that_cannot_go_beside_its_shards_goes_to_the_cache(tiny_shards, tmp_path,
                                                                     monkeypatch):
    copy = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    for cached in copy.glob("*.index.json"):
        cached.unlink()
    original_write = shards.atomic_write

    def read_only_shard_folder(target, write):
        if target.parent == copy:
            raise PermissionError(13, "Permission denied", str(target))
        original_write(target, write)
    monkeypatch.setattr(shards, "atomic_write", read_only_shard_folder)
    cache = tmp_path / "cache"
    first = ShardIndex(copy, cache)
    assert not list(copy.glob("*.index.json")) and len(list(cache.glob("*.index.json"))) == 4
    monkeypatch.setattr(shards, "_scan", lambda shard: pytest.fail(f"{shard} scanned again"))
    assert ShardIndex(copy, cache).keys == first.keys


# --------------------------------------------------------------------------- a killed run
def test_a_killed_run_on_shards_resumes_bit_exactly(tiny_shards, tmp_path):
    """kill -9 after the checkpoint of step 3 (mid-epoch: 5 steps an epoch), then a resume to
    the weights of the run that was never killed, one metrics row per step."""
    work = Work(tmp_path, tiny_shards)
    reference = fresh(tmp_path / "straight")
    straight = run(pretrain_args(work, reference))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "40 images in 4 classes" in straight.stderr
    out = fresh(tmp_path / "killed")
    args = set_arg(pretrain_args(work, out), "--ckpt-every", "1")
    kill_at_checkpoint(args, out, 3)
    assert not (out / "backbone.pt").exists(), "the run ended before the kill at step 3"
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert steps(out) == list(range(1, STEPS + 1))
    assert same_weights(reference, out), "resumed weights differ from the straight run's"
