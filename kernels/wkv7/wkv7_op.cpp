// Torch operator registration for the RWKV-7 WKV CUDA kernels (rwkv_peft). The kernels live in wkv7.cu;
// this file checks the arguments, allocates the outputs and calls the launchers on the current stream.
//
//   torch.ops.rwkv_peft_wkv7.forward(r, w, k, v, a, b, s0, save) -> (y, sT, sa, ckpt)
//   torch.ops.rwkv_peft_wkv7.backward(r, w, k, v, a, b, dy, dsT, sa, ckpt, split) -> (dr, dw, dk, dv, da, db, ds0)
//   (split: how many blocks share a head's columns in the parameter kernel; 0 = chosen from the device's shared
//   memory, 1 or 4 = forced, for tests)
//
// r..b, y, dy, dr..db: [B, T, H, N], one dtype (float32 or bfloat16), contiguous, 16-byte aligned.
// s0: None, [B, H, N, N] or [H, N, N] (shared by the batch), float32. sT, ds0: [B, H, N, N] float32
// (ds0 per batch element; the caller sums it for a shared state). dsT: None or [B, H, N, N] float32.
// sa: [B, T, H, N] float32 and ckpt: [B, H, ceil(T/16), N, N] float32 are what the backward needs; they are
// empty when save is false.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace rwkv_peft_wkv7 {

constexpr int64_t kCheckpointInterval = 16;  // CK in wkv7.cu

cudaError_t wkv7_forward_launch(int dtype, int B, int Tlen, int H, int N, const void* r, const void* w,
                                const void* k, const void* v, const void* a, const void* b, const float* s0,
                                int64_t s0_bstride, void* y, float* sT, float* sa, float* ckpt,
                                cudaStream_t stream);
cudaError_t wkv7_backward_launch(int dtype, int B, int Tlen, int H, int N, const void* r, const void* w,
                                 const void* k, const void* v, const void* a, const void* b, const void* dy,
                                 const float* dsT, const float* sa, const float* ckpt, float* dsa, void* dr,
                                 void* dw, void* dk, void* dv, void* da, void* db, float* ds0, int split,
                                 cudaStream_t stream);

namespace {

// The current CUDA stream of `device`, through the device-generic interface (keeps this file free of
// c10/cuda headers, so it also compiles against a CPU build of torch as a syntax check).
cudaStream_t current_stream(const c10::Device& device) {
    const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
    return static_cast<cudaStream_t>(stream.native_handle());
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_seq(const at::Tensor& x, const char* name, const at::Tensor& ref) {
    TORCH_CHECK(x.is_cuda(), "wkv7: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.device() == ref.device(), "wkv7: ", name, " is on ", x.device(), " but r is on ", ref.device());
    TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "wkv7: ", name, " has dtype ", x.scalar_type(),
                " but r has ", ref.scalar_type());
    TORCH_CHECK(x.sizes() == ref.sizes(), "wkv7: ", name, " has shape ", x.sizes(), " but r has ", ref.sizes());
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
    TORCH_CHECK(aligned16(x), "wkv7: ", name, " must be 16-byte aligned");
}

void check_state(const at::Tensor& s, const char* name, const at::Tensor& ref, int64_t B, int64_t H, int64_t N,
                 bool allow_shared) {
    TORCH_CHECK(s.is_cuda() && s.device() == ref.device(), "wkv7: ", name, " must be on ", ref.device());
    TORCH_CHECK(s.scalar_type() == at::kFloat, "wkv7: ", name, " must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.is_contiguous() && aligned16(s), "wkv7: ", name, " must be contiguous and 16-byte aligned");
    const bool full = s.dim() == 4 && s.size(0) == B && s.size(1) == H && s.size(2) == N && s.size(3) == N;
    const bool shared = allow_shared && s.dim() == 3 && s.size(0) == H && s.size(1) == N && s.size(2) == N;
    TORCH_CHECK(full || shared, "wkv7: ", name, " has shape ", s.sizes(), "; expected [", B, ", ", H, ", ", N, ", ",
                N, "]", allow_shared ? " or [H, N, N]" : "");
}

int dtype_code(const at::Tensor& r) {
    if (r.scalar_type() == at::kFloat) return 0;
    if (r.scalar_type() == at::kBFloat16) return 1;
    TORCH_CHECK(false, "wkv7: inputs must be float32 or bfloat16, got ", r.scalar_type());
    return -1;
}

void check_sizes(const at::Tensor& r) {
    TORCH_CHECK(r.dim() == 4, "wkv7: r must be [B, T, H, N], got shape ", r.sizes());
    const int64_t N = r.size(3);
    TORCH_CHECK(N == 64 || N == 32, "wkv7: head size ", N, " is not compiled (64 and 32 are)");
    TORCH_CHECK(r.size(0) >= 1 && r.size(1) >= 1 && r.size(2) >= 1, "wkv7: empty input ", r.sizes());
    TORCH_CHECK(r.size(0) * r.size(2) * (N / 32) < (int64_t(1) << 31), "wkv7: B*H too large for one grid");
    TORCH_CHECK(r.size(1) < (int64_t(1) << 31), "wkv7: T too large");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
    const at::Tensor& b, const std::optional<at::Tensor>& s0, bool save) {
    check_sizes(r);
    check_seq(r, "r", r);
    check_seq(w, "w", r);
    check_seq(k, "k", r);
    check_seq(v, "v", r);
    check_seq(a, "a", r);
    check_seq(b, "b", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int dt = dtype_code(r);
    const float* s0p = nullptr;
    int64_t s0_bstride = 0;
    if (s0.has_value() && s0->defined()) {
        check_state(*s0, "initial state", r, B, H, N, /*allow_shared=*/true);
        s0p = s0->data_ptr<float>();
        s0_bstride = s0->dim() == 4 ? H * N * N : 0;
    }
    const c10::DeviceGuard guard(r.device());
    const auto fopts = r.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(r);
    at::Tensor sT = at::empty({B, H, N, N}, fopts);
    const int64_t nC = (T + kCheckpointInterval - 1) / kCheckpointInterval;
    at::Tensor sa = save ? at::empty({B, T, H, N}, fopts) : at::empty({0}, fopts);
    at::Tensor ckpt = save ? at::empty({B, H, nC, N, N}, fopts) : at::empty({0}, fopts);
    const cudaError_t err = wkv7_forward_launch(
        dt, static_cast<int>(B), static_cast<int>(T), static_cast<int>(H), static_cast<int>(N), r.data_ptr(),
        w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), s0p, s0_bstride, y.data_ptr(),
        sT.data_ptr<float>(), save ? sa.data_ptr<float>() : nullptr, save ? ckpt.data_ptr<float>() : nullptr,
        current_stream(r.device()));
    TORCH_CHECK(err == cudaSuccess, "wkv7 forward kernel launch failed: ", cudaGetErrorString(err));
    return {y, sT, sa, ckpt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& dy, const std::optional<at::Tensor>& dsT, const at::Tensor& sa,
    const at::Tensor& ckpt, int64_t split) {
    TORCH_CHECK(split == 0 || split == 1 || split == 4, "wkv7 backward: split must be 0 (by the device), 1 or 4");
    check_sizes(r);
    check_seq(r, "r", r);
    check_seq(w, "w", r);
    check_seq(k, "k", r);
    check_seq(v, "v", r);
    check_seq(a, "a", r);
    check_seq(b, "b", r);
    check_seq(dy, "dy (gradient of the output)", r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int dt = dtype_code(r);
    const int64_t nC = (T + kCheckpointInterval - 1) / kCheckpointInterval;
    TORCH_CHECK(sa.is_cuda() && sa.scalar_type() == at::kFloat && sa.is_contiguous() && aligned16(sa) &&
                    sa.sizes() == r.sizes(),
                "wkv7 backward: sa must be the float32 [B, T, H, N] tensor saved by the forward (save=True)");
    TORCH_CHECK(ckpt.is_cuda() && ckpt.scalar_type() == at::kFloat && ckpt.is_contiguous() && aligned16(ckpt) &&
                    ckpt.dim() == 5 && ckpt.size(0) == B && ckpt.size(1) == H && ckpt.size(2) == nC &&
                    ckpt.size(3) == N && ckpt.size(4) == N,
                "wkv7 backward: ckpt must be the float32 [B, H, ceil(T/16), N, N] tensor saved by the forward");
    const float* dsTp = nullptr;
    if (dsT.has_value() && dsT->defined()) {
        check_state(*dsT, "final-state gradient", r, B, H, N, /*allow_shared=*/false);
        dsTp = dsT->data_ptr<float>();
    }
    const c10::DeviceGuard guard(r.device());
    const auto fopts = r.options().dtype(at::kFloat);
    at::Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r);
    at::Tensor da = at::empty_like(r), db = at::empty_like(r);
    at::Tensor dsa = at::empty({B, T, H, N}, fopts);
    at::Tensor ds0 = at::empty({B, H, N, N}, fopts);
    const cudaError_t err = wkv7_backward_launch(
        dt, static_cast<int>(B), static_cast<int>(T), static_cast<int>(H), static_cast<int>(N), r.data_ptr(),
        w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), dy.data_ptr(), dsTp,
        sa.data_ptr<float>(), ckpt.data_ptr<float>(), dsa.data_ptr<float>(), dr.data_ptr(), dw.data_ptr(),
        dk.data_ptr(), dv.data_ptr(), da.data_ptr(), db.data_ptr(), ds0.data_ptr<float>(), static_cast<int>(split),
        current_stream(r.device()));
    TORCH_CHECK(err == cudaSuccess, "wkv7 backward kernel launch failed: ", cudaGetErrorString(err));
    return {dr, dw, dk, dv, da, db, ds0};
}

}  // namespace rwkv_peft_wkv7

TORCH_LIBRARY(rwkv_peft_wkv7, m) {
    m.def("forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? s0, bool save)"
          " -> (Tensor, Tensor, Tensor, Tensor)");
    m.def("backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor dy, Tensor? dsT,"
          " Tensor sa, Tensor ckpt, int split=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rwkv_peft_wkv7, CUDA, m) {
    m.impl("forward", &rwkv_peft_wkv7::forward);
    m.impl("backward", &rwkv_peft_wkv7::backward);
}
