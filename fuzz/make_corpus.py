#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/), valid and broken inputs.

Standard library only, so it runs anywhere: python3 fuzz/make_corpus.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def st_file(tensors, metadata=None, header=None, declared=None, data=None, pad=True):
    """tensors: list of (name, dtype, shape, bytes). Offsets are assigned in order."""
    if header is None:
        h = {}
        if metadata is not None:
            h["__metadata__"] = metadata
        off = 0
        for name, dtype, shape, raw in tensors:
            h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
            off += len(raw)
        header = json.dumps(h, separators=(",", ":"))
        if pad:
            header += " " * ((8 - len(header) % 8) % 8)
    hb = header.encode() if isinstance(header, str) else header
    if data is None:
        data = b"".join(raw for _, _, _, raw in tensors)
    n = len(hb) if declared is None else declared
    return struct.pack("<Q", n) + hb + data


def f32(*v):
    return struct.pack("<%df" % len(v), *v)


def f64(*v):
    return struct.pack("<%dd" % len(v), *v)


def f16(*v):
    return struct.pack("<%de" % len(v), *v)


def bf16(*v):
    return b"".join(struct.pack("<f", x)[2:] for x in v)


def write(folder, name, content):
    d = os.path.join(HERE, "corpus", folder)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as fh:
        fh.write(content if isinstance(content, bytes) else content.encode())


A = ("base_model.model.m.q.lora_A.weight", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6))
B = ("base_model.model.m.q.lora_B.weight", "F32", [4, 2], f32(*range(8)))

valid = {
    "valid_f32.st": st_file([A, B], {"format": "pt"}),
    "valid_f16.st": st_file([("h", "F16", [2, 2], f16(1.0, -2.5, 6.1e-5, 65504.0))]),
    "valid_bf16.st": st_file([("b", "BF16", [3], bf16(1.0, -3.0, 1e30))]),
    "valid_f64_scalar.st": st_file([("s", "F64", [], f64(3.25))]),
    "valid_mixed.st": st_file([("a", "F64", [1], f64(1)), ("b", "F32", [1], f32(2)),
                               ("c", "F16", [1], f16(3)), ("d", "I64", [1], struct.pack("<q", 7)),
                               ("e", "U8", [3], b"\x01\x02\x03")], {"k": "v"}),
    "valid_empty_tensor.st": st_file([("z", "F32", [0, 4], b""), ("a", "F32", [1], f32(1))]),
    "valid_no_tensors.st": st_file([], {"format": "pt"}),
    "valid_unpadded.st": st_file([A], pad=False),
}
broken = {
    "truncated_length.st": b"\x10\x00\x00",
    "truncated_data.st": st_file([A, B])[:-5],
    "header_past_end.st": st_file([A], declared=10**6),
    "header_huge.st": st_file([A], declared=2**63),
    "not_object.st": st_file([], header="[1,2,3]"),
    "bad_json.st": st_file([], header='{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'),
    "overlap.st": st_file([], header=json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
                          data=b"\0" * 12),
    "gap.st": st_file([], header=json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}),
                      data=b"\0" * 12),
    "span_mismatch.st": st_file([], header=json.dumps({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}),
                                data=b"\0" * 16),
    "unknown_dtype.st": st_file([], header=json.dumps({"a": {"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}}),
                                data=b"\0"),
    "metadata_number.st": st_file([], header='{"__metadata__": {"format": 5}}'),
    "duplicate.st": st_file([], header='{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                                       '"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', data=b"\0"),
    "overflow_shape.st": st_file([], header=json.dumps({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}),
                                 data=b"\0" * 4),
    "trailing_bytes.st": st_file([A]) + b"\0\0\0\0",
    "negative_dim.st": st_file([], header='{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}'),
    "deep.st": st_file([], header='{"a": {"dtype": "F32", "shape": [[[[1]]]], "data_offsets": [0, 4]}}', data=b"\0" * 4),
}
for name, content in {**valid, **broken}.items():
    write("safetensors", name, content)

configs = {
    "plain.json": {"peft_type": "LORA", "r": 2, "lora_alpha": 16, "rank_pattern": {"v_proj": 1},
                   "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rslora_patterns.json": {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "use_rslora": True,
                             "rank_pattern": {"v_proj": 1, "layers\\.1\\..*": 2},
                             "alpha_pattern": {"q_proj": 32, "model.layers.1.mlp.down_proj": 3.5}},
    "fan_in_fan_out.json": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": True,
                            "rank_pattern": {"v_proj": 1}, "modules_to_save": ["score"], "bias": "none",
                            "task_type": "SEQ_CLS"},
    "legacy.json": {"auto_mapping": None, "base_model_name_or_path": "gpt2", "bias": "none", "fan_in_fan_out": False,
                    "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
                    "layers_to_transform": None, "lora_alpha": 8, "lora_dropout": 0.0, "modules_to_save": None,
                    "peft_type": "LORA", "r": 2, "revision": None, "target_modules": ["q_proj"],
                    "task_type": "CAUSAL_LM", "rank_pattern": {"v_proj": 1}},
    "rank_mismatch.json": {"peft_type": "LORA", "r": 8},
    "dora.json": {"peft_type": "LORA", "r": 2, "use_dora": True},
    "bad_regex.json": {"peft_type": "LORA", "r": 2, "rank_pattern": {"(v_proj": 1}},
    "other_type.json": {"peft_type": "IA3"},
}
for name, doc in configs.items():
    write("peft_config", name, json.dumps(doc, indent=1))
write("peft_config", "truncated.json", '{"peft_type": "LORA", "r": 2, "rank_pattern": {"v_pro')
write("peft_config", "duplicate_key.json", '{"peft_type": "LORA", "r": 2, "r": 1}')
