// A consumer of the installed package: LoRA forward through an expression, checked against a
// dense Eigen formula; exits non-zero on a mismatch.
#include <lowrank/lowrank.hpp>

#include <cstdio>

int main() {
    using lowrank::Matrix;
    const Matrix<double> W = Matrix<double>::Random(24, 17);
    const Matrix<double> X = Matrix<double>::Random(5, 17);
    lowrank::Lora<double> lora(24, 17, {.rank = 3, .alpha = 6, .seed = 7});
    lora.B().setRandom();
    const Matrix<double> Y = lowrank::linear(X, W + lora);
    const Matrix<double> ref =
        X * W.transpose() + lora.scale() * (X * lora.A().transpose()) * lora.B().transpose();
    const double err = (Y - ref).cwiseAbs().maxCoeff();
    std::printf("lowrank %d.%d.%d consumer: max |Y - ref| = %.3g\n", lowrank::version_major,
                lowrank::version_minor, lowrank::version_patch, err);
    return err < 1e-12 ? 0 : 1;
}
