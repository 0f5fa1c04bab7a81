"""image_ae: tiny synthetic ImageFolders (grayscale + RGB, odd sizes) trained for a few steps through the CLI."""
import json
import math
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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is much faster than several, especially on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_latent_norm_puts_z_e_on_the_codes_scale():
    """--latent-norm layer: each latent of z_e is the raw output layer-normalised over code_dim (numpy), so its
    squared norm is code_dim, the E||e_j||^2 of the N(0, I) codes; the raw conv output starts far inside."""
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)
    raw = None
    for norm in ("none", "layer"):
        torch.manual_seed(0)  # the norm has no parameters: both models get the same weights
        model = ImageAutoencoder(build_config("vqvae", 3, 32, {"latent_norm": norm})).eval()
        with torch.no_grad():
            z = model.encode(x)
        assert z.shape == (4, 8, 8, 1, 64)
        zn = z.reshape(-1, 64).double().numpy()
        if norm == "none":
            raw = zn
            continue
        want = (raw - raw.mean(1, keepdims=True)) / np.sqrt(raw.var(1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(zn, want, rtol=1e-4, atol=1e-4)
        codes_sq = (model.quantizer.embed[0].double().numpy() ** 2).sum(1).mean()
        assert abs((zn ** 2).sum(1).mean() - codes_sq) < 0.1 * codes_sq
        assert (raw ** 2).sum(1).mean() < 0.1 * codes_sq
    with pytest.raises(ValueError, match="latent_norm"):
        ImageAutoencoder(build_config("vqvae", 3, 32, {"latent_norm": "batch"}))


def test_resume_of_a_checkpoint_without_latent_norm_keeps_the_raw_z_e(split_folder, tmp_path):
    """Checkpoints written before --latent-norm existed hold un-normalised models: they resume as 'none'."""
    _run(split_folder, tmp_path, "--max-steps", "1", "--latent-norm", "none", "--no-plots")
    state = _state(tmp_path)
    del state["args"]["latent_norm"]
    torch.save(state, os.path.join(str(tmp_path), ia_train.CHECKPOINT))
    _run(split_folder, tmp_path, "--max-steps", "2", "--resume", "--no-plots")
    assert _state(tmp_path)["args"]["latent_norm"] == "none"


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
    assert (out / "robustness_curves.png").exists() and (out / "robustness_recons.png").exists()
    assert (out / "robustness.json").exists()
    # --fresh retrains a finished run (it replaces it explicitly: image_ae.train --overwrite)
    again = robustness.main(["--seeds", "1", "--bottlenecks", "vq", "--fresh", "--save-dir", str(out), "--dataset",
                             "imagefolder", "--data-dir", split_folder, "--max-steps", "1", *TINY])
    assert again[0]["step"] == 1
    with pytest.raises(SystemExit, match=r"must not repeat a value"):
        robustness.main(["--seeds", "1", "1", "--save-dir", str(out)])
    with pytest.raises(SystemExit, match=r"--overwrite is set per run by image_ae.robustness"):
        robustness.main(["--save-dir", str(out), "--overwrite"])


# ---------------------------------------------------------------------------------------------- one training step
@pytest.mark.parametrize("arch", ["paper", "vqvae"])
@pytest.mark.parametrize("bottleneck", ["vq", "em"])
def test_one_step_reduces_loss_on_a_fixed_batch(arch, bottleneck):
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg = build_config(arch, 3, 16, {"hidden_dim": 8, "res_hidden_dim": 4, "code_dim": 4, "num_codes": 16,
                                     "latents_per_position": 2, "bottleneck": bottleneck, "num_samples": 4})
    model = ImageAutoencoder(cfg)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def loss_on_batch():
        torch.manual_seed(123)  # em: the same sampling noise for both evaluations
        recon, out, _ = model(x)
        return F.mse_loss(recon, x) + out.loss

    model.eval()  # evaluation: no EMA update of the codebook
    with torch.no_grad():
        before = float(loss_on_batch())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()  # the training step: gradient step + (for --update ema) the codebook's EMA step
    loss = loss_on_batch()
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(loss_on_batch())
    assert after < before, (before, after)


# ---------------------------------------------------------------------------------------------- every CLI option
# one non-default value per option (dest -> (command-line tokens, expected parsed value))
CLI_VALUES = {
    "dataset": (["--dataset", "svhn"], "svhn"),
    "data_dir": (["--data-dir", "/some/dir"], "/some/dir"),
    "download": (["--download"], True),
    "image_size": (["--image-size", "64"], 64),
    "channels": (["--channels", "1"], "1"),
    "val_fraction": (["--val-fraction", "0.25"], 0.25),
    "no_cache": (["--no-cache"], True),
    "num_workers": (["--num-workers", "3"], 3),
    "arch": (["--arch", "paper"], "paper"),
    "bottleneck": (["--bottleneck", "em"], "em"),
    "num_samples": (["--num-samples", "7"], 7),
    "num_codes": (["--num-codes", "128"], 128),
    "code_dim": (["--code-dim", "32"], 32),
    "hidden_dim": (["--hidden-dim", "96"], 96),
    "res_hidden_dim": (["--res-hidden-dim", "24"], 24),
    "latents_per_position": (["--latents-per-position", "5"], 5),
    "num_downsample": (["--num-downsample", "3"], 3),
    "num_residual": (["--num-residual", "4"], 4),
    "update": (["--codebook-update", "grad"], "grad"),
    "decay": (["--codebook-decay", "0.99"], 0.99),
    "beta": (["--commitment-beta", "0.5"], 0.5),
    "temperature": (["--soft-em-temperature", "0.5"], 0.5),
    "epsilon": (["--codebook-epsilon", "1e-6"], 1e-6),
    "kmeans_init": (["--no-kmeans-init"], False),
    "dead_code_threshold": (["--dead-code-threshold", "0.01"], 0.01),
    "latent_norm": (["--latent-norm", "none"], "none"),
    "epochs": (["--epochs", "2.5"], 2.5),
    "max_steps": (["--max-steps", "1000"], 1000),
    "batch_size": (["--batch-size", "16"], 16),
    "lr": (["--lr", "0.002"], 0.002),
    "warmup_steps": (["--warmup-steps", "100"], 100),
    "lr_half_life": (["--lr-half-life", "500"], 500),
    "weight_decay": (["--weight-decay", "0.01"], 0.01),
    "clip_norm": (["--clip-norm", "1.5"], 1.5),
    "seed": (["--seed", "42"], 42),
    "device": (["--device", "cpu"], "cpu"),
    "threads": (["--threads", "2"], 2),
    "save_dir": (["--save-dir", "/tmp/out"], "/tmp/out"),
    "resume": (["--resume", "/tmp/out/ckpt.pt"], "/tmp/out/ckpt.pt"),
    "overwrite": (["--overwrite"], True),
    "eval_interval": (["--eval-interval", "10"], 10),
    "save_interval": (["--save-interval", "20"], 20),
    "eval_samples": (["--eval-samples", "500"], 500),
    "eval_batch_size": (["--eval-batch-size", "64"], 64),
    "log_interval": (["--log-interval", "5"], 5),
    "num_recon": (["--num-recon", "4"], 4),
    "no_progress": (["--no-progress"], True),
    "no_plots": (["--no-plots"], True),
}


def test_every_cli_option_parses():
    import argparse

    parser = ia_train.get_parser()
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    dests = {a.dest for a in actions}
    assert dests == set(CLI_VALUES), f"options without a test value: {dests - set(CLI_VALUES)}; " \
        f"stale test values: {set(CLI_VALUES) - dests}"
    defaults = parser.parse_args([])
    argv = []
    for a in actions:
        tokens, expected = CLI_VALUES[a.dest]
        assert tokens[0] in a.option_strings, (a.dest, tokens[0])
        assert getattr(defaults, a.dest) != expected, f"{a.dest}: the test value equals the default"
        if a.choices is not None:
            assert expected in a.choices
        argv += tokens
    args = parser.parse_args(argv)
    assert vars(args) == {dest: expected for dest, (_, expected) in CLI_VALUES.items()}
    for dest, (_, expected) in CLI_VALUES.items():
        assert type(getattr(args, dest)) is type(expected), dest
    # --resume without a value: SAVE_DIR/checkpoint_last.pt
    assert parser.parse_args(["--resume"]).resume == "auto"
    # the quantizer options carry the fairseq model's names; the short old names still parse
    old = parser.parse_args(["--update", "grad", "--decay", "0.9", "--epsilon", "1e-3", "--beta", "0.1",
                             "--temperature", "3"])
    assert (old.update, old.decay, old.epsilon, old.beta, old.temperature) == ("grad", 0.9, 1e-3, 0.1, 3.0)
    # a bad value is rejected by the parser (exit code 2)
    for bad in (["--bottleneck", "gumbel"], ["--image-size", "big"], ["--channels", "4"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(bad)
        assert e.value.code == 2


# ---------------------------------------------------------------------------------------------- bad input
def _truncated_jpeg(path):
    rng = np.random.RandomState(5)
    PIL.fromarray((rng.rand(48, 48, 3) * 255).astype(np.uint8)).save(path, quality=90)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 2 // 3])  # the header (~600 bytes) is intact, the scan data is cut
    with PIL.open(path) as img:
        assert img.size == (48, 48)  # opens...
        with pytest.raises(OSError, match="truncated"):
            img.load()  # ...but cannot be decoded


def test_corrupt_image_file_is_reported_with_its_path(split_folder, tmp_path, capsys):
    bad = os.path.join(split_folder, "train", "class0", "bad.png")
    with open(bad, "wb") as f:
        f.write(np.random.RandomState(0).bytes(300))  # random bytes with an image extension
    trunc = os.path.join(split_folder, "test", "class1", "trunc.jpg")
    _truncated_jpeg(trunc)  # a valid header, a truncated body: fails only when decoded
    # cached: both are reported together when the dataset is loaded
    for channels in (None, 1):
        with pytest.raises(ia_data.BadImageError, match="cannot read 2 image files") as e:
            ia_data.build_splits("imagefolder", split_folder, image_size=16, channels=channels, progress=False)
        assert e.value.paths == [bad, trunc]
        msg = str(e.value)
        assert f"{bad}: UnidentifiedImageError" in msg and f"{trunc}: OSError: image file is truncated" in msg
    # not cached: the header scan (channel detection) finds the file that is not an image
    with pytest.raises(ia_data.BadImageError, match="bad.png") as e:
        ia_data.build_splits("imagefolder", split_folder, image_size=16, cache=False, progress=False)
    assert e.value.paths == [bad]
    os.remove(bad)
    with pytest.raises(ia_data.BadImageError, match="truncated") as e:
        ia_data.build_splits("imagefolder", split_folder, image_size=16, progress=False)
    assert e.value.paths == [trunc] and str(e.value).startswith(f"cannot read image file {trunc!r}")
    # the CLI: a clear message naming the file, exit code 2
    with pytest.raises(SystemExit) as e:
        ia_train.cli_main(["--dataset", "imagefolder", "--data-dir", split_folder, "--save-dir",
                           str(tmp_path / "o"), "--max-steps", "1", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert trunc in err and "Remove or replace" in err
    # --no-cache: nothing is decoded up front; the file is named when it is read (here: at the evaluation)
    s = ia_data.build_splits("imagefolder", split_folder, image_size=16, cache=False, progress=False)
    i = s.test.paths.index(trunc)
    with pytest.raises(ia_data.BadImageError, match="trunc.jpg"):
        s.test[i]
    with pytest.raises(ia_data.BadImageError, match="trunc.jpg"):
        _run(split_folder, tmp_path / "lazy", "--max-steps", "1", "--no-plots", "--no-cache")


def test_rgba_palette_16bit_and_tiny_images(tmp_path):
    rng = np.random.RandomState(7)
    root = tmp_path / "modes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    rgb = (rng.rand(9, 13, 3) * 255).astype(np.uint8)
    rgba = np.concatenate([rgb, (rng.rand(9, 13, 1) > 0.5).astype(np.uint8) * 255], -1)
    PIL.fromarray(rgba).save(root / "a" / "rgba.png")  # RGBA, smaller than --image-size
    PIL.fromarray(rgb).convert("P", palette=PIL.Palette.ADAPTIVE, colors=8).save(root / "a" / "palette.png")
    pt = PIL.fromarray(rgb).convert("P", palette=PIL.Palette.ADAPTIVE, colors=8)
    pt.save(root / "a" / "palette_transparent.png", transparency=0)
    PIL.fromarray(rgba).convert("LA").save(root / "b" / "la.png")
    PIL.fromarray((rng.rand(20, 18) * 65535).astype(np.uint16)).save(root / "b" / "gray16.png")  # 16-bit
    PIL.fromarray(rgb[:2, :3]).save(root / "b" / "tiny.bmp")  # 3x2 pixels
    PIL.fromarray(rgb[:1, :1, 0]).convert("1").save(root / "b" / "one_pixel_bilevel.png")
    PIL.fromarray(rgb).convert("CMYK").save(root / "b" / "cmyk.jpg")
    modes = sorted(PIL.open(p).mode for p in ia_data.list_images(str(root)))
    assert {"RGBA", "P", "LA", "1", "CMYK", "RGB"} <= set(modes) and any(m.startswith("I") for m in modes)

    s = ia_data.build_splits("imagefolder", str(root), image_size=16, progress=False)
    assert s.channels == 3 and s.train.images.shape[1:] == (3, 16, 16) and len(s.train) + len(s.test) == 8
    gray = ia_data.build_splits("imagefolder", str(root), image_size=16, channels=1, progress=False)
    assert gray.train.images.shape[1:] == (1, 16, 16)
    # alpha is composited onto black: a fully transparent pixel is black, an opaque one keeps its colour
    px = PIL.fromarray(np.array([[[200, 100, 50, 0], [200, 100, 50, 255]]], dtype=np.uint8))
    assert ia_data.pil_to_uint8(px.crop((0, 0, 1, 1)), 3, 1).flatten().tolist() == [0, 0, 0]
    assert ia_data.pil_to_uint8(px.crop((1, 0, 2, 1)), 3, 1).flatten().tolist() == [200, 100, 50]
    pal = PIL.new("P", (1, 1), 0)
    pal.putpalette([200, 100, 50] * 256)
    assert ia_data.pil_to_uint8(pal, 3, 1).flatten().tolist() == [200, 100, 50]
    pal.info["transparency"] = 0
    assert ia_data.pil_to_uint8(pal, 3, 1).flatten().tolist() == [0, 0, 0]
    # 16-bit grayscale keeps its range
    g16 = ia_data.pil_to_uint8(PIL.fromarray(np.array([[0, 65535]], dtype=np.uint16)).resize((2, 2)), 1, 2)
    assert g16.min() == 0 and g16.max() == 255

    save = tmp_path / "modes_run"
    m = ia_train.main(["--dataset", "imagefolder", "--data-dir", str(root), "--save-dir", str(save), *TINY,
                       "--max-steps", "1", "--no-plots", "--val-fraction", "0.25"])
    assert m["step"] == 1 and math.isfinite(m["mse"]) and _state(save)["args"]["channels"] == 3
    m = ia_train.main(["--dataset", "imagefolder", "--data-dir", str(root), "--save-dir", str(tmp_path / "lazy"),
                       *TINY, "--max-steps", "1", "--no-plots", "--val-fraction", "0.25", "--no-cache"])
    assert m["step"] == 1 and math.isfinite(m["mse"])


def test_a_cli_run_prints_no_debug_lines(split_folder, tmp_path):
    """``python -m image_ae.train`` in a fresh interpreter: plots included, no DEBUG log lines (importing fairseq
    used to set the root logger to DEBUG, flooding runs with matplotlib's) and fairseq never loaded."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import runpy, sys\n"
            "sys.argv = ['image_ae.train'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('image_ae.train', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('fairseq loaded:', any(m.split('.')[0] == 'fairseq' for m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code, "--dataset", "imagefolder", "--data-dir", split_folder,
                        "--save-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"],
                       cwd=root, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "fairseq loaded: False" in p.stdout
    assert os.path.exists(tmp_path / "run" / "curves.png")
    assert "DEBUG" not in out, [line for line in out.splitlines() if "DEBUG" in line][:5]


def test_eval_samples_are_spread_over_a_class_sorted_folder(tmp_path):
    """--eval-samples N on an ImageFolder sorted by class (class0 black, class1 white): the evaluated images and the
    reconstruction grid, whose images are spread over the evaluated ones, hold both classes: the same ones for
    every seed and every evaluation batch size."""
    root = tmp_path / "sorted"
    for cls, value in (("class0", 0), ("class1", 255)):
        os.makedirs(root / "test" / cls)
        os.makedirs(root / "train" / cls)
        for i in range(6):
            for split in ("train", "test"):
                PIL.fromarray(np.full((16, 16, 3), value, np.uint8)).save(str(root / split / cls / f"{i}.png"))
    assert ia_train.eval_indices(12, 4).tolist() == [0, 3, 6, 9]
    grids = []
    for seed, eval_batch in ((1, 256), (2, 3)):
        save = tmp_path / f"run{seed}"
        # 4 evaluated images (0, 3, 6, 9: two per class); the grid shows the 1st and 3rd of them (0 and 6)
        _run(str(root), save, "--max-steps", "1", "--eval-samples", "4", "--num-recon", "2", "--seed", str(seed),
             "--eval-batch-size", str(eval_batch), "--no-plots")
        png = sorted(f for f in os.listdir(save) if f.startswith("recon_"))[-1]
        grid = np.asarray(PIL.open(save / png).convert("L"), dtype=np.float64)
        tiles = [grid[2:18, 2 + 18 * i: 18 + 18 * i].mean() for i in range(2)]  # top row: the originals
        grids.append(tiles)
    assert grids[0] == grids[1]
    assert min(grids[0]) < 10 and max(grids[0]) > 245, grids[0]


@pytest.mark.parametrize("bottleneck", ["vq", "em"])
def test_eval_posterior_entropy_equals_numpy_and_rises_with_temperature(split_folder, tmp_path, bottleneck):
    """metrics.jsonl's posterior_entropy is the mean over the evaluation images' latents of the entropy of
    softmax_j(-||z_e - e_j||^2 / T), recomputed here in numpy from the saved model; a hotter E-step is softer."""
    from image_ae.data import build_splits
    from image_ae.models import ImageAutoencoder, build_config

    got = {}
    for t in (0.01, 1.0, 100.0):
        save = tmp_path / f"{bottleneck}-T{t}"
        m = _run(split_folder, save, "--bottleneck", bottleneck, "--max-steps", "2", "--soft-em-temperature", str(t),
                 "--no-plots")
        got[t] = m["posterior_entropy"]
        state = _state(save)
        a = state["args"]
        splits = build_splits("imagefolder", split_folder, a["image_size"], a["channels"], progress=False)
        overrides = {k: a[k] for k in ia_train.MODEL_KEYS if k not in ("arch", "image_size", "channels", "seed")}
        model = ImageAutoencoder(build_config(a["arch"], a["channels"], a["image_size"], overrides))
        model.load_state_dict(state["model"])
        model.eval()
        x = torch.stack([splits.test[i] for i in range(len(splits.test))])  # in [0, 1]
        with torch.no_grad():
            z = model.encode(x).reshape(-1, model.config.code_dim).double().numpy()
        e = model.quantizer.embed[0].double().numpy()
        logits = -((z[:, None, :] - e[None, :, :]) ** 2).sum(-1) / t
        q = np.exp(logits - logits.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        want = float(-(q * np.log(np.clip(q, 1e-300, None))).sum(1).mean())
        assert m["posterior_entropy"] == pytest.approx(want, rel=1e-3, abs=1e-4)
        assert 0.0 <= m["posterior_entropy"] <= np.log(8) + 1e-6
    assert got[0.01] <= got[1.0] <= got[100.0] and got[100.0] > got[0.01]


# ---------------------------------------------------------------------------------------------- outputs never lost
def test_a_save_dir_holding_a_run_needs_resume_or_overwrite(split_folder, tmp_path):
    save = tmp_path / "missing" / "parent" / "run"  # parents are created
    _run(split_folder, save, "--max-steps", "2", "--no-plots")
    before = {f: (save / f).read_bytes() for f in os.listdir(save)}
    with pytest.raises(SystemExit, match=r"--save-dir .*run already holds a run \(checkpoint_last.pt, config.json, "
                                         r"metrics.jsonl, recon_2.png, ...\); starting from scratch would replace it\. "
                                         r"Pass --resume to continue it, --overwrite to replace it"):
        _run(split_folder, save, "--max-steps", "3", "--no-plots")
    # another run's checkpoint resumed into this directory would overwrite it too
    other = tmp_path / "other"
    _run(split_folder, other, "--max-steps", "1", "--no-plots")
    with pytest.raises(SystemExit, match="it would be overwritten by the run resumed from"):
        _run(split_folder, save, "--max-steps", "3", "--no-plots", "--resume", str(other / ia_train.CHECKPOINT))
    with pytest.raises(SystemExit, match="--resume continues a run and --overwrite replaces it"):
        _run(split_folder, save, "--max-steps", "3", "--resume", "--overwrite")
    assert {f: (save / f).read_bytes() for f in os.listdir(save)} == before  # nothing touched
    # --overwrite starts over: the old run's images and logs are gone, not mixed with the new ones
    _run(split_folder, save, "--max-steps", "1", "--no-plots", "--overwrite")
    assert sorted(os.listdir(save)) == ["checkpoint_last.pt", "config.json", "metrics.jsonl", "recon_1.png",
                                        "train_log.jsonl"]
    assert _state(save)["step"] == 1
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="afile is a file, not a directory"):
        _run(split_folder, tmp_path / "afile", "--max-steps", "1")


def test_resume_names_a_wrong_or_corrupt_checkpoint_before_any_work(split_folder, tmp_path, monkeypatch):
    def no_data(*a, **k):
        raise AssertionError("the data was read before the checkpoint was checked")

    monkeypatch.setattr(ia_train, "build_splits", no_data)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*bad.pt \(UnpicklingError.*it is corrupt or not a "
                                         r"checkpoint"):
        _run(split_folder, tmp_path / "a", "--resume", str(bad))
    fairseq_like = tmp_path / "lt.pt"
    torch.save({"cfg": {"model": {"arch": "latent_transformer"}}, "model": {}, "args": None}, fairseq_like)
    with pytest.raises(SystemExit, match=r"--resume .*lt.pt is a fairseq checkpoint \(translation model\), not an "
                                         r"image_ae one"):
        _run(split_folder, tmp_path / "b", "--resume", str(fairseq_like))
    with pytest.raises(SystemExit, match=r"--resume .*nowhere.pt: no such checkpoint"):
        _run(split_folder, tmp_path / "c", "--resume", str(tmp_path / "nowhere.pt"))


@pytest.mark.parametrize("argv, message", [
    (["--soft-em-temperature", "-1"], r"--soft-em-temperature must be in \[0.0001, inf\), got -1.0"),
    (["--soft-em-temperature", "0"], r"--soft-em-temperature must be in \[0.0001, inf\), got 0.0"),
    (["--codebook-decay", "1"], r"--codebook-decay must be in \[0, 1\), got 1.0"),
    (["--log-interval", "0"], r"--log-interval must be >= 1, got 0"),
    (["--num-codes", "0"], r"--num-codes must be >= 1, got 0"),
    (["--lr", "nan"], r"--lr must be in \(0, inf\), got nan"),
    (["--val-fraction", "1"], r"--val-fraction must be in \(0, 1\), got 1.0"),
    (["--eval-batch-size", "0"], r"--eval-batch-size must be >= 1, got 0"),
    (["--device", "gpu0"], r"--device gpu0: not a device; pass auto, cpu, cuda or cuda:N"),
])
def test_option_out_of_range_is_named_before_any_work(split_folder, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        _run(split_folder, tmp_path / "run", *argv)
    assert not (tmp_path / "run").exists()


def test_options_without_effect_are_warned_about(split_folder, tmp_path, caplog):
    _run(split_folder, tmp_path / "run", "--max-steps", "1", "--no-plots", "--codebook-update", "grad",
         "--codebook-decay", "0.9", "--bottleneck", "vq", "--num-samples", "4")
    assert "--codebook-decay 0.9 has no effect: --codebook-update grad" in caplog.text
    assert "--num-samples 4 has no effect: --bottleneck vq" in caplog.text
    assert "--codebook-epsilon" not in caplog.text  # left at its default: nothing to say


def test_soft_em_temperature_under_hard_assignment_is_warned_about(split_folder, tmp_path, caplog):
    """--bottleneck vq assigns the nearest code: the E-step temperature changes no training step (as the LT warns)."""
    _run(split_folder, tmp_path / "vq", "--max-steps", "1", "--no-plots", "--bottleneck", "vq",
         "--soft-em-temperature", "5")
    assert "--soft-em-temperature 5.0 has no effect: --bottleneck vq takes the nearest code" in caplog.text
    caplog.clear()
    _run(split_folder, tmp_path / "em", "--max-steps", "1", "--no-plots", "--bottleneck", "em", "--num-samples", "2",
         "--temperature", "5")
    _run(split_folder, tmp_path / "vq-default", "--max-steps", "1", "--no-plots", "--bottleneck", "vq")
    assert "--soft-em-temperature" not in caplog.text  # soft EM samples at T; vq with T left at its default: silent


def test_model_checks_its_images_and_takes_an_empty_batch():
    model = ImageAutoencoder(build_config("vqvae", 3, 16, {"bottleneck": "em", "num_codes": 8, "code_dim": 4,
                                                           "hidden_dim": 8, "res_hidden_dim": 4, "num_samples": 3}))
    recon, out, z_e = model(torch.rand(0, 3, 16, 16))
    assert recon.shape == (0, 3, 16, 16) and out.codes.shape == (0, 8, 8, 1, 3) and float(out.loss) == 0.0
    with pytest.raises(TypeError, match=r"got torch.uint8; pass uint8 images as x.float\(\) / 255"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 16, 16\), got \(2, 1, 16, 16\)"):
        model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"pixels must be in \[0, 1\], got values in .*divide 0-255 images by 255"):
        model(torch.rand(2, 3, 16, 16) * 255)
    with pytest.raises(ValueError, match="images are on meta but the model is on cpu"):
        model(torch.rand(2, 3, 16, 16, device="meta"))


def test_resume_of_a_checkpoint_that_does_not_fit_its_model_is_one_line(split_folder, tmp_path):
    _run(split_folder, tmp_path, "--max-steps", "1", "--no-plots")
    state = _state(tmp_path)
    del state["model"]["quantizer.embed"]
    torch.save(state, os.path.join(str(tmp_path), ia_train.CHECKPOINT))
    with pytest.raises(SystemExit, match=r"the --resume checkpoint does not fit the model it describes \(RuntimeError: "
                                         r".*start a new run with --overwrite"):
        _run(split_folder, tmp_path, "--max-steps", "2", "--resume", "--no-plots")
