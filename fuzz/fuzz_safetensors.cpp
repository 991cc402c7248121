// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the safetensors reader on arbitrary bytes.
//
// Properties checked beyond "no crash, no sanitizer report": a file the reader accepts has spans
// inside the buffer that tile it, converts without error, and survives write → read with the same
// names, shapes and values (raw bytes for dtypes that are not converted).

#include <lowrank/io/safetensors.hpp>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>

using namespace lowrank::safetensors;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
    std::optional<File> parsed;
    try {
        parsed.emplace(File::parse(bytes));
    } catch (const lowrank::error&) {
        return 0;  // rejected with a message: the expected outcome for malformed input
    }
    // Accepted: nothing below may throw (an escaping exception is reported as a crash).
    const File& f = *parsed;
    std::uint64_t covered = 0;
    Writer w;
    for (const auto& t : f.tensors()) {
        covered += t.end - t.begin;
        if (f.raw(t.name).size() != t.end - t.begin) std::abort();
        if (!is_convertible(t.dtype)) {
            w.add_raw(t.name, t.dtype, t.shape, f.raw(t.name));
            continue;
        }
        const auto values = f.values<double>(t.name);
        if (values.size() != t.numel) std::abort();
        w.add_tensor<double>(t.name, t.shape, std::span<const double>(values), t.dtype);
    }
    if (8 + f.header_length() + covered != size) std::abort();
    for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
    const File again = File::parse(w.bytes());
    for (const auto& t : f.tensors()) {
        if (!is_convertible(t.dtype)) {
            const auto a = f.raw(t.name), b = again.raw(t.name);
            if (!std::equal(a.begin(), a.end(), b.begin(), b.end())) std::abort();
            continue;
        }
        const TensorInfo& u = again.info(t.name);
        if (u.shape != t.shape || u.dtype != t.dtype) std::abort();
        // Same dtype written back: equal values (NaN payloads may differ: compare NaN with NaN).
        const auto a = f.values<double>(t.name), b = again.values<double>(t.name);
        for (std::size_t i = 0; i < a.size(); ++i)
            if (!(a[i] == b[i] || (a[i] != a[i] && b[i] != b[i]))) std::abort();
    }
    if (again.metadata() != f.metadata()) std::abort();
    return 0;
}
