// SPDX-License-Identifier: Apache-2.0
#pragma once
// Helpers of the io/ tests: where the real PEFT fixtures are, hand-built safetensors bytes, and the
// files kept from fuzzing.

#include <lowrank/io/safetensors.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace lowrank::test {

/// The repository root (tests/ is next to this file; CMake passes absolute source paths).
inline std::filesystem::path source_root() {
    return std::filesystem::path(__FILE__).parent_path().parent_path();
}

/// The folder of a real PEFT fixture: ../shared/fixtures/peft/<name> beside the repository (or
/// LOWRANK_SHARED_DIR), else the copy under tests/data/peft/ (only licensed fixtures are copied).
/// Nothing when neither exists (a user's clone has no ../shared): the caller skips with a WARN.
inline std::optional<std::filesystem::path> peft_fixture(const std::string& name) {
#ifdef LOWRANK_SHARED_DIR
    const std::filesystem::path shared = LOWRANK_SHARED_DIR;
#else
    const std::filesystem::path shared = source_root().parent_path() / "shared";
#endif
    for (const auto& dir : {shared / "fixtures" / "peft" / name, source_root() / "tests" / "data" / "peft" / name})
        if (std::filesystem::exists(dir / "EXPECTED.json")) return dir;
    return std::nullopt;
}

inline const std::vector<std::string>& peft_fixture_names() {
    static const std::vector<std::string> names = {"opencalm1b-qkv-r1-f16", "opt125m-qv-bf16",
                                                   "distilbert-qv-modules-to-save",
                                                   "gpt2-c_attn-legacy-config"};
    return names;
}

inline nlohmann::json read_json(const std::filesystem::path& path) {
    std::ifstream in(path);
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
}

inline std::vector<std::byte> read_bytes(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    REQUIRE(in.good());
    std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> out(chars.size());
    for (std::size_t i = 0; i < chars.size(); ++i) out[i] = std::byte(static_cast<unsigned char>(chars[i]));
    return out;
}

/// A safetensors file from a header text, a declared header length (default: the text's) and
/// `data_bytes` data bytes of value 0x3c (so floats read back as finite numbers).
inline std::vector<std::byte> st_bytes(const std::string& header, std::size_t data_bytes,
                                       std::optional<std::uint64_t> declared_length = std::nullopt) {
    std::vector<std::byte> out(8 + header.size() + data_bytes, std::byte(0x3c));
    const std::uint64_t n = declared_length.value_or(header.size());
    for (int i = 0; i < 8; ++i) out[i] = std::byte((n >> (8 * i)) & 0xff);
    for (std::size_t i = 0; i < header.size(); ++i) out[8 + i] = std::byte(static_cast<unsigned char>(header[i]));
    return out;
}

/// Every file under `dir` (recursively), sorted; empty if the folder does not exist.
inline std::vector<std::filesystem::path> files_under(const std::filesystem::path& dir) {
    std::vector<std::filesystem::path> out;
    if (!std::filesystem::exists(dir)) return out;
    for (const auto& e : std::filesystem::recursive_directory_iterator(dir))
        if (e.is_regular_file()) out.push_back(e.path());
    std::sort(out.begin(), out.end());
    return out;
}

}  // namespace lowrank::test
