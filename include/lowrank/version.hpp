// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The library version.

#define LOWRANK_VERSION_MAJOR 0
#define LOWRANK_VERSION_MINOR 1
#define LOWRANK_VERSION_PATCH 0

namespace lowrank {
inline constexpr int version_major = LOWRANK_VERSION_MAJOR;
inline constexpr int version_minor = LOWRANK_VERSION_MINOR;
inline constexpr int version_patch = LOWRANK_VERSION_PATCH;
}  // namespace lowrank
