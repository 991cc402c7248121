// SPDX-License-Identifier: Apache-2.0
// Linked with odr_second_tu.cpp: both include every header, so a non-inline definition in a
// header is a duplicate-symbol link error here.
#include <lowrank/io/peft.hpp>
#include <lowrank/io/safetensors.hpp>
#include <lowrank/lowrank.hpp>

#include <catch2/catch.hpp>

double second_tu_forward();

TEST_CASE("two translation units using the library link and agree", "[odr]") {
    using namespace lowrank;
    const Matrix<double> W = Matrix<double>::Constant(3, 2, 1.0);
    const Matrix<double> X = Matrix<double>::Constant(1, 2, 1.0);
    Lora<double> lora(3, 2, {.rank = 1, .alpha = 1, .init = LoraInit::zeros});
    const Matrix<double> Y = linear(X, W + lora);
    REQUIRE(Y.sum() == 6.0);
    REQUIRE(second_tu_forward() == 6.0);
}
