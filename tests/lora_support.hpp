// SPDX-License-Identifier: Apache-2.0
#pragma once
// Test helper for LoRA adapters: seeded factors, with a random B too (PEFT's B = 0 would make
// half of every check trivial).

#include <lowrank/lora.hpp>

#include "support.hpp"

namespace lowrank::test {

template <class T>
Lora<T> random_lora(Index out, Index in, Index r, double alpha, bool rslora, std::uint64_t seed) {
    Lora<T> lora(out, in, {.rank = r, .alpha = alpha, .rslora = rslora, .seed = seed});
    lora.B() = random_matrix<T>(out, r, seed + 100);
    return lora;
}
template <class T>
Lora<T> random_lora(Index out, Index in, Index r, double alpha, std::uint64_t seed) {
    return random_lora<T>(out, in, r, alpha, false, seed);
}

}  // namespace lowrank::test
