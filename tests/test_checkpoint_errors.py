"""A checkpoint that is not what it claims -- cut short, not JSON, sizes its config contradicts, an architecture
minillm does not run -- is one line, through LLM(path), that names the file and says what is wrong with it."""
import json
import os
import re
import shutil

import pytest
import torch

from minillm import LLM
from test_gguf_families import make_family_checkpoint, write_gguf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama as a safetensors folder and as a GGUF file, for the tests to spoil copies of."""
    folder = tmp_path_factory.mktemp("llama")
    model = make_family_checkpoint(str(folder), "llama")
    path = tmp_path_factory.mktemp("llama_gguf") / "model.gguf"
    write_gguf(path, model, "llama")
    return str(folder), str(path), model


def refused(path, error=ValueError) -> str:
    """LLM(path)'s error message, checked to be one line that names the file."""
    with pytest.raises(error) as e:
        LLM(str(path), device="cpu")
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    return message


def copy_folder(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def cut(src, dst, size: int):
    with open(src, "rb") as f:
        data = f.read(size)
    with open(dst, "wb") as f:
        f.write(data)


# ---- GGUF ------------------------------------------------------------------------------------


def test_gguf_cut_in_its_tensors(checkpoint, tmp_path):
    path = tmp_path / "model.gguf"
    cut(checkpoint[1], path, os.path.getsize(checkpoint[1]) - 5000)
    message = refused(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: truncated \(the file ends at byte {os.path.getsize(path)}, its "
                        r"tensor '[\w.]+' needs bytes up to \d+\)", message), message


def test_gguf_cut_in_its_header(checkpoint, tmp_path):
    path = tmp_path / "model.gguf"
    cut(checkpoint[1], path, 5000)  # inside the vocabulary
    message = refused(path)
    assert message.startswith(f"{path}: truncated (the file ends at byte 5000, inside its header"), message
    cut(checkpoint[1], path, 20)  # the magic and the version, not the counts after them
    assert refused(path) == (f"{path}: truncated (the file ends at byte 20, inside its header, which needs bytes "
                             "up to 24 at least)")
    cut(checkpoint[1], path, 3)  # not even the magic
    assert refused(path).startswith(f"{path}: not a little-endian GGUF file")
    path.write_bytes(b"")
    assert refused(path) == f"{path}: not a GGUF file (it is empty)"


def test_gguf_whose_tensor_contradicts_its_metadata(checkpoint, tmp_path):
    model = checkpoint[2]
    model.config.intermediate_size = 200  # the metadata says 200, the tensors are 160 wide
    try:
        write_gguf(tmp_path / "model.gguf", model, "llama")
    finally:
        model.config.intermediate_size = 160
    message = refused(tmp_path / "model.gguf")
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'model.gguf'))}: tensor 'blk\.0\.ffn_(gate|up)\.weight' is "
                        r"\(160, 64\) but its metadata's llama\.feed_forward_length=200, llama\.embedding_length=64 "
                        r"make it \(200, 64\)", message), message


def test_gguf_with_a_tensor_its_architecture_lacks(checkpoint, tmp_path):
    import gguf
    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(4)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([chr(0x21 + i) for i in range(8)])
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.add_tensor("blk.0.attn_q.bias", torch.zeros(4).numpy())  # llama has no biases
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert refused(path) == (f"{path}: tensor 'blk.0.attn_q.bias' is not a parameter of the model its metadata "
                             "describes (architecture 'llama', llama.block_count=1)")


# ---- safetensors folders ---------------------------------------------------------------------


def test_safetensors_cut_in_its_tensors(checkpoint, tmp_path):
    folder = copy_folder(checkpoint[0], tmp_path)
    file = folder / "model.safetensors"
    cut(checkpoint[0] + "/model.safetensors", file, os.path.getsize(file) // 2)
    message = refused(folder)
    assert re.fullmatch(rf"{re.escape(str(file))}: truncated \(the file ends at byte {os.path.getsize(file)}, its "
                        r"tensor '[\w.]+' needs bytes up to \d+\)", message), message


def test_safetensors_cut_in_its_header_or_not_safetensors(checkpoint, tmp_path):
    folder = copy_folder(checkpoint[0], tmp_path)
    file = folder / "model.safetensors"
    cut(checkpoint[0] + "/model.safetensors", file, 100)
    assert refused(folder).startswith(f"{file}: truncated (the file ends at byte 100, inside its header")
    file.write_bytes(b"PK\x03\x04" + bytes(60))  # a zip (torch.save's format) renamed
    assert refused(folder).startswith(f"{file}: not a valid safetensors file (truncated or corrupt: ")
    file.write_bytes((20).to_bytes(8, "little") + b'{"a": [1, 2, 3]}    ' + bytes(8))
    assert refused(folder).startswith(f"{file}: not a valid safetensors file (truncated or corrupt: its header")


def test_safetensors_shard_the_index_lists_is_missing(checkpoint, tmp_path):
    folder = copy_folder(checkpoint[0], tmp_path)
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = refused(folder, FileNotFoundError)
    assert message.startswith(f"{folder / 'model-00002-of-00002.safetensors'}: no such file "
                              "(model.safetensors.index.json lists it)"), message


def test_config_json_that_is_not_json(checkpoint, tmp_path):
    folder = copy_folder(checkpoint[0], tmp_path)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"hidden_size"', "hidden_size", 1))
    line = text[:text.index('"hidden_size"')].count("\n") + 1
    message = refused(folder)
    assert message.startswith(f"{folder / 'config.json'}: not JSON (line {line}, column 3: "
                              "Expecting property name enclosed in double quotes"), message
    (folder / "config.json").write_text("[1, 2]")
    assert refused(folder) == f"{folder / 'config.json'}: not a JSON object but a list"


@pytest.mark.parametrize("change, tensor, why", [
    # (the tensors are the tiny Llama's: vocabulary 128256, C 64, F 160, 4 heads of 16, 2 key/value heads)
    ({"vocab_size": 2000}, r"(model\.embed_tokens|lm_head)\.weight' is \(128256, 64\)",
     r"vocab_size=2000, hidden_size=64 make it \(2000, 64\)"),
    ({"intermediate_size": 128}, r"model\.layers\.\d\.mlp\.\w+_proj\.weight' is \((160, 64|64, 160)\)",
     r"intermediate_size=128, hidden_size=64 make it|hidden_size=64, intermediate_size=128 make it"),
    ({"num_key_value_heads": 1}, r"model\.layers\.\d\.self_attn\.[kv]_proj\.weight' is \(32, 64\)",
     r"num_key_value_heads=1, head_dim=16, hidden_size=64 make it \(16, 64\)"),
    # a config without head_dim: hidden_size / num_attention_heads is the head size
    ({"num_key_value_heads": 1, "head_dim": None}, r"model\.layers\.\d\.self_attn\.[kv]_proj\.weight' is \(32, 64\)",
     r"num_key_value_heads=1, hidden_size/num_attention_heads=16, hidden_size=64 make it \(16, 64\)"),
    ({"head_dim": 8}, r"model\.layers\.\d\.self_attn\.[qkvo]_proj\.weight' is \(\d+, \d+\)",
     r"head_dim=8"),
])
def test_config_whose_sizes_contradict_the_weights(checkpoint, tmp_path, change, tensor, why):
    folder = copy_folder(checkpoint[0], tmp_path)
    cfg = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    message = refused(folder)
    assert re.match(rf"{re.escape(str(folder / 'model.safetensors'))}: tensor '{tensor} but config\.json's "
                    rf"(.*, )?({why})", message), message


def test_safetensors_with_a_tensor_the_config_lacks(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = copy_folder(checkpoint[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file(weights | {"model.layers.2.mlp.up_proj.weight": torch.zeros(160, 64)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    assert refused(folder) == (f"{folder / 'model.safetensors'}: tensor 'model.layers.2.mlp.up_proj.weight' is not a "
                               "parameter of the model config.json describes (model_type 'llama', num_hidden_layers=2)")


def test_safetensors_without_a_tensor_the_model_needs(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = copy_folder(checkpoint[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"], weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert refused(folder) == (f"{folder}: no tensor 'norm.weight' (and 1 more), which the model config.json "
                               "describes (model_type 'llama', num_hidden_layers=2) needs")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "model_type='bert' is not supported; minillm runs llama, mistral, qwen2, qwen3"),
    ({"vocab_size": None}, "no 'vocab_size', which minillm needs"),
])
def test_config_of_a_model_minillm_does_not_run(checkpoint, tmp_path, change, message):
    folder = copy_folder(checkpoint[0], tmp_path)
    cfg = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    assert refused(folder) == f"{folder / 'config.json'}: {message}"
