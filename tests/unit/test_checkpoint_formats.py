"""Reading untrusted and broken checkpoints: refused with an error that names the problem, no code run."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitlab
from tests.parity.test_formats import google_npz, save_npz
from vitlab import CheckpointError
from vitlab.checkpoint import read_npz, save_hf, save_timm
from vitlab.formats import KeyTable, apply_table, same


class Exploit:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_needing_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth.*never runs"):
        vitlab.from_pretrained(path)
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    w = google_npz()
    path = tmp_path / "evil.npz"
    np.savez(path, **{**w, "embedding/kernel": np.array([Exploit(marker)], dtype=object)})  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"refusing to load .*pickled objects"):
        vitlab.from_pretrained(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # the payload is really there: unpickling it would have run it
        assert b"system" in f.read()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
def test_truncated_file_says_so(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    tensors = {k: torch.from_numpy(v) for k, v in google_npz().items()}
    if suffix == ".npz":
        save_npz(google_npz(), path)
    elif suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read .*w\{suffix}.*truncated or corrupt"):
        vitlab.from_pretrained(path, num_heads=4)


def test_missing_key_is_named(tmp_path: Path) -> None:
    w = google_npz()
    del w["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    with pytest.raises(
        CheckpointError, match=r"missing key\(s\) \['Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias'"
    ):
        vitlab.from_pretrained(save_npz(w, tmp_path / "w.npz"))


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    w = google_npz()
    w["MAPHead_0/probe"] = np.zeros((1, 1, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['MAPHead_0/probe'\]"):
        vitlab.from_pretrained(save_npz(w, tmp_path / "w.npz"))


def test_missing_layer_is_named(tmp_path: Path) -> None:
    w = {k: v for k, v in google_npz().items() if "encoderblock_0/" not in k}
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['Transformer/encoderblock_0/"):
        vitlab.from_pretrained(save_npz(w, tmp_path / "w.npz"))


def test_key_table_is_strict_both_ways() -> None:
    table: KeyTable = {"a": (("x",), same), "b": (("y", "z"), torch.add)}
    sd = {"x": torch.ones(2), "y": torch.ones(2), "z": torch.ones(2)}
    out = apply_table(sd, table, "test")
    torch.testing.assert_close(out["b"], torch.full((2,), 2.0))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['z'\]"):
        apply_table({"x": sd["x"], "y": sd["y"]}, table, "test")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['w'\]"):
        apply_table({**sd, "w": torch.ones(1)}, table, "test")


def test_read_npz_gives_tensors(tmp_path: Path) -> None:
    w = google_npz()
    sd = read_npz(save_npz(w, tmp_path / "w.npz"))
    assert set(sd) == set(w)
    np.testing.assert_array_equal(sd["cls"].numpy(), w["cls"])


def test_hf_weights_without_their_config_point_to_the_directory(tmp_path: Path) -> None:
    save_file({"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(8, 3, 4, 4)}, str(tmp_path / "m.bin"))
    (tmp_path / "m.safetensors").write_bytes((tmp_path / "m.bin").read_bytes())
    with pytest.raises(CheckpointError, match=r"config\.json beside them: load the directory"):
        vitlab.from_pretrained(tmp_path / "m.safetensors")


def test_unknown_hf_model_type_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "deit"}')
    with pytest.raises(CheckpointError, match="model_type 'deit' is not supported"):
        vitlab.from_pretrained(tmp_path)


def test_not_a_pickle_at_all(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2)[:-3])
    with pytest.raises(CheckpointError, match=r"cannot read .*w\.pth.*truncated or corrupt"):
        vitlab.from_pretrained(path)


@torch.no_grad()
def test_save_pretrained_keeps_preprocessing_and_class_names(tmp_path: Path) -> None:
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    hf = HFConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16)
    hf.patch_size, hf.num_labels = 8, 3
    hf.id2label, hf.label2id = {0: "cat", 1: "dog", 2: "eel"}, {}
    ViTForImageClassification(hf).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(
        '{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 2, '
        '"size": {"height": 16, "width": 16}}'
    )
    model = vitlab.from_pretrained(tmp_path / "hf")
    assert model.class_names == ["cat", "dog", "eel"]
    assert model.preprocessing.mean == (0.1, 0.2, 0.3) and model.preprocessing.interpolation == "bilinear"
    model.save_pretrained(tmp_path / "ours")
    again = vitlab.from_pretrained(tmp_path / "ours")
    assert again.class_names == model.class_names and again.preprocessing == model.preprocessing


def test_exports_refuse_what_the_target_cannot_hold(tmp_path: Path) -> None:
    rep = vitlab.create_model("Ti/8", image_size=16, num_layers=1, representation_size=8)
    with pytest.raises(CheckpointError, match="representation_size=None"):
        save_timm(rep, tmp_path / "t")
    with pytest.raises(CheckpointError, match="representation_size=None"):
        save_hf(rep, tmp_path / "h")
    gap = vitlab.create_model("Ti/8", image_size=16, num_layers=1, pool="gap")
    with pytest.raises(CheckpointError, match="pool='gap'"):
        save_hf(gap, tmp_path / "h")


def test_head_of_the_wrong_shape_is_refused_by_name(tmp_path: Path) -> None:
    """Nothing asked to change the head, so a mis-shaped one is a broken file, not a head to replace by zeros."""
    model = vitlab.from_pretrained(save_npz(google_npz(), tmp_path / "w.npz"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.weight"] = torch.zeros(state["head.weight"].shape[0], 7)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"'head\.weight' has shape \(10, 7\), the model needs \(10, 64\)"):
        vitlab.from_pretrained(tmp_path / "bad.safetensors", num_heads=4)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("w.pth", b"", r"w\.pth is empty"),
        ("w.pth", b"\x13\x37 not a checkpoint at all", r"w\.pth is not a PyTorch file .*corrupt, or another kind"),
        ("w.npz", b"\x13\x37 not a checkpoint at all", r"w\.npz is not an \.npz file .*corrupt, or another kind"),
        ("w.npz", b"", r"w\.npz is empty"),
    ],
    ids=["empty-pth", "garbage-pth", "garbage-npz", "empty-npz"],
)
def test_garbage_is_called_corrupt_not_code(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        vitlab.from_pretrained(path)
