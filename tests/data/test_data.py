"""The pretraining loader (torchvision backend here) and dataset preparation."""
import gzip
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from directclr.data import (
    ImageFolderIndex,
    build_pretrain_loader,
    epoch_order,
    prepare_fashion_mnist,
    prepare_synthetic,
)
from directclr.data.images import CorruptImageError
from directclr.data.prepare import FASHION_MNIST_DIR
from directclr.data.recipe import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("syn"), n=60, classes=3, min_side=40,
                             max_side=90, progress=False)


BACKENDS = ["torchvision", "dali"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "dali":
        pytest.importorskip("nvidia.dali")
    return request.param


def loader(root, **kwargs):
    args = dict(backend="torchvision", device="cpu", image_size=SIZE, num_threads=0, seed=3,
                recipe="small")
    if args["backend"] == "dali" or kwargs.get("backend") == "dali":
        args["num_threads"] = 2
    args.update(kwargs)
    batch_size = args.pop("batch_size", 8)
    return build_pretrain_loader(root, batch_size, **args)


def test_index_matches_torchvision_imagefolder(synthetic):
    index = ImageFolderIndex(synthetic)
    reference = ImageFolder(synthetic)
    assert index.classes == reference.classes
    assert list(zip(index.files, index.labels)) == [(p, c) for p, c in reference.samples]


def test_batches_shapes_labels_and_statistics(backend, synthetic):
    data = loader(synthetic, backend=backend)
    index = ImageFolderIndex(synthetic)
    assert len(data) == 60 // 8
    order = data.order(0)
    batches = list(data)
    assert len(batches) == len(data)
    for b, (view1, view2, labels) in enumerate(batches):
        assert view1.shape == view2.shape == (8, 3, SIZE, SIZE)
        assert view1.dtype == torch.float32 and labels.dtype == torch.int64
        expected = torch.tensor([index.labels[i] for i in order[b * 8:(b + 1) * 8]])
        assert torch.equal(labels, expected)
        assert not torch.equal(view1, view2)
    pixels = torch.cat([v for batch in batches for v in batch[:2]])
    assert -1.5 < pixels.mean() < 1.5 and 0.3 < pixels.std() < 2.0
    assert data.state_dict()["epoch"] == 1


def test_same_seed_same_batches_and_epochs_differ(backend, synthetic):
    first, second = loader(synthetic, backend=backend), loader(synthetic, backend=backend)
    other = loader(synthetic, backend=backend, seed=4)
    a, b, c = next(iter(first)), next(iter(second)), next(iter(other))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(epoch_order(60, 3, 0, 0, 1), epoch_order(60, 3, 1, 0, 1))


def test_ranks_get_equal_disjoint_shards_covering_the_set():
    shards = [epoch_order(40, 0, 2, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {14}
    assert set(torch.cat(shards).tolist()) == set(range(40))
    assert len(torch.cat(shards).unique()) == 40  # only the 2 padding entries repeat
    exact = [epoch_order(40, 0, 2, rank, 4) for rank in range(4)]
    assert sorted(torch.cat(exact).tolist()) == list(range(40))


def test_resume_mid_epoch_continues_exactly(backend, synthetic):
    uninterrupted = loader(synthetic, backend=backend)
    expected = list(uninterrupted)[3:]
    interrupted = loader(synthetic, backend=backend)
    batches = iter(interrupted)
    for _ in range(3):
        next(batches)
    state = interrupted.state_dict()
    assert state["batches_done"] == 3 and state["epoch"] == 0
    resumed = loader(synthetic, backend=backend)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(expected)
    for got, want in zip(rest, expected):
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert resumed.state_dict()["epoch"] == 1
    with pytest.raises(ValueError, match="global batch size 8, this loader 4"):
        loader(synthetic, batch_size=4).load_state_dict(state)


def test_a_break_then_a_jump_back_give_the_right_batches(backend, synthetic):
    """DALI runs PREFETCH batches ahead: after a break the next iteration continues with them,
    and after a loaded state points elsewhere they are dropped, not handed out."""
    expected = list(loader(synthetic, backend=backend))  # one epoch: 7 batches of 8
    data = loader(synthetic, backend=backend)
    taken = []
    for batch in data:
        taken.append(batch)
        if len(taken) == 3:
            break
    taken += list(data)  # the same epoch, from batch 3
    state = data.state_dict()
    assert state["epoch"] == 1 and state["batches_done"] == 0
    data.load_state_dict({**state, "epoch": 0, "batches_done": 5})
    taken += list(data)  # epoch 0 again, from batch 5
    data.load_state_dict({**state, "epoch": 0, "batches_done": 7})
    assert list(data) == []  # a state saved after the last batch: the epoch is over
    assert len(taken) == len(expected) + 2
    for got, want in zip(taken, expected + expected[5:]):
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert data.state_dict()["epoch"] == 1


def test_epochs_shorter_than_the_prefetch_follow_each_other(backend, synthetic):
    """One batch per epoch: DALI's second batch in flight is already the next epoch's."""
    data = loader(synthetic, backend=backend, batch_size=60)
    epochs = [list(data) for _ in range(3)]
    assert [len(e) for e in epochs] == [1, 1, 1]
    for epoch, got in enumerate(epochs):
        fresh = loader(synthetic, backend=backend, batch_size=60)
        fresh.load_state_dict({**fresh.state_dict(), "epoch": epoch})
        want = list(fresh)
        assert all(torch.equal(x, y) for x, y in zip(got[0], want[0])), epoch
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # a new shuffle and new views


def test_resume_on_another_world_size_continues_the_same_global_batches(synthetic):
    """A state saved by 1 rank x 8 resumes on 2 ranks x 4: each global batch (the ranks' batches
    interleaved as epoch_order deals them) is the batch the single rank would have made next."""
    single = loader(synthetic, backend="torchvision", batch_size=8)
    expected = list(single)[3:]
    state = {**single.state_dict(), "epoch": 0, "batches_done": 3}
    ranks = [loader(synthetic, backend="torchvision", batch_size=4, rank=r, world_size=2)
             for r in range(2)]
    for rank in ranks:
        rank.load_state_dict(state)
    per_rank = [list(rank) for rank in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(expected) > 0
    for b, want in enumerate(expected):
        for part in range(3):  # view1, view2, labels: rank r holds global items r, r + 2, ...
            got = torch.stack([per_rank[r][b][part] for r in range(2)], 1).flatten(0, 1)
            assert torch.equal(got, want[part]), (b, part)
    with pytest.raises(ValueError, match="global batch size 8, this loader 6"):
        loader(synthetic, backend="torchvision", batch_size=3, rank=0, world_size=2
               ).load_state_dict(state)
    # 8 ranks x 1: the same global batch, but 60 samples pad to 8 batches per epoch, not 7.
    with pytest.raises(ValueError, match="batches per epoch 7, this loader 8"):
        loader(synthetic, backend="torchvision", batch_size=1, rank=0, world_size=8
               ).load_state_dict(state)


def test_grayscale_fraction_follows_the_recipe(backend, synthetic):
    data = loader(synthetic, backend=backend, batch_size=20)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    gray = []
    for _ in range(4):  # 4 epochs x 60 images x 2 views = 480 views
        for view1, view2, _ in data:
            for view in (view1, view2):
                rgb = view * std + mean
                gray.append(((rgb[:, 0] - rgb[:, 1]).abs().amax((1, 2)) < 1e-4)
                            & ((rgb[:, 1] - rgb[:, 2]).abs().amax((1, 2)) < 1e-4))
    fraction = torch.cat(gray).float().mean().item()
    assert 0.14 < fraction < 0.26, fraction  # p = 0.2; 480 draws: 3 sigma is 0.055


def test_workers_give_the_same_batches(synthetic):
    script = textwrap.dedent(f"""
        import torch
        from directclr.data import build_pretrain_loader
        if __name__ == "__main__":
            args = dict(backend="torchvision", device="cpu", image_size={SIZE}, seed=3,
                        recipe="small")
            a = next(iter(build_pretrain_loader("{synthetic}", 8, num_threads=2, **args)))
            b = next(iter(build_pretrain_loader("{synthetic}", 8, num_threads=0, **args)))
            assert all(torch.equal(x, y) for x, y in zip(a, b))
            print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_torchvision_workers_after_a_dali_pipeline_do_not_hang(synthetic):
    pytest.importorskip("nvidia.dali")
    script = textwrap.dedent(f"""
        from nvidia.dali import fn, pipeline_def
        from directclr.data import build_pretrain_loader
        if __name__ == "__main__":
            @pipeline_def(batch_size=4, num_threads=2, device_id=None)
            def decode():
                jpegs, labels = fn.readers.file(file_root="{synthetic}")
                return fn.decoders.image(jpegs, device="cpu"), labels
            pipe = decode()
            pipe.build()
            pipe.run()  # DALI's threads are running now
            data = build_pretrain_loader("{synthetic}", 8, backend="torchvision", device="cpu",
                                         image_size={SIZE}, num_threads=2, recipe="small")
            print(sum(1 for _ in data))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("7"), proc.stderr[-3000:]


def test_solarize_only_in_view_two_at_its_rate(backend, tmp_path, monkeypatch):
    """A flat grey image (200) and a recipe with nothing else that changes pixel values: a view is
    solarized iff its pixels read 255 - 200 = 55."""
    from directclr.data import recipe as recipes
    plain = recipes.Recipe(crop_scale=(0.5, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.0,
                           grayscale_p=0.0, blur_p=(0.0, 0.0), blur_sigma=(0.1, 2.0),
                           solarize_p=(0.0, 0.2))
    monkeypatch.setitem(recipes.RECIPES, "plain", plain)
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(50):
            Image.new("RGB", (40, 40), (200, 200, 200)).save(tmp_path / f"c{c}" / f"{i}.png")
    data = loader(tmp_path, backend=backend, batch_size=25, recipe="plain")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    solarized = [[], []]
    for _ in range(3):  # 300 views of each kind
        for batch in data:
            for view in range(2):
                pixels = (batch[view] * std + mean) * 255
                assert ((pixels - 200).abs() < 1.5).all(-1).all(-1).all(-1).logical_or(
                    ((pixels - 55).abs() < 1.5).all(-1).all(-1).all(-1)).all()
                solarized[view].append(((pixels - 55).abs() < 1.5).flatten(1).all(1))
    assert torch.cat(solarized[0]).sum() == 0
    fraction = torch.cat(solarized[1]).float().mean().item()
    assert 0.13 < fraction < 0.27, fraction  # p = 0.2 over 300 draws: 3 sigma is 0.07


# --------------------------------------------------------------------------- bad data
def test_truncated_image_error_names_the_file(backend, tmp_path):
    root = prepare_synthetic(tmp_path / "bad", n=16, classes=2, min_side=40, max_side=60,
                             progress=False)
    victim = sorted((root / "class_001").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(CorruptImageError, match=victim.name):
        for _ in loader(root, backend=backend, batch_size=16):
            pass


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_a_bad_file_fails_its_own_batch_and_the_loader_recovers(backend, tmp_path, damage):
    """The batches before the bad file's arrive (DALI reads files two batches ahead); its own
    batch raises naming it, also after a jump back past it; once repaired, all is well."""
    root = prepare_synthetic(tmp_path / "bad", n=12, classes=2, min_side=40, max_side=60,
                             progress=False)
    data = loader(root, backend=backend, batch_size=4)
    victim = Path(data.index.files[data.order(0)[4]])  # epoch 0, batch 1
    original = victim.read_bytes()
    # Truncated a third into the entropy-coded data: the header reads, the decode fails. Not an
    # image: reading the header fails.
    scan = original.index(b"\xff\xda")
    victim.write_bytes(original[:scan + (len(original) - scan) // 3] if damage == "truncated"
                       else b"not an image" * 10)
    batches = iter(data)
    next(batches)  # batch 0 is fine
    batches.close()
    data.load_state_dict({**data.state_dict(), "epoch": 0, "batches_done": 0})
    reason = ("Premature end of JPEG file" if damage == "truncated"
              else "not an image format PIL knows")
    for _ in range(2):  # twice: a failure must not leave the loader broken
        with pytest.raises(CorruptImageError) as caught:
            list(data)
        assert str(caught.value) == f"cannot decode image {victim}: {reason}"
        assert data.state_dict()["batches_done"] == 1
    victim.write_bytes(original)
    assert len(list(data)) == 2  # batches 1 and 2 of epoch 0


def damage_entropy_data(path: Path, damage: str) -> None:
    """Damages the middle third of the entropy-coded data after the first SOS marker, keeping
    every marker valid, so that libjpeg only warns (`damage` is its warning)."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")  # past the SOS header
    third = (data.rindex(b"\xff\xd9") - start) // 3
    if damage == "bad Huffman code":
        # Stuffed 0xff bytes: a run of 1 bits longer than any Huffman code.
        middle = b"\xff\x00" * (third // 2)
    elif damage == "premature end of data segment":
        middle = b""
    else:
        raise ValueError(damage)
    path.write_bytes(data[:start + third] + middle + data[start + 2 * third:])


@pytest.mark.parametrize("damage", ["bad Huffman code", "premature end of data segment"])
def test_damaged_jpeg_data_fails_naming_the_file(backend, tmp_path, damage):
    """PIL and DALI decode such a file without an error, as a picture with flat blocks; both
    backends must refuse it, naming it."""
    root = prepare_synthetic(tmp_path / "bad", n=16, classes=2, min_side=40, max_side=60,
                             progress=False)
    victim = sorted((root / "class_001").iterdir())[0]
    damage_entropy_data(victim, damage)
    with Image.open(victim) as image:
        image.convert("RGB")  # what both backends used to train on
    with pytest.raises(CorruptImageError, match=f"Corrupt JPEG data: {damage}") as caught:
        for _ in loader(root, backend=backend, batch_size=16):
            pass
    assert caught.value.path == str(victim)
    assert str(caught.value) == f"cannot decode image {victim}: Corrupt JPEG data: {damage}"


def test_padding_before_the_end_marker_is_not_damage(backend, tmp_path):
    """Bytes between the last scan and EOI make libjpeg warn after every block is decoded: such
    files (found in real datasets) train; padding before a restart marker inside the scan does
    not."""
    root = prepare_synthetic(tmp_path / "pad", n=16, classes=2, min_side=40, max_side=60,
                             progress=False)
    victim = sorted((root / "class_001").iterdir())[0]
    data = victim.read_bytes()
    end = data.rindex(b"\xff\xd9")
    victim.write_bytes(data[:end] + b"\x00" * 240 + data[end:])
    assert sum(len(labels) for _, _, labels in loader(root, backend=backend, batch_size=16)) == 16


def test_a_workers_decode_error_reaches_the_caller_as_one_line_naming_the_file(tmp_path):
    root = prepare_synthetic(tmp_path / "bad", n=16, classes=2, min_side=40, max_side=60,
                             progress=False)
    victim = sorted((root / "class_001").iterdir())[0]
    damage_entropy_data(victim, "bad Huffman code")
    script = textwrap.dedent(f"""
        from directclr.data import build_pretrain_loader
        from directclr.data.images import CorruptImageError
        if __name__ == "__main__":
            data = build_pretrain_loader("{root}", 8, backend="torchvision", device="cpu",
                                         image_size={SIZE}, num_threads=2, recipe="small")
            try:
                list(data)
            except CorruptImageError as err:
                print(repr(str(err)))
                print(type(err.__cause__).__name__, "Traceback" in str(err.__cause__))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = f"cannot decode image {victim}: Corrupt JPEG data: bad Huffman code"
    # The worker's error, a traceback as text, stays attached as the cause.
    assert proc.stdout.splitlines() == [repr(message), "RuntimeError True"], proc.stderr[-3000:]


def test_non_image_files_are_skipped_and_counted(tmp_path):
    root = prepare_synthetic(tmp_path / "skip", n=16, classes=2, min_side=40, max_side=60,
                             progress=False)
    (root / "class_000" / "notes.txt").write_text("not an image")
    index = ImageFolderIndex(root)
    assert len(index) == 16 and len(index.skipped) == 1 and index.skipped[0].endswith("notes.txt")


def test_empty_class_folder_empty_root_and_missing_root(tmp_path):
    root = prepare_synthetic(tmp_path / "empty", n=8, classes=2, min_side=40, max_side=60,
                             progress=False)
    (root / "class_zzz").mkdir()
    with pytest.raises(ValueError, match="class_zzz"):
        ImageFolderIndex(root)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderIndex(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderIndex(tmp_path / "missing")


def test_bad_arguments(synthetic):
    with pytest.raises(ValueError, match="backend"):
        loader(synthetic, backend="opencv")
    with pytest.raises(ValueError, match="batch_size"):
        loader(synthetic, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        loader(synthetic, rank=2, world_size=2)
    with pytest.raises(ValueError, match="recipe"):
        loader(synthetic, recipe="cifar")
    with pytest.raises(ValueError, match="fewer than one batch"):
        loader(synthetic, batch_size=61)


# --------------------------------------------------------------------------- datasets
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_prepare_fashion_mnist_labels_match_the_idx_files(tmp_path):
    out = prepare_fashion_mnist(tmp_path / "fm", limit=300, progress=False)
    with gzip.open(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)[:300]
    index = ImageFolderIndex(out / "train")
    assert len(index) == 300
    for path, label in zip(index.files, index.labels):
        assert labels[int(path[-9:-4])] == label
    image = Image.open(index.files[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image)[:2].max() == 0  # the 2-pixel padding
