// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: adapter_config.json parsing and the PEFT loader (rank / alpha patterns,
// feature checks) on arbitrary config text, against a fixed valid adapter_model.safetensors.
//
// Property beyond "no crash": an adapter the loader accepts is saved (config + tensors) and loaded
// again with the same ranks, alphas, scales and factors.

#include <lowrank/io/peft.hpp>

#include <cstdlib>
#include <optional>

using namespace lowrank;

namespace {

/// The fixed adapter: modules and shapes mirrored by tests/test_peft.cpp's corpus test.
const std::vector<std::byte>& adapter_file() {
    static const std::vector<std::byte> bytes = [] {
        safetensors::Writer w;
        struct F { const char* module; Index r, in, out; };
        const F factors[] = {{"model.layers.0.self_attn.q_proj", 2, 4, 3},
                             {"model.layers.0.self_attn.v_proj", 1, 4, 3},
                             {"model.layers.1.mlp.down_proj", 2, 5, 4}};
        double v = 0.125;
        for (const auto& f : factors) {
            Matrix<float> a(f.r, f.in), b(f.out, f.r);
            for (Index i = 0; i < a.size(); ++i) a.data()[i] = float(v += 0.25);
            for (Index i = 0; i < b.size(); ++i) b.data()[i] = float(v -= 0.375);
            w.add(std::string("base_model.model.") + f.module + ".lora_A.weight", a);
            w.add(std::string("base_model.model.") + f.module + ".lora_B.weight", b);
        }
        w.set_metadata("format", "pt");
        return w.bytes();
    }();
    return bytes;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view config(reinterpret_cast<const char*>(data), size);
    std::optional<peft::Adapter<double>> loaded;
    try {
        loaded.emplace(peft::load_from_memory<double>(config, adapter_file()));
    } catch (const lowrank::error&) {
        return 0;  // rejected with a message
    }
    // Accepted: saving and loading again must work (nothing below may throw) and reproduce it.
    const auto& adapter = *loaded;
    if (adapter.modules.size() != 3) std::abort();
    const auto text = peft::config_json(adapter).dump();
    const auto tensors = peft::tensors_writer(adapter).bytes();
    const auto again = peft::load_from_memory<double>(text, tensors);
    for (const auto& [name, m] : adapter.modules) {
        const auto& n = again.modules.at(name);
        if (n.lora.rank() != m.lora.rank() || n.lora.config().alpha != m.lora.config().alpha ||
            n.lora.scale() != m.lora.scale() || n.lora.A() != m.lora.A() || n.lora.B() != m.lora.B() ||
            n.fan_in_fan_out != m.fan_in_fan_out)
            std::abort();
    }
    return 0;
}
