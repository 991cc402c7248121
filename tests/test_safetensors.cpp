// SPDX-License-Identifier: Apache-2.0
// safetensors: the F16/BF16 codecs against their IEEE definitions (all 65536 patterns, every
// rounding midpoint), write → read round trips, the real PEFT files against values computed by
// numpy, and one test per class of malformed file.

#include <lowrank/io/safetensors.hpp>

#include "io_support.hpp"
#include "support.hpp"

#include <cmath>
#include <limits>

using namespace lowrank;
using namespace lowrank::safetensors;
using Catch::Contains;
using lowrank::test::st_bytes;
namespace sd = lowrank::safetensors::detail;

namespace {

/// binary16 value from its fields (IEEE 754: bias 15, 10 fraction bits), in double.
double half_reference(std::uint16_t h) {
    const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    const double v = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(1.0 + m / 1024.0, e - 15);
    return s ? -v : v;
}
/// bfloat16 value from its fields (bias 127, 7 fraction bits), in double.
double bfloat16_reference(std::uint16_t b) {
    const int s = b >> 15, e = (b >> 7) & 255, m = b & 127;
    const double v = e == 0 ? std::ldexp(double(m), -133) : std::ldexp(1.0 + m / 128.0, e - 127);
    return s ? -v : v;
}

File parse(const std::vector<std::byte>& bytes) { return File::parse(bytes); }

}  // namespace

TEST_CASE("F16 and BF16 decode to their IEEE values and encode back bit for bit", "[safetensors][codec]") {
    for (std::uint32_t bits = 0; bits < 65536; ++bits) {
        const auto h = std::uint16_t(bits);
        const bool special_h = ((h >> 10) & 31) == 31, special_b = ((h >> 7) & 255) == 255;
        const float fh = sd::half_to_float(h), fb = sd::bfloat16_to_float(h);
        if (special_h) {
            REQUIRE(bool((h & 1023) == 0 ? std::isinf(fh) : std::isnan(fh)));
        } else {
            REQUIRE(double(fh) == half_reference(h));
            REQUIRE(std::signbit(fh) == bool(h >> 15));
            REQUIRE(sd::float_to_half(fh) == h);
            REQUIRE(sd::float_to_half(double(fh)) == h);
        }
        if (special_b) {
            REQUIRE(bool((h & 127) == 0 ? std::isinf(fb) : std::isnan(fb)));
        } else {
            REQUIRE(double(fb) == bfloat16_reference(h));
            REQUIRE(sd::float_to_bfloat16(fb) == h);
        }
    }
    REQUIRE(std::isnan(sd::half_to_float(sd::float_to_half(std::nan("")))));
    REQUIRE(std::isnan(sd::bfloat16_to_float(sd::float_to_bfloat16(std::nan("")))));
    REQUIRE(sd::float_to_half(INFINITY) == 0x7c00);
    REQUIRE(sd::float_to_bfloat16(-INFINITY) == 0xff80);
}

TEST_CASE("F16 and BF16 encoding rounds to nearest, ties to even, overflow to infinity",
          "[safetensors][codec]") {
    // Between each pair of adjacent positive finite values: the midpoint goes to the one with an
    // even last bit, anything off the midpoint to the nearer one.
    for (std::uint16_t h = 0; h < 0x7bff; ++h) {
        const double lo = half_reference(h), hi = half_reference(std::uint16_t(h + 1));
        const double mid = (lo + hi) / 2;  // exact in double
        const auto even = (h & 1) ? std::uint16_t(h + 1) : h;
        REQUIRE(sd::float_to_half(mid) == even);
        REQUIRE(sd::float_to_half(-mid) == std::uint16_t(even | 0x8000));
        REQUIRE(sd::float_to_half(std::nextafter(mid, 0.0)) == h);
        REQUIRE(sd::float_to_half(std::nextafter(mid, 1e9)) == std::uint16_t(h + 1));
    }
    for (std::uint16_t b = 0; b < 0x7f7f; ++b) {
        const double lo = bfloat16_reference(b), hi = bfloat16_reference(std::uint16_t(b + 1));
        const double mid = (lo + hi) / 2;
        const auto even = (b & 1) ? std::uint16_t(b + 1) : b;
        REQUIRE(sd::float_to_bfloat16(mid) == even);
        REQUIRE(sd::float_to_bfloat16(std::nextafter(mid, 0.0)) == b);
        REQUIRE(sd::float_to_bfloat16(std::nextafter(mid, 1e300)) == std::uint16_t(b + 1));
    }
    // 65504 is the largest half; the midpoint to 65536 rounds to even (which is the overflow).
    REQUIRE(sd::float_to_half(65504.0) == 0x7bff);
    REQUIRE(sd::float_to_half(65519.99) == 0x7bff);
    REQUIRE(sd::float_to_half(65520.0) == 0x7c00);
    REQUIRE(sd::float_to_half(1e300) == 0x7c00);
    REQUIRE(sd::float_to_half(1e-300) == 0x0000);  // below half the smallest subnormal
    REQUIRE(sd::float_to_half(-1e-300) == 0x8000);
    REQUIRE(sd::float_to_bfloat16(1e300) == 0x7f80);
}

TEMPLATE_TEST_CASE("write then read returns the values, exactly or within half an ulp of the dtype",
                   "[safetensors][roundtrip]", float, double) {
    using T = TestType;
    const Index rows = GENERATE(0, 1, 3, 17), cols = GENERATE(1, 5, 33);
    const Dtype dtype = GENERATE(Dtype::F32, Dtype::F64, Dtype::F16, Dtype::BF16);
    Matrix<T> m = test::random_matrix<T>(rows, cols, 11 + std::uint64_t(rows * cols));
    if (m.size() > 0) m(0, 0) = T(1e-6);  // subnormal in F16
    Writer w;
    w.add("b.weight", m, dtype);
    const std::vector<float> scalar = {2.5f};
    w.add_tensor<float>("a.scalar", {}, std::span<const float>(scalar), Dtype::F32);
    const std::vector<double> cube(24, 0.25);
    w.add_tensor<double>("c.cube", {2, 3, 4}, std::span<const double>(cube), Dtype::F16);
    w.set_metadata("format", "pt");
    const auto bytes = w.bytes();

    // Layout: header padded to 8, spans tiling the buffer, largest elements first (aligned).
    const std::uint64_t n = sd::load_le(bytes.data(), 8);
    REQUIRE(n % 8 == 0);
    const File f = File::parse(bytes);
    REQUIRE(f.header_length() == n);
    REQUIRE(f.metadata().at("format") == "pt");
    REQUIRE(f.tensors().size() == 3);
    for (const auto& t : f.tensors()) REQUIRE(t.begin % dtype_size(t.dtype) == 0);
    REQUIRE(f.info("b.weight").dtype == dtype);
    REQUIRE(f.info("b.weight").shape == std::vector<std::uint64_t>{std::uint64_t(rows), std::uint64_t(cols)});
    REQUIRE(f.info("a.scalar").shape.empty());
    REQUIRE(f.matrix<T>("a.scalar")(0, 0) == T(2.5));
    REQUIRE(f.values<T>("c.cube") == std::vector<T>(24, T(0.25)));
    REQUIRE_THROWS_WITH(f.matrix<T>("c.cube"), Contains("c.cube") && Contains("3 dimensions"));

    const Matrix<T> got = f.matrix<T>("b.weight");
    REQUIRE(got.rows() == rows);
    REQUIRE(got.cols() == cols);
    for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) {
            const double x = double(m(i, j)), y = double(got(i, j));
            switch (dtype) {
                case Dtype::F64: REQUIRE(y == x); break;
                case Dtype::F32: REQUIRE(y == double(float(m(i, j)))); break;
                // Half an ulp: 2^-11 relative for normal halves, 2^-25 absolute for subnormals.
                case Dtype::F16: REQUIRE(std::abs(y - x) <= std::max(std::abs(x) * 0x1p-11, 0x1p-25)); break;
                case Dtype::BF16: REQUIRE(std::abs(y - x) <= std::abs(x) * 0x1p-8); break;
                default: FAIL("unexpected dtype");
            }
        }
}

TEST_CASE("a matrix of several huge pages is read into memory advised for them", "[safetensors][roundtrip]") {
    // 2048 × 1024 floats, 8 MiB: at least three whole 2 MiB pages wherever the allocation starts.
    const Matrix<float> m = test::random_matrix<float>(2048, 1024, 5);
    Writer w;
    w.add("w", m, Dtype::F32);
    w.add("small", m.topRows(3), Dtype::F32);
    const File f = File::parse(w.bytes());
    const Matrix<float> got = f.matrix<float>("w"), small = f.matrix<float>("small");
    REQUIRE(got == m);
    REQUIRE(small == m.topRows(3));
    const auto first_page = (reinterpret_cast<std::uintptr_t>(got.data()) + lowrank::core::huge_page_bytes - 1) &
                            ~std::uintptr_t(lowrank::core::huge_page_bytes - 1);
    if (test::kernel_has_thp()) {
        CHECK(test::advised_for_huge_pages(reinterpret_cast<const void*>(first_page)));
        CHECK_FALSE(test::advised_for_huge_pages(m.data() + (first_page - reinterpret_cast<std::uintptr_t>(got.data())) / sizeof(float)));
    }
}

TEST_CASE("files on disk: buffered and memory-mapped reads agree", "[safetensors][roundtrip]") {
    const auto dir = test::unique_temp_path("test_safetensors");
    std::filesystem::create_directories(dir);
    const Matrix<double> m = test::random_matrix<double>(7, 9, 3);
    Writer w;
    w.add("x", m, Dtype::F64);
    w.add("y", m.topRows(2), Dtype::BF16);
    w.write(dir / "t.safetensors");
    const File a = File::open(dir / "t.safetensors", ReadMode::buffered);
    const File b = File::open(dir / "t.safetensors", ReadMode::mmap);
    REQUIRE(a.matrix<double>("x") == m);
    REQUIRE(b.matrix<double>("x") == m);
    REQUIRE(a.matrix<float>("y") == b.matrix<float>("y"));
    File c = File::open(dir / "t.safetensors", ReadMode::mmap);
    const File moved = std::move(c);  // the mapping moves with the object
    REQUIRE(moved.matrix<double>("x") == m);
    REQUIRE_THROWS_WITH(File::open(dir / "missing.safetensors"), Contains("missing.safetensors") && Contains("not a regular file"));
    REQUIRE_THROWS_WITH(File::open(dir / "missing.safetensors", ReadMode::mmap), Contains("cannot open"));
    REQUIRE_THROWS_WITH(File::open(dir), Contains("not a regular file"));
    std::filesystem::remove_all(dir);
}

TEST_CASE("the real PEFT files match the tensor list, sums and layout computed by numpy",
          "[safetensors][fixtures]") {
    for (const auto& name : test::peft_fixture_names()) {
        const auto dir = test::peft_fixture(name);
        if (!dir) {
            WARN("fixture " << name << " not found (no ../shared/fixtures beside this clone): skipped");
            continue;
        }
        INFO("fixture " << name);
        const auto expected = test::read_json(*dir / "EXPECTED.json");
        const File f = File::open(*dir / "adapter_model.safetensors", ReadMode::mmap);
        REQUIRE(f.tensors().size() == expected["tensor_count"].get<std::size_t>());
        REQUIRE(f.header_length() == expected["files"]["header_length"].get<std::uint64_t>());
        for (const auto& [k, v] : expected["files"]["metadata"].items()) REQUIRE(f.metadata().at(k) == v.get<std::string>());
        for (const auto& t : expected["tensors"]) {
            const auto tname = t["name"].get<std::string>();
            INFO(tname);
            const TensorInfo& info = f.info(tname);
            REQUIRE(dtype_name(info.dtype) == t["dtype"].get<std::string>());
            REQUIRE(info.shape == t["shape"].get<std::vector<std::uint64_t>>());
            REQUIRE(info.begin == t["data_offsets"][0].get<std::uint64_t>());
            REQUIRE(info.end == t["data_offsets"][1].get<std::uint64_t>());
            // The stored values are exact in double; only the summation rounds: |error| ≤ n·u·Σ|x|.
            const auto values = f.values<double>(tname);
            double sum = 0, sum_abs = 0;
            for (double x : values) {
                sum += x;
                sum_abs += std::abs(x);
            }
            const double bound = 2.0 * double(values.size()) * test::eps<double>() * t["sum_abs"].get<double>();
            REQUIRE(std::abs(sum - t["sum"].get<double>()) <= bound);
            REQUIRE(std::abs(sum_abs - t["sum_abs"].get<double>()) <= bound);
        }
    }
}

TEST_CASE("malformed files raise lowrank::error naming the problem", "[safetensors][errors]") {
    const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})";
    SECTION("a valid file for reference") {
        const File f = parse(st_bytes("{" + ok_entry + "}", 24));
        REQUIRE(f.info("t").numel == 6);
    }
    SECTION("truncated before the header length") {
        REQUIRE_THROWS_WITH(parse(std::vector<std::byte>(5)), Contains("truncated") && Contains("5 bytes"));
        REQUIRE_THROWS_AS(parse({}), lowrank::error);
    }
    SECTION("truncated data") {
        REQUIRE_THROWS_WITH(parse(st_bytes("{" + ok_entry + "}", 20)),
                            Contains("'t'") && Contains("past the end of the data buffer (20 bytes)"));
    }
    SECTION("header length past the end of the file") {
        REQUIRE_THROWS_WITH(parse(st_bytes("{" + ok_entry + "}", 0, 5000)),
                            Contains("header length 5000 runs past the end of the file"));
        REQUIRE_THROWS_WITH(parse(st_bytes("{}", 0, std::uint64_t(-1))), Contains("exceeds the limit"));
    }
    SECTION("header not JSON / not an object / not starting with '{'") {
        REQUIRE_THROWS_WITH(parse(st_bytes("{\"t\": [1, 2", 0)), Contains("malformed JSON"));
        REQUIRE_THROWS_WITH(parse(st_bytes(" {}", 0)), Contains("does not start with '{'"));
        REQUIRE_THROWS_WITH(parse(st_bytes("[]", 0)), Contains("does not start with '{'"));
        REQUIRE_THROWS_WITH(parse(st_bytes("", 0)), Contains("does not start with '{'"));
        REQUIRE_THROWS_WITH(parse(st_bytes("{\"t\": \"\xff\"}", 0)), Contains("malformed JSON"));
        REQUIRE_THROWS_WITH(parse(st_bytes("{}garbage", 0)), Contains("malformed JSON"));
    }
    SECTION("overlapping offsets") {
        REQUIRE_THROWS_WITH(
            parse(st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                           R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})", 24)),
            Contains("'b' at [8, 24) overlaps tensor 'a' at [0, 16)"));
    }
    SECTION("gaps between spans, or before the first") {
        REQUIRE_THROWS_WITH(
            parse(st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", 20)),
            Contains("gap in the data buffer: bytes [8, 12)"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)),
                            Contains("gap") && Contains("[0, 4)"));
    }
    SECTION("file longer than its tensors") {
        REQUIRE_THROWS_WITH(parse(st_bytes("{" + ok_entry + "}", 25)),
                            Contains("25 data bytes") && Contains("cover 24") && Contains("must be exactly"));
        REQUIRE_THROWS_WITH(parse(st_bytes("{}", 1)), Contains("1 data bytes"));
    }
    SECTION("shape x dtype size differs from the span") {
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F16","shape":[2,3],"data_offsets":[0,24]}})", 24)),
                            Contains("'t' (F16, 6 elements = 12 bytes)") && Contains("spanning 24 bytes"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[24,0]}})", 24)),
                            Contains("begin > end"));
    }
    SECTION("unknown dtype") {
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F12","shape":[1],"data_offsets":[0,2]}})", 2)),
                            Contains("unknown dtype 'F12'"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":7,"shape":[1],"data_offsets":[0,2]}})", 2)),
                            Contains("no string 'dtype'"));
    }
    SECTION("metadata that is not string to string") {
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"__metadata__":{"format":1}})", 0)),
                            Contains("__metadata__ value of 'format' must be a string, got number"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"__metadata__":["pt"]})", 0)), Contains("__metadata__ must be an object"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"__metadata__":{"a":{"b":"c"}}})", 0)), Contains("must be a string"));
    }
    SECTION("duplicate names (and duplicate fields)") {
        REQUIRE_THROWS_WITH(parse(st_bytes("{" + ok_entry + "," + ok_entry + "}", 24)), Contains("duplicate key 't'"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","dtype":"F16","shape":[],"data_offsets":[0,4]}})", 4)),
                            Contains("duplicate key 'dtype'"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"__metadata__":{},"__metadata__":{}})", 0)), Contains("duplicate key"));
    }
    SECTION("huge shapes whose product overflows") {
        REQUIRE_THROWS_WITH(
            parse(st_bytes(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4)),
            Contains("product of its shape overflows 64 bits"));
        REQUIRE_THROWS_WITH(
            parse(st_bytes(R"({"t":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8)),
            Contains("overflows 64 bits"));
        REQUIRE_THROWS_WITH(
            parse(st_bytes(R"({"t":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,1]}})", 1)),
            Contains("larger than lowrank::Index"));
        REQUIRE_THROWS_WITH(
            parse(st_bytes(R"({"t":{"dtype":"U8","shape":[2,3],"data_offsets":[0,18446744073709551615]}})", 6)),
            Contains("spanning"));
    }
    SECTION("malformed shapes and offsets") {
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", 0)),
                            Contains("not a non-negative integer: -1"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[1.5],"data_offsets":[0,0]}})", 0)),
                            Contains("not a non-negative integer"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}})", 4)),
                            Contains("nested deeper"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4)),
                            Contains("needs 'data_offsets'"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[1]}})", 4)), Contains("needs 'data_offsets'"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", 4)),
                            Contains("no array 'shape'"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":0}})", 4)),
                            Contains("unknown field 'x'"));
        REQUIRE_THROWS_WITH(parse(st_bytes(R"({"t":[]})", 0)), Contains("'t' must be an object"));
        std::string many = R"({"t":{"dtype":"F32","shape":[)";
        for (int i = 0; i < 2000; ++i) many += "1,";
        many += R"(1],"data_offsets":[0,4]}})";
        REQUIRE_THROWS_WITH(parse(st_bytes(many, 4)), Contains("more than 1024 elements"));
    }
    SECTION("zero-size tensors are valid anywhere in the tiling") {
        const File f = parse(st_bytes(R"({"e":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]},)"
                                      R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4));
        REQUIRE(f.matrix<float>("e").rows() == 0);
        REQUIRE(f.matrix<float>("e").cols() == 5);
    }
    SECTION("reading: unknown names and dtypes that are not converted") {
        const File f = parse(st_bytes(R"({"i":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", 8));
        REQUIRE(f.raw("i").size() == 8);
        REQUIRE_THROWS_WITH(f.values<float>("i"), Contains("dtype I64") && Contains("not converted"));
        REQUIRE_THROWS_WITH(f.info("nope"), Contains("no tensor named 'nope'"));
    }
}

TEST_CASE("the writer refuses what it cannot write", "[safetensors][errors]") {
    Writer w;
    const Matrix<float> m = Matrix<float>::Ones(2, 2);
    w.add("a", m);
    REQUIRE_THROWS_WITH(w.add("a", m), Contains("Writer::add") && Contains("duplicate tensor name 'a'"));
    REQUIRE_THROWS_WITH(w.add("__metadata__", m), Contains("reserved"));
    REQUIRE_THROWS_WITH(w.add("b", m, Dtype::I64), Contains("cannot write dtype I64"));
    const std::vector<float> v(3);
    REQUIRE_THROWS_WITH(w.add_tensor<float>("c", {2, 2}, std::span<const float>(v)), Contains("3 values for a shape of 4"));
    const std::vector<std::byte> three(3);
    REQUIRE_THROWS_WITH(w.add_raw("r", Dtype::I16, {2}, three), Contains("add_raw") && Contains("3 bytes for 4"));
    w.add_raw("r", Dtype::I16, {}, std::span<const std::byte>(three).first(2));
    REQUIRE(File::parse(w.bytes()).raw("r").size() == 2);
    Writer bad;
    bad.add("\xff", m);
    REQUIRE_THROWS_WITH(bad.bytes(), Contains("cannot encode the header"));
}

TEST_CASE("fuzzing seeds and every input the fuzzers ever crashed on are read without a crash",
          "[safetensors][fuzz]") {
    auto inputs = test::files_under(test::source_root() / "fuzz" / "corpus" / "safetensors");
    const auto regressions = test::files_under(test::source_root() / "tests" / "data" / "fuzz_regressions" / "safetensors");
    inputs.insert(inputs.end(), regressions.begin(), regressions.end());
    if (inputs.empty()) WARN("no fuzz corpus found");
    int valid = 0, rejected = 0;
    for (const auto& path : inputs) {
        INFO(path.string());
        const auto bytes = test::read_bytes(path);
        try {
            const File f = File::parse(bytes);
            for (const auto& t : f.tensors())
                if (is_convertible(t.dtype)) (void)f.values<double>(t.name);
            ++valid;
        } catch (const lowrank::error& e) {
            REQUIRE(std::string(e.what()).size() > 0);
            ++rejected;
        }
    }
    INFO(valid << " valid, " << rejected << " rejected");
    SUCCEED();
}
