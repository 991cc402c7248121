// SPDX-License-Identifier: Apache-2.0
// The explicit instantiation definitions for cmake/eigen_instances.hpp (float).
#define LOWRANK_EIGEN_INSTANCES_DEFINE
#include "eigen_instances.hpp"

LOWRANK_EIGEN_INSTANCES(, float)
