// The safetensors file format (https://github.com/huggingface/safetensors), so checkpoints open in
// Python (safetensors.torch.load_file) and vice versa:
//   8 bytes: little-endian u64 N | N bytes: JSON header | raw tensor bytes
// The header maps each name to {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} (offsets
// into the byte buffer after the header) plus an optional "__metadata__" object of string pairs.
// Data are row-major little-endian; dtypes F64 F32 F16 BF16 I64 I32 BOOL (and U8 I8 I16 when present).
#pragma once
#include <map>
#include <string>

#include "flexgrad/nn/module.h"

namespace fg::nn {

struct SafetensorsFile {
  NamedTensors tensors;  // in file order (by offset)
  std::map<std::string, std::string> metadata;
};

// Writes tensors (any device, any layout: copied to contiguous CPU) in the given order. IOError on failure.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});
// Reads a file; IOError naming the path and the problem on malformed input (bad header, overlapping or
// out-of-range offsets, unknown dtype, size not matching shape).
SafetensorsFile load_safetensors(const std::string& path);

// A module's state_dict to a file and back (load_state_dict's checks apply, every mismatch reported).
void save_module(const Module& module, const std::string& path, const std::map<std::string, std::string>& metadata = {});
void load_module(Module& module, const std::string& path, bool strict = true);

}  // namespace fg::nn
