// SPDX-License-Identifier: Apache-2.0
// The explicit instantiation definitions for cmake/core_instances.hpp (float).
#define LOWRANK_CORE_INSTANCES_DEFINE
#include "core_instances.hpp"

namespace lowrank::core {
LOWRANK_CORE_INSTANCES(, float)
}  // namespace lowrank::core
