"""Any image size (--image-size, imagefolder decoded by a pool of threads) and data too large
for the device (batches moved to the training device one at a time)."""
import functools
import json
import os

import numpy as np
import pytest
import torch

import common
import dim_global
import dim_local
import infoae
import infogan
import shared_exclusive


def png_folder(root, sizes=((80, 96), (96, 80), (64, 64)), classes=("cat", "dog")):
    """root/{train,test}/<class>/<i>.png of random RGB images, one grayscale per class."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            os.makedirs(root / split / cls)
            for i, (h, w) in enumerate(sizes):
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                (image.convert("L") if i == 0 else image).save(root / split / cls / f"{i}.png")
    return root


def test_imagefolder_at_64_px_in_parallel_equals_one_image_at_a_time(tmp_path):
    import torchvision.transforms as T
    from PIL import Image
    root = png_folder(tmp_path)
    data = common.load_data("imagefolder", str(root), image_size=64)
    assert data.train_x.shape == (6, 3, 64, 64) and data.test_x.shape == (6, 3, 64, 64)
    assert data.image_shape == (3, 64, 64) and data.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    # the reference: torchvision's resize (shorter side) and centre crop, one image at a time
    tf = T.Compose([T.Resize(64), T.CenterCrop(64), T.PILToTensor()])
    for i, name in enumerate(["0", "1", "2"]):
        ref = tf(Image.open(root / "train" / "cat" / f"{name}.png").convert("RGB"))
        assert torch.equal(data.train_x[i], ref)
    serial = common._imagefolder(str(root), 64, workers=1)
    assert all(torch.equal(a, b) for a, b in zip(serial[:4], common._imagefolder(str(root), 64, workers=4)[:4]))
    # DIM's 64-px encoder comes with the size, as in the paper (App. A.2)
    assert common.encoder_config("auto", data.image_shape)["arch"] == "alexnet"
    assert common.encoder_config("auto", common.load_data("imagefolder", str(root)).image_shape)["arch"] == "dcgan"


def test_an_undecodable_image_is_named_in_one_error(tmp_path):
    root = png_folder(tmp_path)
    (root / "test" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(common.UserError, match="broken.png"):
        common.load_data("imagefolder", str(root))


def test_resize_keeps_left_and_right_apart():
    x = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    x[:, :, :, :16] = 255  # left half white: a swapped axis would make the top half white
    big = common.resize_images(x, 64)
    assert big.shape == (2, 1, 64, 64) and big.dtype == torch.uint8
    assert (big[:, :, :, :30] == 255).all() and (big[:, :, :, 34:] == 0).all()
    assert common.resize_images(x, 32) is x
    digits = common.load_data("digits", image_size=64)
    assert digits.image_shape == (1, 64, 64)
    assert torch.equal(common.load_data("digits").train_x, common.load_data("digits", image_size=32).train_x)


def test_image_size_flag_reaches_the_data_and_the_checkpoint(tmp_path, monkeypatch):
    # --encoder dcgan: the 64-px AlexNet-style encoder that auto picks (checked above) has
    # 66M parameters, too slow for the suite
    tx, ty, vx, vy = common.load_digits_data(size=64)
    monkeypatch.setattr(common, "load_digits_data",
                        lambda test_fraction=0.2, size=32: (tx[:32], ty[:32], vx[:32], vy[:32]))
    run = dim_local.train(dim_local.parse_args(
        ["--no-progress", "--max-steps", "1", "--batch-size", "16", "--epochs", "1", "--eval-every", "0",
         "--embed-dim", "16", "--y-dim", "16", "--image-size", "64", "--encoder", "dcgan",
         "--out-dir", str(tmp_path)]))
    ckpt = common.load_checkpoint(run.path("checkpoint.pt"))
    assert ckpt["encoder_cfg"]["image_size"] == 64 and ckpt["image_shape"] == [1, 64, 64]
    assert ckpt["args"]["image_size"] == 64


def test_batches_come_on_the_training_device_while_the_data_stay_on_the_cpu():
    # "meta" stands for a GPU here: no memory, but a device other than the data's
    meta = torch.device("meta")
    data = common.load_data("digits", device=meta, max_device_bytes=0)
    assert data.train_x.device.type == "cpu" and data.device == meta
    batches = list(data.batches("train", 500, shuffle=True, rng=torch.Generator().manual_seed(0)))
    assert [x.device for x, _ in batches] == [meta] * 3 and [y.device for _, y in batches] == [meta] * 3
    assert batches[0][0].shape == (500, 1, 32, 32) and batches[0][0].dtype == torch.float32
    assert common.load_data("digits", device=meta).train_x.device == meta  # under the limit: moved
    cpu = common.load_data("digits")
    x, y = next(cpu.batches("train", 64))
    assert x.device.type == "cpu" and cpu.device == torch.device("cpu")


TINY = {
    dim_local: ["--embed-dim", "16", "--y-dim", "16"],
    dim_global: ["--y-dim", "16"],
    infogan: ["--width", "8", "--fc-dim", "32", "--q-dim", "16"],
    infoae: ["--width", "4", "--hidden", "32"],
    shared_exclusive: ["--stage", "1", "--embed-dim", "16", "--shared-dim", "8", "--probes", "linear"],
}


@pytest.mark.parametrize("script", list(TINY), ids=lambda m: m.__name__)
def test_training_on_data_left_on_the_cpu_moves_every_batch_and_changes_nothing(
        script, tmp_path, monkeypatch):
    tx, ty, vx, vy = common.load_digits_data()
    monkeypatch.setattr(common, "load_digits_data",
                        lambda test_fraction=0.2, size=32: (tx[:64], ty[:64], vx[:64], vy[:64]))
    argv = ["--no-progress", "--batch-size", "32", "--epochs", "2", "--max-steps", "3",
            "--eval-every", "1", "--device", "cpu", *TINY[script]]

    def losses(out_dir):
        script.train(script.parse_args([*argv, "--out-dir", str(out_dir)]))
        (name,) = os.listdir(out_dir)
        with open(out_dir / name / "metrics.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f]

    expected = losses(tmp_path / "on_device")
    seen = []
    batches = common.Data.batches

    def watched_batches(self, *a, **kw):
        for x, y, *idx in batches(self, *a, **kw):  # idx: with_index=True
            seen.append((x.device, y.device, self.device, self.train_x.device))
            yield x, y, *idx

    pair_batches = shared_exclusive.PairData.batches

    def watched_pair_batches(self, *a, **kw):
        for x, y, labels in pair_batches(self, *a, **kw):
            seen.append((x.device, labels.device, self.device, self.train_x.device))
            yield x, y, labels

    for module, name in ((common, "load_data"), (shared_exclusive, "load_pair_data")):
        monkeypatch.setattr(module, name, functools.partial(getattr(module, name), max_device_bytes=0))
    monkeypatch.setattr(common.Data, "batches", watched_batches)
    monkeypatch.setattr(shared_exclusive.PairData, "batches", watched_pair_batches)
    assert losses(tmp_path / "left_on_cpu") == expected
    assert seen and all(x == y == want for x, y, want, _ in seen)


def test_pair_batches_come_on_the_training_device_while_the_pairs_stay_on_the_cpu():
    meta = torch.device("meta")
    pair = shared_exclusive.load_pair_data("colorful-digits", device=meta, max_device_bytes=0)
    assert pair.train_x.device.type == "cpu" and pair.device == meta
    x, y, labels = next(pair.batches("train", 64, shuffle=True, rng=torch.Generator().manual_seed(0)))
    assert x.device == y.device == labels.device == meta and x.shape == (64, 3, 32, 32)
    assert pair.domain("x").device == meta
    assert shared_exclusive.load_pair_data("colorful-digits", device=meta).train_x.device == meta
