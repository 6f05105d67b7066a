// How the kernels are bound to Python: each call releases the GIL while it computes, so
// the server's event loop (HTTP parsing, SSE writes) runs during a step instead of
// making the engine thread wait for the GIL between kernel calls. Arguments are
// converted before the release and results after it; the pool serialises callers.
#pragma once

#include <torch/extension.h>

namespace tierlm {
inline const pybind11::call_guard<pybind11::gil_scoped_release> kNoGil{};
}  // namespace tierlm
