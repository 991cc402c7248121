// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The whole library.

#include "core/args.hpp"
#include "core/error.hpp"
#include "core/kernels.hpp"
#include "core/ops.hpp"
#include "core/random.hpp"
#include "core/terms.hpp"
#include "core/view.hpp"
#include "expr/expr.hpp"
#include "lora.hpp"
#include "testing/gradcheck.hpp"
#include "version.hpp"
