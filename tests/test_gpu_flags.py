"""The shared flags for GPUs and logging: --tensorboard (optional package), TF32 and
--deterministic, --sync-bn; what of them a CPU can check."""
import json
import os
import sys
import types

import pytest
import torch
import torch.nn as nn

import common
import dim_global
import dim_local
import infoae
import infogan
import shared_exclusive

FAST = ["--no-progress", "--max-steps", "2", "--batch-size", "32", "--epochs", "2", "--y-dim", "16",
        "--device", "cpu"]


@pytest.fixture
def small_digits(monkeypatch):
    tx, ty, vx, vy = common.load_digits_data()
    monkeypatch.setattr(common, "load_digits_data",
                        lambda test_fraction=0.2, size=32: (tx[:32], ty[:32], vx[:64], vy[:64]))


@pytest.fixture
def torch_flags():
    """Put back the global torch settings a test changes."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[2:6]
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize("script", [dim_local, dim_global, infogan, infoae, shared_exclusive],
                         ids=lambda m: m.__name__)
def test_every_training_script_has_the_shared_flags(script):
    args = script.parse_args(["--tensorboard", "--deterministic", "--sync-bn", "--image-size", "64"])
    assert args.tensorboard and args.deterministic and args.sync_bn and args.image_size == 64
    args = script.parse_args([])
    assert not (args.tensorboard or args.deterministic or args.sync_bn) and args.image_size is None


def test_tf32_on_cuda_unless_deterministic(torch_flags):
    # the flags are plain settings: a machine without a GPU can set and read them
    torch.backends.cuda.matmul.allow_tf32 = False
    common.set_precision(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32  # CPU runs: untouched
    assert not torch.are_deterministic_algorithms_enabled()
    common.set_precision(torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()
    common.set_precision(torch.device("cuda"), deterministic=True)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_deterministic_changes_no_number_on_cpu(tmp_path, small_digits, torch_flags):
    def metrics(*extra):
        out = tmp_path / str(len(os.listdir(tmp_path)))
        run = dim_global.train(dim_global.parse_args([*FAST, *extra, "--out-dir", str(out)]))
        with open(run.metrics_path) as f:
            return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f]

    plain = metrics()
    assert metrics("--deterministic") == plain
    assert torch.are_deterministic_algorithms_enabled()


def test_sync_bn_converts_in_place_and_only_under_torchrun_on_cuda():
    torch.manual_seed(0)
    enc = common.build_encoder(common.encoder_config("dcgan", (1, 32, 32), 16))
    params = list(enc.parameters())
    keys = list(enc.state_dict())
    common.convert_sync_bn([enc], True, world=1, device=torch.device("cuda"))  # one process
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in enc.modules())
    common.convert_sync_bn([enc], False, world=2, device=torch.device("cuda"))  # not asked
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in enc.modules())
    with pytest.raises(common.UserError, match="--sync-bn needs CUDA"):
        common.convert_sync_bn([enc], True, world=2, device=torch.device("cpu"))
    plain = common.build_encoder(common.encoder_config("dcgan", (1, 32, 32), 16))
    plain.load_state_dict(enc.state_dict())
    # converting needs no GPU: what an optimiser and a checkpoint see stays the same
    common.convert_sync_bn([enc], True, world=2, device=torch.device("cuda"))
    n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in enc.modules())
    assert n_sync == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()) == 4
    assert all(a is b for a, b in zip(enc.parameters(), params)) and list(enc.state_dict()) == keys
    # rank 0 recalibrates alone: its SyncBatchNorm layers must not wait for other ranks
    data = common.load_data("digits")
    common.recalibrate_batchnorm(enc, data, "cpu")
    common.recalibrate_batchnorm(plain, data, "cpu")
    for (k, a), b in zip(enc.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    assert all("forward" not in vars(m) for m in enc.modules())  # patch undone


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what it is given."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.images, self.closed = log_dir, [], [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, image, step, dataformats):
        assert dataformats == "HWC" and image.ndim == 3 and image.shape[2] == 3
        self.images.append((tag, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_number_of_metrics_jsonl_and_the_pictures(tmp_path, small_digits,
                                                                         monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.made.clear()
    run = dim_global.train(dim_global.parse_args(
        [*FAST, "--shift", "2", "--cross-view", "shift", "--eval-every", "1", "--tensorboard",
         "--out-dir", str(tmp_path)]))
    (writer,) = FakeWriter.made
    assert writer.log_dir == run.dir
    with open(run.metrics_path) as f:
        lines = [json.loads(line) for line in f]
    expected = [(k, v, m["step"]) for m in lines for k, v in m.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert writer.scalars == expected and ("knn_y", lines[0]["knn_y"], 1) in expected
    run.close_tensorboard()  # what atexit does: the pictures written after the last line too
    assert {"views", "curves"} <= {tag for tag, _ in writer.images} and writer.closed
    assert ("views", 1) in writer.images  # written at step 0, seen at the first log line


def test_tensorboard_writes_event_files(tmp_path, small_digits):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = dim_global.train(dim_global.parse_args([*FAST, "--tensorboard", "--out-dir", str(tmp_path)]))
    run.close_tensorboard()
    events = EventAccumulator(run.dir).Reload()
    with open(run.metrics_path) as f:
        first = json.loads(f.readline())
    (loss,) = [e for e in events.Scalars("loss") if e.step == first["step"]]
    assert loss.value == pytest.approx(first["loss"], rel=1e-6)
    assert "curves" in events.Tags()["images"]


def test_tensorboard_missing_is_one_line_and_exit_2_before_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: dim_global.main([*FAST, "--tensorboard", "--out-dir", str(tmp_path / "runs")]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --tensorboard needs the tensorboard package: pip install tensorboard, "
                   "or run without --tensorboard"]
    assert not os.path.exists(tmp_path / "runs") or os.listdir(tmp_path / "runs") == []
