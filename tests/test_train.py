import itertools
import json
import re

import pytest
import torch

from polyprune.errors import ConfigError, TrainingError
from polyprune.fit import fit
from polyprune.io import InputSpec, load_model
from polyprune.models import build_model
from polyprune.train import TrainConfig, make_datasets, split_folders, train
from polyprune.validation import dice_per_image, validation_dice


def _cfg(synth_dir, out, **kw):
    base = dict(
        data=[str(synth_dir)], out=str(out), size=32, width=4, epochs=2, batch=4, seed=3, progress=False
    )
    base.update(kw)
    return TrainConfig(**base)


def test_dice_per_image_conventions():
    y = torch.zeros(2, 1, 4, 4)
    y[0, 0, :2] = 1
    logits = torch.full((2, 1, 4, 4), -5.0)
    d = dice_per_image(logits, y)
    assert d[0] == 0 and d[1] == 1  # missed polyp = 0; empty GT + empty prediction = 1


def test_training_lowers_the_loss_and_beats_all_background(tmp_path):
    from polyprune.synth import make_synthetic_dataset

    synth_dir = make_synthetic_dataset(tmp_path / "synth48", n=48, size=64, seed=0)
    summary = train(_cfg(synth_dir, tmp_path / "run", size=64, width=8, epochs=6, lr=1e-2))
    hist = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    spec = InputSpec(size=64)
    _, val = make_datasets([synth_dir], spec, seed=3, augment=False)
    model = load_model(tmp_path / "run" / "model.safetensors")
    dice = validation_dice(model, val, device="cpu")
    # every synthetic image holds a polyp, so an all-background prediction scores exactly 0
    assert dice > 0.15
    assert summary["best_val_dice"] == pytest.approx(dice, abs=1e-6)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_equals_an_uninterrupted_run(synth_dir, tmp_path, monkeypatch, ema):
    import polyprune.fit as fit_mod

    full = tmp_path / "full"
    train(_cfg(synth_dir, full, epochs=3, ema=ema))
    part = tmp_path / "part"
    real_save = fit_mod.save_checkpoint

    def save_then_die(*args, **kw):  # the process dies right after the epoch-1 checkpoint
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synth_dir, part, epochs=3, ema=ema))
    monkeypatch.setattr(fit_mod, "save_checkpoint", real_save)
    train(_cfg(synth_dir, part, epochs=3, ema=ema, resume=True))
    from safetensors.torch import load_file

    sa = load_file(str(full / "checkpoint" / "last.safetensors"))
    sb = load_file(str(part / "checkpoint" / "last.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ha = json.loads((full / "history.json").read_text())["history"]
    hb = json.loads((part / "history.json").read_text())["history"]
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    # a resume that would change the learning-rate schedule is refused, naming what changed
    changes = (
        ({"epochs": 5, "ema": ema}, "total_steps"),
        ({"epochs": 3, "lr": 3e-3, "ema": ema}, "lr 0.001 -> 0.003"),
        ({"epochs": 3, "ema": 0.5}, f"ema {ema} -> 0.5"),
    )
    for change, what in changes:
        with pytest.raises(ConfigError, match=f"--resume would change the schedule .*{re.escape(what)}"):
            train(_cfg(synth_dir, part, resume=True, **change))


def test_with_ema_the_saved_model_is_the_average_not_the_last_weights(synth_dir, tmp_path):
    from safetensors.torch import load_file

    train(_cfg(synth_dir, tmp_path / "run", epochs=2, ema=0.9, val_fraction=0.0))  # no val: the last epoch
    ckpt = load_file(str(tmp_path / "run" / "checkpoint" / "last.safetensors"))
    saved = load_model(tmp_path / "run" / "model.safetensors").state_dict()
    hist = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert int(ckpt["ema.n_averaged"]) == sum(r["steps"] for r in hist) > 0  # one update per step
    weights = [k for k in saved if k.endswith("weight")]
    assert all(torch.equal(saved[k], ckpt[f"ema.{k}"]) for k in weights)
    assert not all(torch.equal(saved[k], ckpt[f"model.{k}"]) for k in weights)


def test_same_seed_same_weights(synth_dir, tmp_path):
    train(_cfg(synth_dir, tmp_path / "a", epochs=1))
    train(_cfg(synth_dir, tmp_path / "b", epochs=1))
    ma, mb = (
        load_model(tmp_path / "a" / "model.safetensors"),
        load_model(tmp_path / "b" / "model.safetensors"),
    )
    for (ka, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_nan_loss_ends_with_a_training_error(synth_dir):
    spec = InputSpec(size=32)
    tr, val = make_datasets([synth_dir], spec, seed=0)
    model = build_model("unet", base_width=4)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="NaN"):
        fit(model, tr, val, iters=25, batch=1, device="cpu", progress=False)


def test_bad_options_are_config_errors(synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="30"):
        train(_cfg(synth_dir, tmp_path / "x", size=30))
    with pytest.raises(ConfigError):
        train(_cfg(synth_dir, tmp_path / "x", precision="fp8"))


@pytest.mark.parametrize("arch", ["unet-mobilenetv2", "unet-efficientnet-lite0"])
def test_encoder_unet_trains_saves_and_reloads(synth_dir, tmp_path, arch):
    """--arch <encoder UNet> end to end (no ImageNet file needed with pretrained=False); stride 32; the
    model file keeps the encoder's own input normalization."""
    s = train(_cfg(synth_dir, tmp_path / "run", arch=arch, pretrained=False, size=64, warmup=0.2, epochs=1))
    m = load_model(tmp_path / "run" / "model.safetensors")
    assert m.config()["name"] == arch and s["arch"] == arch
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    family = build_model(arch)
    assert m.polyprune_meta.input.mean == pytest.approx(family.input_mean)
    assert m.polyprune_meta.input.std == pytest.approx(family.input_std)
    with pytest.raises(ConfigError, match="multiple of 32"):
        train(_cfg(synth_dir, tmp_path / "run48", arch=arch, pretrained=False, size=48))


def test_decoder_widths_make_a_wider_decoder_and_only_for_encoder_unets(synth_dir, tmp_path):
    """--decoder-widths reaches the model (and its file); the plain unet refuses it instead of ignoring it."""
    train(
        _cfg(
            synth_dir,
            tmp_path / "run",
            arch="unet-mobilenetv2",
            pretrained=False,
            size=64,
            epochs=1,
            decoder_widths=[8, 12, 24, 40],
        )
    )
    m = load_model(tmp_path / "run" / "model.safetensors")
    assert list(m.config()["decoder_widths"]) == [8, 12, 24, 40]
    assert m.widths()["dec0.conv1"] == 8 and m.widths()["dec3.conv2"] == 40
    with pytest.raises(ConfigError, match="decoder_widths"):
        _cfg(synth_dir, tmp_path / "x", decoder_widths=[8, 16, 32, 64])
    with pytest.raises(ConfigError, match="decoder_widths"):
        train(
            _cfg(
                synth_dir,
                tmp_path / "y",
                arch="unet-mobilenetv2",
                pretrained=False,
                size=64,
                decoder_widths=[8, 16],
            )
        )


def test_warmup_then_cosine_schedule():
    from polyprune.fit import learning_rate

    lrs = [learning_rate(step, 100, 1.0, 10) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear up over 10 steps
    assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert learning_rate(50, 100, 1.0, 0) == pytest.approx(0.5)  # no warm-up: the plain cosine


def test_fit_with_a_teacher_pulls_the_student_to_it(synth_dir):
    """A teacher that calls every pixel polyp (head bias +4): with a heavy distillation weight the
    student's mean probability rises toward it; trained on the labels alone (mostly background), it falls."""
    spec = InputSpec(size=32)
    tr, _ = make_datasets([synth_dir], spec, val_fraction=0.0, seed=0)
    teacher = build_model("unet", base_width=4).eval()
    with torch.no_grad():
        teacher.head.weight.zero_()
        teacher.head.bias.fill_(4.0)
    x = torch.stack([tr[i][0] for i in range(8)])

    def mean_prob(**kw) -> float:
        torch.manual_seed(0)
        student = build_model("unet", base_width=4)
        fit(
            student,
            tr,
            None,
            iters=25,
            batch=4,
            lr=3e-3,
            device="cpu",
            precision="fp32",
            progress=False,
            **kw,
        )
        with torch.no_grad():
            return float(torch.sigmoid(student.eval()(x)).mean())

    assert mean_prob(teacher=teacher, distill=20.0) > 0.5 > mean_prob()
    with pytest.raises(ConfigError, match="teacher"):
        fit(build_model("unet", base_width=4), tr, None, iters=1, device="cpu", progress=False, distill=1.0)


def test_init_fine_tunes_a_trained_model_file(synth_dir, tmp_path):
    first = train(_cfg(synth_dir, tmp_path / "a", epochs=3, lr=3e-3))
    again = train(_cfg(synth_dir, tmp_path / "b", epochs=1, lr=1e-5, init=first["model"], width=99))
    m = load_model(again["model"])
    assert m.config() == load_model(first["model"]).config()  # the file's architecture, not --width
    assert again["best_val_dice"] == pytest.approx(first["best_val_dice"], abs=0.05)  # it starts trained
    with pytest.raises(Exception, match="not found"):
        train(_cfg(synth_dir, tmp_path / "c", init=str(tmp_path / "nope.safetensors")))


def test_split_folders_names_the_validation_images_training_uses(synth_dir, tmp_path):
    """zoo_eval --split val scores the images `train` validated on: the same ids, test ids never among them."""
    test_ids = tmp_path / "test.txt"
    names = sorted(p.stem for p in (synth_dir / "images").iterdir())
    test_ids.write_text("\n".join(names[:3]) + "\n")
    (split,) = split_folders([synth_dir], exclude_ids_file=test_ids, val_fraction=0.25, seed=5).values()
    _, val = make_datasets(
        [synth_dir], InputSpec(size=32), exclude_ids_file=test_ids, val_fraction=0.25, seed=5
    )
    assert [s.id for s in split.val] == [s.id for s in val.samples] and split.val
    assert {s.id for s in split.test} == set(names[:3])
    assert not {s.id for s in split.train + split.val} & set(names[:3])
    with pytest.raises(ConfigError, match="given twice"):
        split_folders([synth_dir, synth_dir])


def test_train_distills_from_an_ensemble_of_files_with_tta(synth_dir, tmp_path):
    """`train --teacher A --teacher B --teacher-tta hflip`: two files (one in TF scaling) whose mean
    calls everything polyp pull the student's probabilities up; the run records both and the mode."""
    from polyprune.io import save_model

    files = []
    for i, spec in enumerate([InputSpec(size=32), InputSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)]):
        t = build_model("unet", base_width=4).eval()
        with torch.no_grad():
            t.head.weight.zero_()
            t.head.bias.fill_(4.0)
        files.append(str(save_model(tmp_path / f"t{i}.safetensors", t, input_spec=spec)))
    # no validation: the last epoch is kept, not the one the labels like best
    kw = dict(epochs=6, lr=1e-2, teacher=files, teacher_tta="hflip", distill=20.0, val_fraction=0.0)
    summary = train(_cfg(synth_dir, tmp_path / "run", **kw))
    cfg = json.loads((tmp_path / "run" / "history.json").read_text())["config"]
    assert cfg["teacher"] == files and cfg["teacher_tta"] == "hflip"
    spec = InputSpec(size=32)
    tr, _ = make_datasets([synth_dir], spec, val_fraction=0.0, seed=3, augment=False)
    x = torch.stack([tr[i][0] for i in range(8)])
    with torch.no_grad():
        assert float(torch.sigmoid(load_model(summary["model"])(x)).mean()) > 0.5
    with pytest.raises(ConfigError, match="teacher"):
        _cfg(synth_dir, tmp_path / "r2", teacher_tta="hflip")
    with pytest.raises(ConfigError, match="TTA mode"):
        _cfg(synth_dir, tmp_path / "r2", teacher=files, teacher_tta="spin", distill=1.0)
