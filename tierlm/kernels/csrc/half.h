// IEEE half <-> float32, bit-exact and ISA-free (the GGUF blocks' scales, the int8 KV
// cache's quantization parameters).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Round to nearest even, as torch's float32 -> float16 conversion. |f| must be <= 65504
// (callers clamp) and finite.
inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffff;
    if (x >= 0x38800000) {  // a normal half (exponent >= -14): rebias, round 23 -> 10 mantissa bits
        uint32_t r = x - (112u << 23);
        r = r + 0xfff + ((r >> 13) & 1);  // a carry out of the mantissa bumps the exponent: still right
        return sign | (uint16_t)(r >> 13);
    }
    float a;  // a subnormal half (or 0): |f| * 2^24 is exact, and rounds to the nearest even integer
    std::memcpy(&a, &x, 4);
    return sign | (uint16_t)std::nearbyint(a * 16777216.0f);
}

}  // namespace
