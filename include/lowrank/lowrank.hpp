// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// The whole library, except the file readers and writers of `io/` (they bring nlohmann/json
/// and <regex> into every translation unit): include `lowrank/io/peft.hpp` or
/// `lowrank/io/safetensors.hpp` where files are read or written.

#include "version.hpp"

// core: views, kernels and the term protocol (no method knowledge)
#include "core/args.hpp"
#include "core/error.hpp"
#include "core/gathered.hpp"
#include "core/kernels.hpp"
#include "core/memory.hpp"
#include "core/ops.hpp"
#include "core/parallel.hpp"
#include "core/random.hpp"
#include "core/terms.hpp"
#include "core/view.hpp"

// linalg: SVD, Gram solves, Sylvester, input statistics
#include "linalg/cholesky.hpp"
#include "linalg/second_moment.hpp"
#include "linalg/svd.hpp"
#include "linalg/sylvester.hpp"

// expressions
#include "expr/expr.hpp"

// methods
#include "arithmetic.hpp"
#include "compose.hpp"
#include "lora.hpp"
#include "lora_pro.hpp"
#include "lora_sb.hpp"
#include "lora_svd_init.hpp"
#include "lora_xs.hpp"
#include "rank_one.hpp"

// the public gradient checker
#include "testing/gradcheck.hpp"
