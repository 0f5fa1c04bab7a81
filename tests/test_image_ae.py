"""image_ae: tiny synthetic ImageFolders (grayscale + RGB, odd sizes) trained for a few steps through the CLI."""
import json
import os
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
PIL = pytest.importorskip("PIL.Image")

from image_ae import data as ia_data  # noqa: E402
from image_ae import train as ia_train  # noqa: E402
from image_ae.models import ImageAutoencoder, build_config  # noqa: E402

TINY = ["--arch", "vqvae", "--hidden-dim", "8", "--res-hidden-dim", "4", "--code-dim", "4", "--num-codes", "8",
        "--image-size", "16", "--batch-size", "4", "--eval-batch-size", "5", "--log-interval", "1",
        "--no-progress", "--num-recon", "4", "--threads", "1"]


def _write_images(folder, n, sizes, modes, seed):
    rng = np.random.RandomState(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        mode = modes[i % len(modes)]
        shape = (h, w) if mode == "L" else (h, w, 3)
        arr = (rng.rand(*shape) * 255).astype(np.uint8)
        cls = os.path.join(folder, f"class{i % 2}")
        os.makedirs(cls, exist_ok=True)
        PIL.fromarray(arr, mode=mode).save(os.path.join(cls, f"{i:03d}.png"))


@pytest.fixture
def split_folder(tmp_path):
    """root/train/<class>/*.png and root/test/<class>/*.png, mixed grayscale and RGB, odd sizes."""
    root = tmp_path / "imgs"
    _write_images(str(root / "train"), 12, [(37, 23), (20, 41), (16, 16)], ["L", "RGB"], 0)
    _write_images(str(root / "test"), 5, [(19, 31)], ["RGB", "L"], 1)
    return str(root)


@pytest.fixture
def gray_folder(tmp_path):
    """root/<class>/*.png, grayscale only, no train/test split."""
    root = tmp_path / "gray"
    _write_images(str(root), 10, [(29, 17), (15, 22)], ["L"], 2)
    return str(root)


def _run(folder, save_dir, *extra):
    return ia_train.main(["--dataset", "imagefolder", "--data-dir", folder, "--save-dir", str(save_dir), *TINY,
                          *extra])


def _state(save_dir):
    return torch.load(os.path.join(str(save_dir), ia_train.CHECKPOINT), map_location="cpu", weights_only=False)


def test_train_writes_outputs(split_folder, tmp_path):
    save = tmp_path / "run"
    final = _run(split_folder, save, "--max-steps", "5", "--eval-interval", "2", "--bottleneck", "vq")
    files = set(os.listdir(save))
    assert {"checkpoint_last.pt", "metrics.jsonl", "train_log.jsonl", "config.json", "curves.png"} <= files
    assert {"recon_2.png", "recon_4.png", "recon_5.png"} <= files  # evaluation always at the end (step 5)
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 5]
    for r in rows:
        assert {"step", "mse", "psnr", "code_ppl", "codes_used"} <= set(r)
        assert 0 < r["mse"] < 1 and r["psnr"] > 0 and 1 <= r["codes_used"] <= 8 and 1 <= r["code_ppl"] <= 8
    assert final == rows[-1]
    # mixed grayscale / RGB folder -> 3 channels; grid: 4 originals above 4 reconstructions of 16x16
    img = PIL.open(save / "recon_5.png")
    assert img.mode == "RGB" and img.size == (2 + 4 * 18, 2 + 2 * 18)
    ckpt = _state(save)
    assert ckpt["step"] == 5 and ckpt["args"]["channels"] == 3
    assert {"quantizer.ema_count", "quantizer.ema_sum", "quantizer.embed"} <= set(ckpt["model"])
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"]) and ckpt["optimizer"]["state"]


@pytest.mark.parametrize("bottleneck", ["vq", "em"])
def test_resume_matches_uninterrupted(split_folder, tmp_path, bottleneck):
    common = ["--bottleneck", bottleneck, "--num-samples", "3", "--eval-interval", "4"]
    full = _run(split_folder, tmp_path / "full", "--max-steps", "7", *common)
    _run(split_folder, tmp_path / "part", "--max-steps", "3", *common)  # stops mid-epoch (3 steps per epoch)...
    _run(split_folder, tmp_path / "part", "--max-steps", "5", "--resume", *common)  # ...and again in the next
    resumed = _run(split_folder, tmp_path / "part", "--max-steps", "7", "--resume", *common)
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert a["step"] == b["step"] == 7
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][k][name]))
    assert resumed["mse"] == full["mse"] and resumed["codes_used"] == full["codes_used"]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert steps == [3, 4, 5, 7]  # each short run ends with an evaluation
    logs = [json.loads(line)["step"] for line in open(tmp_path / "part" / "train_log.jsonl")]
    assert logs == list(range(1, 8))


def test_grayscale_heldout_split_and_paper_preset(gray_folder, tmp_path):
    s1 = ia_data.build_splits("imagefolder", gray_folder, image_size=16, progress=False)
    s2 = ia_data.build_splits("imagefolder", gray_folder, image_size=16, progress=False)
    assert s1.channels == 1 and (len(s1.train), len(s1.test)) == (9, 1)
    assert torch.equal(s1.test.images, s2.test.images)  # deterministic held-out split
    assert s1.train.images.shape == (9, 1, 16, 16) and s1.train.images.dtype == torch.uint8
    save = tmp_path / "gray_run"
    m = ia_train.main(["--dataset", "imagefolder", "--data-dir", gray_folder, "--save-dir", str(save),
                       "--arch", "paper", "--hidden-dim", "8", "--code-dim", "4", "--num-codes", "8",
                       "--image-size", "16", "--batch-size", "3", "--max-steps", "2", "--no-progress",
                       "--no-plots", "--bottleneck", "em", "--num-samples", "2", "--threads", "1"])
    assert m["step"] == 2 and m["eval_images"] == 1
    assert PIL.open(save / "recon_2.png").mode in ("L", "RGB")
    assert _state(save)["args"]["channels"] == 1


def test_files_read_on_demand_match_in_memory(split_folder, tmp_path):
    a = _run(split_folder, tmp_path / "mem", "--max-steps", "4", "--no-plots")
    b = _run(split_folder, tmp_path / "lazy", "--max-steps", "4", "--no-plots", "--no-cache", "--num-workers", "1")
    assert a["mse"] == b["mse"]
    sa, sb = _state(tmp_path / "mem")["model"], _state(tmp_path / "lazy")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_paper_preset_latent_field():
    cfg = build_config("paper", 3, 32, {"hidden_dim": 8, "code_dim": 6})
    assert (cfg.num_codes, cfg.latents_per_position, cfg.grid, cfg.num_latents) == (256, 10, 8, 640)
    model = ImageAutoencoder(cfg)
    x = torch.rand(2, 3, 32, 32)
    recon, out, z_e = model(x)
    assert z_e.shape == (2, 8, 8, 10, 6) and out.codes.shape == (2, 8, 8, 10) and recon.shape == x.shape
    full = build_config("paper", 3, 32)
    assert (full.num_codes, full.code_dim, full.num_latents) == (256, 512, 640)
    vq = build_config("vqvae", 3, 32)
    assert (vq.grid, vq.latents_per_position) == (8, 1)


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ia_data.DatasetNotFoundError, match="--download"):
        ia_train.main(["--dataset", "cifar10", "--data-dir", str(empty), "--save-dir", str(tmp_path / "o"),
                       "--max-steps", "1", "--no-progress"])
    with pytest.raises(ia_data.DatasetNotFoundError, match="does not exist"):
        ia_data.build_splits("imagefolder", str(tmp_path / "missing"))
    with pytest.raises(ia_data.DatasetNotFoundError, match="no images"):
        ia_data.build_splits("imagefolder", str(empty))
    with pytest.raises(SystemExit) as e:
        ia_train.cli_main(["--dataset", "mnist", "--data-dir", str(empty), "--save-dir", str(tmp_path / "o"),
                           "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "mnist" in err and "--download" in err


def test_cifar10_imagefolder_tree_and_tarball_helper(tmp_path):
    # a miniature of the JPEG tarballs: train/<class>/NNNN.jpg, test/<class>/NNNN.jpg
    src, tree = tmp_path / "src", tmp_path / "tree"
    src.mkdir()
    for split, n in (("train", 6), ("test", 2)):
        _write_images(str(tree / split), n, [(32, 32)], ["RGB"], 3)
        with tarfile.open(src / f"cifar10_{split}.jpg.tar.gz", "w:gz") as t:
            t.add(str(tree / split), arcname=split)
    with pytest.raises(ia_data.DatasetNotFoundError, match="prepare_cifar10"):
        ia_data.build_splits("cifar10", str(src))
    from image_ae.prepare_cifar10 import prepare

    dest = str(tmp_path / "cifar")
    prepare(str(src), dest)
    s = ia_data.build_splits("cifar10", dest, image_size=32, progress=False)
    assert (len(s.train), len(s.test), s.channels) == (6, 2, 3)


def test_robustness_table(split_folder, tmp_path):
    from image_ae import robustness

    out = tmp_path / "rob"
    rows = robustness.main(["--seeds", "1", "2", "--save-dir", str(out), "--dataset", "imagefolder",
                            "--data-dir", split_folder, "--max-steps", "2", "--num-samples", "2", *TINY])
    assert [(r["bottleneck"], r["seed"]) for r in rows] == [("vq", 1), ("vq", 2), ("em", 1), ("em", 2)]
    assert all({"psnr", "codes_used", "collapsed"} <= set(r) for r in rows)
    assert (out / "robustness.md").exists() and (out / "robustness.png").exists()
    assert (out / "robustness.json").exists()
