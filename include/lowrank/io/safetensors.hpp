// SPDX-License-Identifier: Apache-2.0
#pragma once
/// \file
/// safetensors files: a strict reader (buffered or memory-mapped) and a writer.
///
/// Layout (https://github.com/huggingface/safetensors):
///
///     [8 bytes: N, little-endian u64] [N bytes: JSON header] [data buffer]
///
/// The header maps each tensor name to `{"dtype": "F32", "shape": [r, c], "data_offsets": [b, e]}`
/// (offsets relative to the start of the data buffer), plus an optional `"__metadata__"` object of
/// string → string. Data is little-endian and row-major.
///
/// Every byte is treated as hostile. `File::open` / `File::parse` accept a file only if
///  - N ≤ `max_header_bytes` (100 MB) and 8 + N ≤ the file size,
///  - the header starts with `{`, is well-formed UTF-8 JSON, has no duplicate key in any object,
///    and nests at most three levels deep,
///  - every entry has exactly `dtype` (a known safetensors dtype), `shape` (array of non-negative
///    integers) and `data_offsets` (two integers, begin ≤ end),
///  - numel × dtype size (computed with overflow checks) equals end − begin,
///  - the spans, sorted, tile the data buffer from 0 with no gap and no overlap, and the file ends
///    exactly where the last one ends,
///  - `__metadata__`, if present, is an object whose values are all strings.
/// Otherwise they throw `lowrank::error` with a message naming the file, the tensor and the
/// offending field. Nothing is allocated from a header field before it has been checked against
/// the file's actual size.
///
/// Reading converts F16, BF16, F32 and F64 to float or double (exactly, except F64 → float, which
/// rounds to nearest). Other dtypes (integers, FP8, …) are validated for layout and available as
/// raw bytes, but not converted. Writing stores float/double data as F32 (the default), F64, F16 or
/// BF16 (rounded to nearest, ties to even; overflow gives ±inf).
///
/// Example:
/// \code
///   auto file = lowrank::safetensors::File::open("adapter_model.safetensors");
///   lowrank::Matrix<float> A = file.matrix<float>("base_model.model.q_proj.lora_A.weight");
///
///   lowrank::safetensors::Writer out;
///   out.add("w", A, lowrank::safetensors::Dtype::BF16);
///   out.set_metadata("format", "pt");
///   out.write("out.safetensors");
/// \endcode

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LOWRANK_HAS_MMAP 1
#else
#define LOWRANK_HAS_MMAP 0
#endif

#include "../core/error.hpp"
#include "../core/memory.hpp"
#include "../core/view.hpp"

namespace lowrank::safetensors {

/// Largest header accepted (the safetensors specification's limit).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;
/// Most dimensions a tensor may have (and most elements of any array in a header).
inline constexpr std::size_t max_dims = 1024;

/// The dtypes of the safetensors format whose elements are whole bytes.
enum class Dtype : std::uint8_t {
    BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64, C64
};

/// The dtype's name in a header ("F32", "BF16", …).
[[nodiscard]] constexpr std::string_view dtype_name(Dtype d) noexcept {
    constexpr std::string_view names[] = {"BOOL", "U8",  "I8",  "F8_E5M2", "F8_E4M3", "F8_E8M0",
                                          "I16",  "U16", "F16", "BF16",    "I32",     "U32",
                                          "F32",  "I64", "U64", "F64",     "C64"};
    return names[static_cast<std::size_t>(d)];
}

/// Bytes per element.
[[nodiscard]] constexpr std::size_t dtype_size(Dtype d) noexcept {
    switch (d) {
        case Dtype::BOOL: case Dtype::U8: case Dtype::I8: case Dtype::F8_E5M2: case Dtype::F8_E4M3:
        case Dtype::F8_E8M0: return 1;
        case Dtype::I16: case Dtype::U16: case Dtype::F16: case Dtype::BF16: return 2;
        case Dtype::I32: case Dtype::U32: case Dtype::F32: return 4;
        case Dtype::I64: case Dtype::U64: case Dtype::F64: case Dtype::C64: return 8;
    }
    return 0;
}

/// The dtype named `name`, or nothing for a name this reader does not know.
[[nodiscard]] constexpr std::optional<Dtype> dtype_from_name(std::string_view name) noexcept {
    for (int i = 0; i <= static_cast<int>(Dtype::C64); ++i)
        if (dtype_name(static_cast<Dtype>(i)) == name) return static_cast<Dtype>(i);
    return std::nullopt;
}

/// Whether `read`/`matrix` can convert this dtype to float/double (and `Writer` can write it).
[[nodiscard]] constexpr bool is_convertible(Dtype d) noexcept {
    return d == Dtype::F16 || d == Dtype::BF16 || d == Dtype::F32 || d == Dtype::F64;
}

/// One tensor of a validated file.
struct TensorInfo {
    std::string name;
    Dtype dtype = Dtype::F32;
    std::vector<std::uint64_t> shape;  ///< empty for a scalar
    std::uint64_t begin = 0;           ///< data_offsets[0], relative to the data buffer
    std::uint64_t end = 0;             ///< data_offsets[1]
    std::uint64_t numel = 1;           ///< product of `shape` (checked: fits, and matches the span)
};

/// How `File::open` brings the bytes in.
enum class ReadMode {
    /// Read the whole file into memory (safe even if the file changes afterwards).
    buffered,
    /// Map the file read-only (POSIX mmap). Cheaper for large files; the file must not be truncated
    /// while the `File` is alive (the OS would raise SIGBUS on access to the lost pages).
    mmap,
};

namespace detail {

// ---- element codecs ------------------------------------------------------------------------

[[nodiscard]] inline std::uint64_t load_le(const std::byte* p, std::size_t n) noexcept {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t(std::to_integer<unsigned>(p[i])) << (8 * i);
    return v;
}
inline void store_le(std::byte* p, std::uint64_t v, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) p[i] = std::byte((v >> (8 * i)) & 0xffu);
}

/// IEEE binary16 → float (exact: every half is a float).
[[nodiscard]] inline float half_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    const std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa · 2⁻²⁴
        const float v = std::ldexp(float(mantissa), -24);
        return sign ? -v : v;
    }
    const std::uint32_t bits = exponent == 31 ? (sign | 0x7f800000u | (mantissa << 13))
                                              : (sign | ((exponent + 112u) << 23) | (mantissa << 13));
    return std::bit_cast<float>(bits);
}

/// bfloat16 → float (exact: the upper half of a float).
[[nodiscard]] inline float bfloat16_to_float(std::uint16_t b) noexcept {
    return std::bit_cast<float>(std::uint32_t(b) << 16);
}

/// Rounds x to a binary format with `exp_bits` exponent and `mant_bits` stored mantissa bits
/// (binary16: 5, 10; bfloat16: 8, 7), to nearest with ties to even, and returns its bit pattern.
/// Overflow gives ±inf, NaN a quiet NaN of the same sign. Works from double so that float and
/// double inputs are rounded once (no double rounding through float).
[[nodiscard]] inline std::uint16_t encode_small_float(double x, int exp_bits, int mant_bits) noexcept {
    const int bias = (1 << (exp_bits - 1)) - 1;
    const auto sign = std::uint16_t(std::signbit(x) ? 1u << (exp_bits + mant_bits) : 0u);
    const auto exp_all = std::uint16_t(((1u << exp_bits) - 1u) << mant_bits);
    if (std::isnan(x)) return std::uint16_t(sign | exp_all | (1u << (mant_bits - 1)));
    const double a = std::fabs(x);
    if (std::isinf(a)) return std::uint16_t(sign | exp_all);
    if (a == 0) return sign;
    int e = std::ilogb(a);  // a ∈ [2^e, 2^(e+1))
    if (e < 1 - bias) e = 1 - bias;  // subnormal range: fixed quantum 2^(emin − mant_bits)
    const double m = std::ldexp(a, mant_bits - e);  // exact (power-of-two scaling), < 2^(mant_bits+1)
    double r = std::floor(m);
    const double frac = m - r;  // exact
    if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1;
    const double hidden = std::ldexp(1.0, mant_bits);
    if (r >= 2 * hidden) {  // rounded up to the next binade
        r /= 2;
        e += 1;
    }
    if (e > bias) return std::uint16_t(sign | exp_all);  // overflow → inf
    if (r < hidden) return std::uint16_t(sign | std::uint16_t(r));  // subnormal (e == emin)
    return std::uint16_t(sign | (std::uint32_t(e + bias) << mant_bits) | std::uint32_t(r - hidden));
}
[[nodiscard]] inline std::uint16_t float_to_half(double x) noexcept { return encode_small_float(x, 5, 10); }
[[nodiscard]] inline std::uint16_t float_to_bfloat16(double x) noexcept { return encode_small_float(x, 8, 7); }

/// Decodes `count` elements of a convertible dtype from little-endian bytes into `out`.
template <class T>
void decode(Dtype dtype, const std::byte* src, std::size_t count, T* out) noexcept {
    switch (dtype) {
        case Dtype::F16:
            for (std::size_t i = 0; i < count; ++i)
                out[i] = T(half_to_float(std::uint16_t(load_le(src + 2 * i, 2))));
            break;
        case Dtype::BF16:
            for (std::size_t i = 0; i < count; ++i)
                out[i] = T(bfloat16_to_float(std::uint16_t(load_le(src + 2 * i, 2))));
            break;
        case Dtype::F32:
            for (std::size_t i = 0; i < count; ++i)
                out[i] = T(std::bit_cast<float>(std::uint32_t(load_le(src + 4 * i, 4))));
            break;
        case Dtype::F64:
            for (std::size_t i = 0; i < count; ++i)
                out[i] = T(std::bit_cast<double>(load_le(src + 8 * i, 8)));
            break;
        default: LOWRANK_ASSERT(false && "decode: dtype not convertible");
    }
}

/// Encodes one value into `dst` (dtype_size(dtype) bytes).
template <class T>
void encode(Dtype dtype, T value, std::byte* dst) noexcept {
    switch (dtype) {
        case Dtype::F16: store_le(dst, float_to_half(double(value)), 2); break;
        case Dtype::BF16: store_le(dst, float_to_bfloat16(double(value)), 2); break;
        case Dtype::F32: store_le(dst, std::bit_cast<std::uint32_t>(static_cast<float>(value)), 4); break;
        case Dtype::F64: store_le(dst, std::bit_cast<std::uint64_t>(static_cast<double>(value)), 8); break;
        default: LOWRANK_ASSERT(false && "encode: dtype not convertible");
    }
}

// ---- messages ------------------------------------------------------------------------------

/// A name for messages: quoted, cut to 120 bytes (a hostile name may be megabytes long).
[[nodiscard]] inline std::string quote_name(std::string_view s) {
    std::string out = "'";
    if (s.size() > 120) {
        out.append(s.substr(0, 120));
        out += "...'";
    } else {
        out.append(s);
        out += "'";
    }
    return out;
}

/// out = a · b unless that overflows 64 bits (then returns true and leaves out alone).
[[nodiscard]] inline bool mul_overflows(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
    if (b != 0 && a > std::numeric_limits<std::uint64_t>::max() / b) return true;
    out = a * b;
    return false;
}

// ---- JSON with duplicate-key and depth checks --------------------------------------------

/// Parses `text` with nlohmann::json (the ordered variant keeps the file's key order), rejecting
/// duplicate keys in any object, nesting deeper than `max_depth` containers and arrays of more
/// than `max_array` elements (checked while parsing, before the DOM grows). Throws lowrank::error
/// prefixed by `where`.
template <class Json = nlohmann::ordered_json>
[[nodiscard]] Json parse_json_strict(std::string_view text, const std::string& where, int max_depth,
                                     std::size_t max_array) {
    struct Open {
        bool is_array;
        std::size_t count;           // elements so far (arrays)
        std::set<std::string, std::less<>> keys;  // keys so far (objects)
    };
    std::vector<Open> open;
    auto count_element = [&] {
        if (!open.empty() && open.back().is_array && ++open.back().count > max_array)
            lowrank::detail::fail(where, ": a JSON array has more than ", max_array, " elements");
    };
    auto callback = [&](int depth, nlohmann::json::parse_event_t event, Json& parsed) -> bool {
        using E = nlohmann::json::parse_event_t;
        switch (event) {
            case E::object_start:
            case E::array_start:
                count_element();
                if (depth >= max_depth)
                    lowrank::detail::fail(where, ": JSON nested deeper than ", max_depth, " levels");
                open.push_back({event == E::array_start, 0, {}});
                break;
            case E::object_end:
            case E::array_end:
                if (!open.empty()) open.pop_back();
                break;
            case E::value: count_element(); break;
            case E::key: {
                if (open.empty()) break;
                const auto& key = parsed.template get_ref<const std::string&>();
                if (!open.back().keys.insert(key).second)
                    lowrank::detail::fail(where, ": duplicate key ", quote_name(key), " in a JSON object");
                break;
            }
        }
        return true;
    };
    try {
        return Json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true);
    } catch (const nlohmann::json::exception& e) {
        lowrank::detail::fail(where, ": malformed JSON: ", e.what());
    }
}

// ---- memory ------------------------------------------------------------------------------

/// A read-only mapping of a whole file (POSIX), released on destruction.
class Mapping {
public:
    Mapping() = default;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    Mapping(Mapping&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
    Mapping& operator=(Mapping&& o) noexcept {
        if (this != &o) {
            release();
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    ~Mapping() { release(); }

    [[nodiscard]] static Mapping map(const std::filesystem::path& path, const std::string& where) {
#if LOWRANK_HAS_MMAP
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) lowrank::detail::fail(where, ": cannot open the file");
        struct ::stat st {};
        if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
            ::close(fd);
            lowrank::detail::fail(where, ": not a regular file");
        }
        Mapping m;
        m.size_ = static_cast<std::size_t>(st.st_size);
        if (m.size_ > 0) {
            void* p = ::mmap(nullptr, m.size_, PROT_READ, MAP_PRIVATE, fd, 0);
            if (p == MAP_FAILED) {
                ::close(fd);
                lowrank::detail::fail(where, ": mmap of ", m.size_, " bytes failed");
            }
            m.data_ = p;
        }
        ::close(fd);
        return m;
#else
        (void)path;
        lowrank::detail::fail(where, ": memory mapping is not available on this platform");
#endif
    }
    [[nodiscard]] std::span<const std::byte> bytes() const noexcept {
        return {static_cast<const std::byte*>(data_), size_};
    }

private:
    void release() noexcept {
#if LOWRANK_HAS_MMAP
        if (data_) ::munmap(data_, size_);
#endif
        data_ = nullptr;
        size_ = 0;
    }
    void* data_ = nullptr;
    std::size_t size_ = 0;
};

/// The validated contents of a header.
struct Header {
    std::uint64_t length = 0;  ///< N
    std::vector<TensorInfo> tensors;  ///< sorted by data offset
    std::map<std::string, std::string, std::less<>> metadata;
};

/// Validates a whole file held in `bytes` (see the file comment for the rules).
[[nodiscard]] inline Header parse_header(std::span<const std::byte> bytes, const std::string& where) {
    using lowrank::detail::fail;
    const std::uint64_t size = bytes.size();
    if (size < 8)
        fail(where, ": truncated: the file has ", size, " bytes, fewer than the 8-byte header length");
    Header h;
    h.length = load_le(bytes.data(), 8);
    if (h.length > max_header_bytes)
        fail(where, ": header length ", h.length, " exceeds the limit of ", max_header_bytes, " bytes");
    if (h.length > size - 8)
        fail(where, ": header length ", h.length, " runs past the end of the file (", size,
             " bytes, so at most ", size - 8, " are available)");
    const std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8),
                                static_cast<std::size_t>(h.length));
    if (text.empty() || text.front() != '{')
        fail(where, ": the header (", h.length, " bytes) does not start with '{'");
    // Depth: root object (0) → tensor entry (1) → shape / data_offsets arrays (2).
    const auto root = parse_json_strict(text, where + ": header", 3, max_dims);
    if (!root.is_object()) fail(where, ": the header is not a JSON object");

    const std::uint64_t data_size = size - 8 - h.length;
    h.tensors.reserve(root.size());
    for (const auto& [name, entry] : root.items()) {
        if (name == "__metadata__") {
            if (!entry.is_object())
                fail(where, ": __metadata__ must be an object of strings, got ", entry.type_name());
            for (const auto& [key, value] : entry.items()) {
                if (!value.is_string())
                    fail(where, ": __metadata__ value of ", quote_name(key), " must be a string, got ",
                         value.type_name());
                h.metadata.emplace(key, value.template get<std::string>());
            }
            continue;
        }
        const std::string tname = "tensor " + quote_name(name);
        if (!entry.is_object()) fail(where, ": ", tname, " must be an object, got ", entry.type_name());
        for (const auto& [key, value] : entry.items())
            if (key != "dtype" && key != "shape" && key != "data_offsets")
                fail(where, ": ", tname, " has an unknown field ", quote_name(key));
        TensorInfo t;
        t.name = name;
        // dtype
        const auto dt = entry.find("dtype");
        if (dt == entry.end() || !dt->is_string()) fail(where, ": ", tname, " has no string 'dtype'");
        const auto& dname = dt->template get_ref<const std::string&>();
        const auto d = dtype_from_name(dname);
        if (!d) fail(where, ": ", tname, " has an unknown dtype ", quote_name(dname));
        t.dtype = *d;
        // shape, numel (checked)
        const auto sh = entry.find("shape");
        if (sh == entry.end() || !sh->is_array()) fail(where, ": ", tname, " has no array 'shape'");
        t.shape.reserve(sh->size());
        for (const auto& dim : *sh) {
            if (!dim.is_number_unsigned())
                fail(where, ": ", tname, " has a shape entry that is not a non-negative integer: ",
                     dim.is_number() ? dim.dump() : std::string(dim.type_name()));
            const auto v = dim.template get<std::uint64_t>();
            if (v > std::uint64_t(std::numeric_limits<Index>::max()))
                fail(where, ": ", tname, " has a dimension ", v, " larger than lowrank::Index can hold");
            if (mul_overflows(t.numel, v, t.numel))
                fail(where, ": ", tname, ": the product of its shape overflows 64 bits");
            t.shape.push_back(v);
        }
        std::uint64_t nbytes = 0;
        if (mul_overflows(t.numel, dtype_size(t.dtype), nbytes))
            fail(where, ": ", tname, ": numel ", t.numel, " x ", dtype_size(t.dtype),
                 " bytes overflows 64 bits");
        // data_offsets
        const auto off = entry.find("data_offsets");
        if (off == entry.end() || !off->is_array() || off->size() != 2 ||
            !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
            fail(where, ": ", tname, " needs 'data_offsets' = [begin, end] of non-negative integers");
        t.begin = (*off)[0].template get<std::uint64_t>();
        t.end = (*off)[1].template get<std::uint64_t>();
        if (t.begin > t.end)
            fail(where, ": ", tname, " has data_offsets [", t.begin, ", ", t.end, "] with begin > end");
        if (t.end - t.begin != nbytes)
            fail(where, ": ", tname, " (", dname, ", ", t.numel, " elements = ", nbytes,
                 " bytes) has data_offsets [", t.begin, ", ", t.end, "] spanning ", t.end - t.begin,
                 " bytes");
        if (t.end > data_size)
            fail(where, ": ", tname, " has data_offsets [", t.begin, ", ", t.end,
                 "] past the end of the data buffer (", data_size, " bytes)");
        h.tensors.push_back(std::move(t));
    }
    // The spans must tile [0, data_size) exactly.
    std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t cursor = 0;
    const TensorInfo* previous = nullptr;
    for (const auto& t : h.tensors) {
        if (t.begin < cursor)
            fail(where, ": tensor ", quote_name(t.name), " at [", t.begin, ", ", t.end,
                 ") overlaps tensor ", quote_name(previous->name), " at [", previous->begin, ", ",
                 previous->end, ")");
        if (t.begin > cursor)
            fail(where, ": gap in the data buffer: bytes [", cursor, ", ", t.begin,
                 ") belong to no tensor (before ", quote_name(t.name), ")");
        cursor = t.end;
        previous = &t;
    }
    if (cursor != data_size)
        fail(where, ": the file has ", data_size, " data bytes after the header but its tensors cover ",
             cursor, " (file length must be exactly 8 + ", h.length, " + ", cursor, " = ",
             8 + h.length + cursor, " bytes, it is ", size, ")");
    return h;
}

}  // namespace detail

/// A validated safetensors file: its tensors, metadata and (owned or mapped) bytes.
/// Move-only. Lookups are by exact tensor name.
class File {
public:
    File() = default;
    File(File&&) noexcept = default;
    File& operator=(File&&) noexcept = default;
    File(const File&) = delete;
    File& operator=(const File&) = delete;

    /// Opens and validates `path`. Throws `lowrank::error` for I/O failures and malformed files.
    [[nodiscard]] static File open(const std::filesystem::path& path, ReadMode mode = ReadMode::buffered) {
        const std::string where = "lowrank::safetensors::File::open(" + path.string() + ")";
        File f;
        f.where_ = where;
        if (mode == ReadMode::mmap) {
            f.mapping_ = detail::Mapping::map(path, where);
            f.bytes_ = f.mapping_.bytes();
        } else {
            std::error_code ec;
            if (!std::filesystem::is_regular_file(path, ec))
                lowrank::detail::fail(where, ": not a regular file (or it does not exist)");
            const auto size = std::filesystem::file_size(path, ec);
            if (ec) lowrank::detail::fail(where, ": cannot read the file size: ", ec.message());
            std::ifstream in(path, std::ios::binary);
            if (!in) lowrank::detail::fail(where, ": cannot open the file");
            try {
                f.buffer_.resize(static_cast<std::size_t>(size));
            } catch (const std::bad_alloc&) {
                lowrank::detail::fail(where, ": cannot allocate ", size, " bytes to read the file");
            }
            in.read(reinterpret_cast<char*>(f.buffer_.data()), static_cast<std::streamsize>(size));
            if (static_cast<std::uint64_t>(in.gcount()) != size)
                lowrank::detail::fail(where, ": read ", in.gcount(), " of ", size, " bytes");
            f.bytes_ = f.buffer_;
        }
        f.load_header();
        return f;
    }

    /// Validates a file held in memory; the bytes are copied.
    [[nodiscard]] static File parse(std::span<const std::byte> bytes,
                                    std::string where = "lowrank::safetensors::File::parse") {
        File f;
        f.where_ = std::move(where);
        f.buffer_.assign(bytes.begin(), bytes.end());
        f.bytes_ = f.buffer_;
        f.load_header();
        return f;
    }

    /// The tensors, in the order of their data in the file.
    [[nodiscard]] const std::vector<TensorInfo>& tensors() const noexcept { return header_.tensors; }
    /// The `__metadata__` map (empty if absent).
    [[nodiscard]] const std::map<std::string, std::string, std::less<>>& metadata() const noexcept {
        return header_.metadata;
    }
    /// N, the JSON header's length in bytes.
    [[nodiscard]] std::uint64_t header_length() const noexcept { return header_.length; }
    /// The tensor called `name`, or nullptr.
    [[nodiscard]] const TensorInfo* find(std::string_view name) const noexcept {
        const auto it = index_.find(name);
        return it == index_.end() ? nullptr : &header_.tensors[it->second];
    }
    [[nodiscard]] bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }
    /// The tensor called `name`; throws `lowrank::error` if there is none.
    [[nodiscard]] const TensorInfo& info(std::string_view name) const {
        const TensorInfo* t = find(name);
        if (!t) lowrank::detail::fail(where_, ": no tensor named ", detail::quote_name(name));
        return *t;
    }
    /// The raw little-endian bytes of a tensor.
    [[nodiscard]] std::span<const std::byte> raw(std::string_view name) const {
        const TensorInfo& t = info(name);
        return data_.subspan(static_cast<std::size_t>(t.begin), static_cast<std::size_t>(t.end - t.begin));
    }

    /// All elements of a tensor, row-major, converted to T. O(numel).
    /// Throws unless the dtype is F16, BF16, F32 or F64.
    template <Real T>
    [[nodiscard]] std::vector<T> values(std::string_view name) const {
        const TensorInfo& t = convertible_info(name);
        std::vector<T> out(static_cast<std::size_t>(t.numel));
        detail::decode<T>(t.dtype, raw(name).data(), out.size(), out.data());
        return out;
    }

    /// A tensor as a row-major matrix converted to T: a 2-D tensor r × c as r × c, a 1-D tensor of
    /// n elements as 1 × n, a scalar as 1 × 1. Throws for other ranks and non-convertible dtypes.
    /// The matrix's memory is advised for transparent huge pages before it is filled
    /// (advise_huge_pages, core/memory.hpp): a base weight loaded here and streamed by every
    /// forward then sits in 2 MiB pages where the kernel has them (whole pages only: a matrix
    /// under 2 MiB is unaffected).
    template <Real T>
    [[nodiscard]] Matrix<T> matrix(std::string_view name) const {
        const TensorInfo& t = convertible_info(name);
        Index rows = 1, cols = 1;
        if (t.shape.size() == 2) {
            rows = static_cast<Index>(t.shape[0]);
            cols = static_cast<Index>(t.shape[1]);
        } else if (t.shape.size() == 1) {
            cols = static_cast<Index>(t.shape[0]);
        } else if (!t.shape.empty()) {
            lowrank::detail::fail(where_, ": tensor ", detail::quote_name(name), " has ", t.shape.size(),
                                  " dimensions; a matrix needs at most 2");
        }
        Matrix<T> m(rows, cols);  // rows · cols = numel, whose bytes are inside the file
        advise_huge_pages(m.data(), sizeof(T) * static_cast<std::size_t>(t.numel));  // before the first write
        detail::decode<T>(t.dtype, raw(name).data(), static_cast<std::size_t>(t.numel), m.data());
        return m;
    }

private:
    const TensorInfo& convertible_info(std::string_view name) const {
        const TensorInfo& t = info(name);
        if (!is_convertible(t.dtype))
            lowrank::detail::fail(where_, ": tensor ", detail::quote_name(name), " has dtype ",
                                  dtype_name(t.dtype), ", which is not converted to floating point "
                                  "(F16, BF16, F32 and F64 are)");
        return t;
    }
    void load_header() {
        header_ = detail::parse_header(bytes_, where_);
        data_ = bytes_.subspan(static_cast<std::size_t>(8 + header_.length));
        for (std::size_t i = 0; i < header_.tensors.size(); ++i)
            index_.emplace(header_.tensors[i].name, i);  // names are unique (checked by the parser)
    }

    std::string where_;
    std::vector<std::byte> buffer_;
    detail::Mapping mapping_;
    std::span<const std::byte> bytes_;
    std::span<const std::byte> data_;
    detail::Header header_;
    std::map<std::string, std::size_t, std::less<>> index_;
};

/// Builds a safetensors file. Tensors are converted and copied when added, so inputs need not
/// outlive the writer. Layout follows the reference implementation: tensors sorted by decreasing
/// element size, then by name, so every tensor is aligned to its element size; the header is
/// padded with spaces to a multiple of 8 bytes.
class Writer {
public:
    /// Adds a matrix (any Eigen expression of float or double; row-major order is written
    /// whatever its storage order) as a 2-D tensor rows × cols in `dtype`.
    /// Throws for a duplicate or reserved name, or a dtype other than F16, BF16, F32, F64.
    template <class D>
    void add(std::string name, const Eigen::MatrixBase<D>& m, Dtype dtype = Dtype::F32) {
        using T = typename D::Scalar;
        static_assert(Real<T>, "lowrank::safetensors::Writer::add: the matrix must hold float or double");
        check_new(name, dtype);
        Entry e{std::move(name), dtype, {std::uint64_t(m.rows()), std::uint64_t(m.cols())}, {}};
        const std::size_t es = dtype_size(dtype);
        e.bytes.resize(static_cast<std::size_t>(m.rows() * m.cols()) * es);
        const auto& d = m.derived();
        std::byte* p = e.bytes.data();
        for (Index i = 0; i < d.rows(); ++i)
            for (Index j = 0; j < d.cols(); ++j, p += es) detail::encode<T>(dtype, T(d(i, j)), p);
        entries_.push_back(std::move(e));
    }

    /// Adds a tensor of any shape from row-major values (`values.size()` must equal the product of
    /// `shape`).
    template <Real T>
    void add_tensor(std::string name, std::vector<std::uint64_t> shape, std::span<const T> values,
             Dtype dtype = Dtype::F32) {
        check_new(name, dtype);
        std::uint64_t numel = 1;
        for (auto s : shape)
            if (detail::mul_overflows(numel, s, numel))
                lowrank::detail::fail("lowrank::safetensors::Writer::add_tensor: the shape of ",
                                      detail::quote_name(name), " overflows");
        if (numel != values.size())
            lowrank::detail::fail("lowrank::safetensors::Writer::add_tensor: tensor ", detail::quote_name(name),
                                  " has ", values.size(), " values for a shape of ", numel, " elements");
        Entry e{std::move(name), dtype, std::move(shape), {}};
        const std::size_t es = dtype_size(dtype);
        e.bytes.resize(values.size() * es);
        for (std::size_t i = 0; i < values.size(); ++i) detail::encode<T>(dtype, values[i], e.bytes.data() + i * es);
        entries_.push_back(std::move(e));
    }

    /// Adds a tensor of any dtype from its raw little-endian bytes (e.g. copied from
    /// `File::raw`); `bytes.size()` must equal numel × dtype size.
    void add_raw(std::string name, Dtype dtype, std::vector<std::uint64_t> shape,
                 std::span<const std::byte> bytes) {
        const char* fn = "lowrank::safetensors::Writer::add_raw";
        if (name == "__metadata__") lowrank::detail::fail(fn, ": the name '__metadata__' is reserved");
        if (contains(name)) lowrank::detail::fail(fn, ": duplicate tensor name ", detail::quote_name(name));
        std::uint64_t nbytes = dtype_size(dtype);
        for (auto s : shape)
            if (detail::mul_overflows(nbytes, s, nbytes))
                lowrank::detail::fail(fn, ": the shape of ", detail::quote_name(name), " overflows");
        if (nbytes != bytes.size())
            lowrank::detail::fail(fn, ": tensor ", detail::quote_name(name), " has ", bytes.size(),
                                  " bytes for ", nbytes, " expected from its shape and dtype");
        entries_.push_back({std::move(name), dtype, std::move(shape), {bytes.begin(), bytes.end()}});
    }

    /// Sets a `__metadata__` entry (PEFT writes {"format": "pt"}).
    void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

    [[nodiscard]] bool contains(std::string_view name) const noexcept {
        return std::any_of(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.name == name; });
    }

    /// The complete file.
    [[nodiscard]] std::vector<std::byte> bytes() const {
        std::vector<const Entry*> order;
        for (const auto& e : entries_) order.push_back(&e);
        std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
            const auto sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
            return sa != sb ? sa > sb : a->name < b->name;
        });
        nlohmann::ordered_json header = nlohmann::ordered_json::object();
        if (!metadata_.empty()) header["__metadata__"] = metadata_;
        std::uint64_t offset = 0;
        for (const Entry* e : order) {
            const std::uint64_t end = offset + e->bytes.size();
            header[e->name] = {{"dtype", std::string(dtype_name(e->dtype))},
                               {"shape", e->shape},
                               {"data_offsets", {offset, end}}};
            offset = end;
        }
        std::string text;
        try {
            text = header.dump();
        } catch (const nlohmann::json::exception& ex) {  // e.g. a name that is not valid UTF-8
            lowrank::detail::fail("lowrank::safetensors::Writer: cannot encode the header: ", ex.what());
        }
        text.append((8 - text.size() % 8) % 8, ' ');
        std::vector<std::byte> out(8 + text.size() + offset);
        detail::store_le(out.data(), text.size(), 8);
        std::memcpy(out.data() + 8, text.data(), text.size());
        std::byte* p = out.data() + 8 + text.size();
        for (const Entry* e : order) {
            if (!e->bytes.empty()) std::memcpy(p, e->bytes.data(), e->bytes.size());
            p += e->bytes.size();
        }
        return out;
    }

    /// Writes the file (to `path` + ".tmp", then renamed over `path`).
    void write(const std::filesystem::path& path) const {
        const auto data = bytes();
        auto tmp = path;
        tmp += ".tmp";
        {
            std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
            if (!out) lowrank::detail::fail("lowrank::safetensors::Writer::write: cannot create ", tmp.string());
            out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
            if (!out) lowrank::detail::fail("lowrank::safetensors::Writer::write: cannot write ", tmp.string());
        }
        std::error_code ec;
        std::filesystem::rename(tmp, path, ec);
        if (ec)
            lowrank::detail::fail("lowrank::safetensors::Writer::write: cannot rename ", tmp.string(),
                                  " to ", path.string(), ": ", ec.message());
    }

private:
    struct Entry {
        std::string name;
        Dtype dtype;
        std::vector<std::uint64_t> shape;
        std::vector<std::byte> bytes;
    };
    void check_new(const std::string& name, Dtype dtype) const {
        const char* fn = "lowrank::safetensors::Writer::add";
        if (name == "__metadata__") lowrank::detail::fail(fn, ": the name '__metadata__' is reserved");
        if (contains(name)) lowrank::detail::fail(fn, ": duplicate tensor name ", detail::quote_name(name));
        if (!is_convertible(dtype))
            lowrank::detail::fail(fn, ": tensor ", detail::quote_name(name), ": cannot write dtype ",
                                  dtype_name(dtype), " (F16, BF16, F32 and F64 are supported)");
    }
    std::vector<Entry> entries_;
    std::map<std::string, std::string> metadata_;
};

}  // namespace lowrank::safetensors
