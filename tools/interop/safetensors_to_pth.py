"""Converts a safetensors file (what `coordinator model export` writes) into a PyTorch checkpoint
laid out like SuPreM's released files: the state dict under "net", every key prefixed with
"module.backbone.", beside other training state. The end-to-end test feeds the result to
`coordinator model import`, so an export and an import round-trip through torch itself.

Reads safetensors by hand (an 8-byte header length, a JSON header, raw little-endian data) so that
torch is the only package it needs.

Usage: python safetensors_to_pth.py IN.safetensors OUT.pth
"""

import json
import struct
import sys

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=DTYPES[info["dtype"]])
        tensors[key] = flat.reshape(info["shape"]).clone()
    return tensors


def main():
    src, dst = sys.argv[1], sys.argv[2]
    state = read_safetensors(src)
    wrapped = {"module.backbone." + k: v for k, v in state.items()}
    torch.save({"net": wrapped, "epoch": 2100}, dst)
    print(f"{dst}: {len(wrapped)} tensors")


if __name__ == "__main__":
    main()
