// SPDX-License-Identifier: Apache-2.0
#include <lowrank/io/peft.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/lowrank.hpp>

double second_tu_forward() {
    using namespace lowrank;
    const Matrix<double> W = Matrix<double>::Constant(3, 2, 1.0);
    const Matrix<double> X = Matrix<double>::Constant(1, 2, 1.0);
    Lora<double> lora(3, 2, {.rank = 1, .alpha = 1, .init = LoraInit::zeros});
    const Matrix<double> Y = linear(X, W + lora);
    return Y.sum();
}
