// The README's quickstart, compiled: a LoRA adapter on a 256 × 512 layer.
#include <lowrank/lowrank.hpp>

#include <iostream>

int main() {
    using lowrank::Matrix;
    const Matrix<float> W = Matrix<float>::Random(256, 512);  // base weight, out × in
    const Matrix<float> X = Matrix<float>::Random(16, 512);   // 16 tokens

    lowrank::Lora<float> lora(256, 512, {.rank = 8, .alpha = 16, .seed = 42});
    lora.B().setRandom();  // pretend it has been trained (PEFT initialises B = 0)

    Matrix<float> Y = lowrank::linear(X, W + lora);  // X Wᵀ + s (X Aᵀ) Bᵀ, one pass

    const Matrix<float> dY = Matrix<float>::Ones(16, 256);  // upstream gradient
    lowrank::LoraGrad<float> grad;
    Matrix<float> dX;
    lowrank::backward(X, W, lora, dY, grad, dX);  // grad.A, grad.B, dX

    Matrix<float> merged = lowrank::dense(W + lora);  // W + s B A
    const float gap = (X * merged.transpose() - Y).cwiseAbs().maxCoeff();
    std::cout << "scale " << lora.scale() << ", |grad A| " << grad.A.norm()
              << ", merged vs unmerged max gap " << gap << '\n';
}
