// Shared geometry of the three top-k grouping modes (see the conventions in csrc/sparsegen.cpp).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <string>

namespace sparsegen {

enum class Mode { Spatial = 0, Channel = 1, Global = 2 };

inline Mode parse_mode(const std::string& mode) {
  if (mode == "spatial") return Mode::Spatial;
  if (mode == "channel") return Mode::Channel;
  if (mode == "global") return Mode::Global;
  TORCH_CHECK_VALUE(false, "sparsegen: unknown mode '", mode, "'; expected 'spatial', 'channel' or 'global'");
}

// Number of groups per sample and elements per group for x of shape [N, C, H, W].
struct Groups {
  int64_t G;     // groups per sample
  int64_t size;  // elements per group
};

inline Groups groups_of(Mode mode, int64_t C, int64_t H, int64_t W) {
  switch (mode) {
    case Mode::Spatial: return {C, H * W};
    case Mode::Channel: return {H * W, C};
    default: return {1, C * H * W};
  }
}

// Offset (in elements, inside one sample of a contiguous [C, H, W] map) of index `idx` of group g.
inline int64_t element_offset(Mode mode, int64_t g, int64_t idx, int64_t HW) {
  switch (mode) {
    case Mode::Spatial: return g * HW + idx;
    case Mode::Channel: return idx * HW + g;
    default: return idx;
  }
}

inline at::ScalarType index_dtype_for(int64_t group_size) {
  return group_size <= 32767 ? at::kShort : at::kInt;
}

}  // namespace sparsegen
