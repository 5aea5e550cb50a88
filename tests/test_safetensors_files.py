"""core/safetensors_files: the one header reader, the one reader by model name (both layouts), the Hub
layout both sides share, the one sharded writer (Hugging Face's one-file and many-file rules, written
atomically), checkpoint_dtype."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimmoe.tasks.core.adapters import get_adapter
from slimmoe.tasks.core.safetensors_files import (SAFETENSORS_INDEX, BrokenCheckpointError, CheckpointTensors,
                                                  TensorSpec, check_safetensors, checkpoint_dtype, hub_tensors,
                                                  read_header, spec_of, write_sharded)
from tiny import checkpoint_tensors, tiny_model


# -- the header -------------------------------------------------------------------------------------

def test_the_header_describes_every_tensor_and_the_file_is_checked_against_it(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path), metadata={"format": "pt"})
    entries = read_header(path)
    assert sorted(entries) == ["a", "b"]  # no __metadata__
    assert (entries["a"].dtype, entries["a"].shape, entries["a"].nbytes) == ("F32", (3, 4), 48)
    assert (entries["b"].dtype, entries["b"].shape, entries["b"].nbytes) == ("BF16", (5,), 10)
    assert entries["a"].file == path and {e.offset for e in entries.values()} == {0, 48}

    data = path.read_bytes()
    path.write_bytes(data + b"\0")
    with pytest.raises(BrokenCheckpointError, match=r"is corrupt: .* 1 more than the"):
        read_header(path)
    path.write_bytes(data[:-3])
    with pytest.raises(BrokenCheckpointError, match=r"is truncated: .* \(3 missing\); copy or download it again"):
        read_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(BrokenCheckpointError, match="not even the 8-byte header length"):
        read_header(path)
    path.write_bytes((4).to_bytes(8, "little") + b"[1] ")
    with pytest.raises(BrokenCheckpointError, match="is not a safetensors file"):
        read_header(path)
    path.write_bytes((400).to_bytes(8, "little") + b"{}")
    with pytest.raises(BrokenCheckpointError, match="but its header alone is 408 bytes"):
        read_header(path)


def test_an_index_must_name_files_that_are_there(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = tmp_path / SAFETENSORS_INDEX
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(BrokenCheckpointError, match=r"names 1 file\(s\) that .* lacks: model-00002-of-00002"):
        check_safetensors(tmp_path)
    index.write_text("[]")
    with pytest.raises(BrokenCheckpointError, match="is not a safetensors index"):
        check_safetensors(tmp_path)
    index.unlink()
    assert check_safetensors(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors"]
    with pytest.raises(BrokenCheckpointError, match="holds no \\*.safetensors weights"):
        check_safetensors(tmp_path / "nothing")


def test_checkpoint_dtype_is_the_narrowest_float_stored(tmp_path):
    save_file({"a": torch.zeros(2), "i": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_dtype(tmp_path) == "float32"
    save_file({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_dtype(tmp_path) == "bfloat16"


# -- reading by the model's names, in either layout -------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_either_layout_reads_the_same_tensors_under_the_models_names(family, tmp_path):
    """`saved` is transformers 5's per-expert layout (mixtral: renamed to block_sparse_moe.<e>.w1/w3/w2),
    `fused` the model's own names."""
    model = tiny_model(family)
    want = model.state_dict()
    model.save_pretrained(tmp_path / "saved")
    (tmp_path / "fused").mkdir()
    save_file({k: v.contiguous() for k, v in want.items()}, str(tmp_path / "fused" / "model.safetensors"))
    fused_name = "model.layers.1.mlp.experts.gate_up_proj"
    assert fused_name not in CheckpointTensors(tmp_path / "saved")  # stored per expert
    for layout in ("saved", "fused"):
        src = CheckpointTensors(tmp_path / layout, get_adapter(model))
        for name, t in want.items():
            assert src.has(name) and src.shape(name) == tuple(t.shape), (layout, name)
            assert torch.equal(src.full(name), t), (layout, name)
            assert torch.equal(src.rows(name, 1, 3), t[1:3]), (layout, name)
        assert src.rows(fused_name, 2, 2).shape == (0, *want[fused_name].shape[1:])
        assert not src.has("model.layers.0.mlp.experts.nothing")
        with pytest.raises(KeyError, match="stores no tensor for model.layers.0.mlp.experts.nothing"):
            src.rows("model.layers.0.mlp.experts.nothing", 0, 1)


@pytest.mark.parametrize("family", ["phimoe", "qwen3_moe", "gpt_oss"])
def test_the_hub_layout_is_what_save_pretrained_writes_and_what_the_reader_reads(family, tmp_path):
    """phimoe renames modules and splits experts into w1/w3/w2, qwen3_moe splits them into
    gate_proj/up_proj/down_proj, gpt_oss stores them fused under the model's names."""
    model = tiny_model(family)
    adapter, state = get_adapter(model), model.state_dict()
    model.save_pretrained(tmp_path / "want")
    want = checkpoint_tensors(tmp_path / "want")
    hub = {h.name: (name, h) for name, t in state.items() for h in hub_tensors(name, t.shape, adapter)}
    assert sorted(hub) == sorted(want)
    for disk_name, (name, h) in hub.items():
        assert h.shape == tuple(want[disk_name].shape) and torch.equal(h.cut(state[name]), want[disk_name]), disk_name
    (tmp_path / "written").mkdir()
    write_sharded(tmp_path / "written", [spec_of(n, h.shape, state[m].dtype) for n, (m, h) in hub.items()],
                  lambda s: iter([hub[s.name][1].cut(state[hub[s.name][0]])]))
    src = CheckpointTensors(tmp_path / "written", adapter)
    assert all(torch.equal(src.full(name), t) for name, t in state.items())
    with pytest.raises(ValueError, match="does not split into 2 equal parts"):
        hub_tensors("model.layers.0.mlp.experts.gate_up_proj", (4, 7, 3), get_adapter(tiny_model("qwen3_moe")))


def test_reads_by_disk_name_take_ranges_and_index_lists(tmp_path):
    t = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    save_file({"b": torch.zeros(2), "a": t}, str(tmp_path / "model.safetensors"))
    src = CheckpointTensors(tmp_path)
    assert "a" in src and src.find("a") == "a" and src.find("c") is None
    assert src.ordered() == sorted(src.entries, key=lambda n: src.entries[n].offset)
    assert torch.equal(src.read("a"), t)
    assert torch.equal(src.read("a", (slice(1, 3),)), t[1:3])
    assert torch.equal(src.read("a", (2, slice(None), [0, 4, 5])), t[2][:, [0, 4, 5]])


# -- the sharded writer -----------------------------------------------------------------------------

def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [spec_of(name, t.shape, t.dtype) for name, t in tensors.items()]


def _some_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed": torch.randn(40, 8, generator=g), "big": torch.randn(100, 10, generator=g),
            "norm": torch.randn(8, generator=g).to(torch.bfloat16), "steps": torch.arange(3),
            "flag": torch.tensor([True, False]), "scalar": torch.tensor(2.5)}


def test_one_file_is_model_safetensors_with_no_index(tmp_path):
    tensors = _some_tensors()
    written = write_sharded(tmp_path, _specs(tensors), lambda s: iter([tensors[s.name]]))
    assert written.files == ["model.safetensors"] and sorted(p.name for p in tmp_path.iterdir()) == written.files
    got = checkpoint_tensors(tmp_path)
    assert sorted(got) == sorted(tensors) and all(torch.equal(got[n], t) and got[n].dtype == t.dtype
                                                  for n, t in tensors.items())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as h:
        assert h.metadata() == {"format": "pt"}
    assert written.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert written.peak_piece_bytes == 100 * 10 * 4


def test_more_files_are_numbered_with_an_index_and_a_large_tensor_gets_its_own(tmp_path):
    tensors = _some_tensors()
    limit = 2000  # "big" (4000 bytes) is over it
    # pieces may be dim-0 chunks: the writer only appends them
    written = write_sharded(tmp_path, _specs(tensors), lambda s: iter(tensors[s.name].split(7)
                                                                      if tensors[s.name].dim() else [tensors[s.name]]),
                            max_shard_bytes=limit)
    n = len(written.files)
    assert n == 3 and written.files == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written.files + [SAFETENSORS_INDEX])
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    assert index["metadata"] == {"total_size": written.bytes}
    assert index["weight_map"] == {"embed": written.files[0], "big": written.files[1], "norm": written.files[2],
                                   "steps": written.files[2], "flag": written.files[2], "scalar": written.files[2]}
    got = checkpoint_tensors(tmp_path)
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert written.peak_piece_bytes == 7 * 10 * 4
    assert check_safetensors(tmp_path) == [tmp_path / f for f in written.files]


@pytest.mark.parametrize("failure", ["read", "size"])
def test_a_failure_midway_leaves_no_weight_file_and_no_index(failure, tmp_path):
    tensors = _some_tensors()

    def pieces(spec):
        if spec.name == "norm":  # in the last of three files, after two were written
            if failure == "read":
                raise OSError("disk read failed")
            yield tensors[spec.name][:3]
            return
        yield tensors[spec.name]

    with pytest.raises(OSError if failure == "read" else RuntimeError,
                       match="disk read failed" if failure == "read" else "norm: wrote 6 bytes, planned 16"):
        write_sharded(tmp_path, _specs(tensors), pieces, max_shard_bytes=2000)
    assert list(tmp_path.iterdir()) == []
