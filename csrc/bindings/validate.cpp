// Checks of the forward's arguments (see validate.h), in the order a user would fix them:
// rank, dtype, device, sizes, strides, then the output buffers.
#include "bindings/validate.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace fusedattn {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxSeqlen = std::numeric_limits<int32_t>::max();

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

void check_rank(const TensorView& view, int64_t rank, const char* dims) {
  if (view.ndim() != rank) {
    fail(view.name + " must be " + std::to_string(rank) + "-D " + dims + ", got shape " + view.shape_string());
  }
}

void check_cpu(const TensorView& view, const TensorView& reference) {
  const int32_t type = view.device.device_type;
  if (type != dlpack::kCPU && type != dlpack::kCUDAHost) {
    fail(view.name + " is on " + view.device_string() + "; the CPU kernels need CPU arrays" +
         (view.name == reference.name ? "" : " (" + reference.name + " is on " + reference.device_string() + ")"));
  }
}

void check_same_dtype(const TensorView& view, const TensorView& reference) {
  if (kernel_dtype(view) != kernel_dtype(reference)) {
    throw py::type_error(view.name + " has dtype " + view.dtype_string() + " but " + reference.name +
                         " has " + reference.dtype_string() + "; they must match");
  }
}

void check_size(const TensorView& view, int64_t dim, int64_t expected, const char* what,
                const TensorView& reference) {
  if (view.shape[dim] != expected) {
    fail(view.name + " has " + what + " " + std::to_string(view.shape[dim]) + " (shape " + view.shape_string() +
         ") but " + reference.name + " has " + std::to_string(expected) + " (shape " + reference.shape_string() + ")");
  }
}

void check_last_dim_contiguous(const TensorView& view) {
  int64_t elements = 1;
  for (const int64_t size : view.shape) elements *= size;
  if (elements > 0 && view.shape.back() > 1 && view.strides.back() != 1) {
    fail(view.name + " must be contiguous in its last dim (stride 1), got strides (" +
         std::to_string(view.strides[0]) + ", " + std::to_string(view.strides[1]) + ", " +
         std::to_string(view.strides[2]) + ", " + std::to_string(view.strides[3]) + ")");
  }
}

TensorRef tensor_ref(const TensorView& view) {
  return TensorRef{view.data, view.strides[0], view.strides[1], view.strides[2]};
}

// `view` must be a writable (or, for inputs, readable) array shaped, typed and placed like `like`.
void check_like(const TensorView& view, const TensorView& like, bool writable) {
  check_rank(view, like.ndim(), "(batch, heads, seqlen, head_dim)");
  check_same_dtype(view, like);
  check_cpu(view, like);
  for (int64_t d = 0; d < like.ndim(); ++d) {
    if (view.shape[d] != like.shape[d]) {
      fail(view.name + " must have the shape of " + like.name + " " + like.shape_string() + ", got " +
           view.shape_string());
    }
  }
  check_last_dim_contiguous(view);
  if (writable && view.read_only) fail(view.name + " is read-only");
}

}  // namespace

BackwardParams make_backward_params(const BackwardViews& views, const ForwardOptions& options) {
  if (!views.forward.lse) fail("the backward needs the forward's lse");
  BackwardParams params;
  params.forward = make_forward_params(views.forward, options);
  check_like(views.dout, views.forward.out, false);
  check_like(views.dq, views.forward.q, true);
  check_like(views.dk, views.forward.k, true);
  check_like(views.dv, views.forward.v, true);
  params.dout = tensor_ref(views.dout);
  params.dq = tensor_ref(views.dq);
  params.dk = tensor_ref(views.dk);
  params.dv = tensor_ref(views.dv);
  if (views.dlse) {
    const TensorView& dlse = *views.dlse;
    const TensorView& lse = *views.forward.lse;
    check_rank(dlse, 3, "(batch, heads, seqlen_q)");
    if (dlse.dtype.code != dlpack::kFloat || dlse.dtype.bits != 32 || dlse.dtype.lanes != 1) {
      throw py::type_error(dlse.name + " must be float32, got " + dlse.dtype_string());
    }
    check_cpu(dlse, lse);
    for (int64_t d = 0; d < 3; ++d) {
      if (dlse.shape[d] != lse.shape[d]) fail(dlse.name + " must have the shape of lse " + lse.shape_string());
    }
    const bool contiguous = dlse.strides[2] == 1 && dlse.strides[1] == dlse.shape[2] &&
                            dlse.strides[0] == dlse.shape[1] * dlse.shape[2];
    if (!contiguous && dlse.shape[0] * dlse.shape[1] * dlse.shape[2] > 1) fail(dlse.name + " must be contiguous");
    params.dlse = static_cast<const float*>(dlse.data);
  }
  return params;
}

AttentionParams make_forward_params(const ForwardViews& views, const ForwardOptions& options) {
  const TensorView& q = views.q;
  const TensorView& k = views.k;
  const TensorView& v = views.v;
  const TensorView& out = views.out;
  const char* dims = "(batch, heads, seqlen, head_dim)";
  for (const TensorView* view : {&q, &k, &v, &out}) check_rank(*view, 4, dims);
  kernel_dtype(q);
  for (const TensorView* view : {&k, &v, &out}) check_same_dtype(*view, q);
  for (const TensorView* view : {&q, &k, &v, &out}) check_cpu(*view, q);

  check_size(k, 0, q.shape[0], "batch size", q);
  check_size(v, 0, q.shape[0], "batch size", q);
  check_size(k, 3, q.shape[3], "head_dim", q);
  check_size(v, 3, q.shape[3], "head_dim", q);
  check_size(v, 1, k.shape[1], "num_heads", k);
  check_size(v, 2, k.shape[2], "seqlen", k);
  const int64_t head_dim = q.shape[3];
  if (head_dim < 1 || head_dim > kMaxHeadDim) {
    fail(q.name + " has head_dim " + std::to_string(head_dim) + "; supported: 1.." + std::to_string(kMaxHeadDim));
  }
  const int64_t num_heads = q.shape[1];
  const int64_t num_heads_kv = k.shape[1];
  if (num_heads_kv == 0 ? num_heads != 0 : num_heads % num_heads_kv != 0) {
    fail(q.name + " has " + std::to_string(num_heads) + " heads, which is not a multiple of the " +
         std::to_string(num_heads_kv) + " heads of " + k.name + " (GQA needs num_heads % num_heads_kv == 0)");
  }
  if (q.shape[2] > kMaxSeqlen || k.shape[2] > kMaxSeqlen) {
    fail("sequence lengths above " + std::to_string(kMaxSeqlen) + " are not supported");
  }
  for (const TensorView* view : {&q, &k, &v, &out}) check_last_dim_contiguous(*view);

  for (int64_t d = 0; d < 4; ++d) {
    if (out.shape[d] != q.shape[d]) {
      fail(out.name + " must have the shape of " + q.name + " " + q.shape_string() + ", got " + out.shape_string());
    }
  }
  if (out.read_only) fail(out.name + " is read-only");

  AttentionParams params;
  params.dtype = kernel_dtype(q);
  params.q = tensor_ref(q);
  params.k = tensor_ref(k);
  params.v = tensor_ref(v);
  params.out = tensor_ref(out);
  params.batch = q.shape[0];
  params.num_heads = num_heads;
  params.num_heads_kv = num_heads_kv;
  params.seqlen_q = q.shape[2];
  params.seqlen_k = k.shape[2];
  params.head_dim = head_dim;

  if (views.lse) {
    const TensorView& lse = *views.lse;
    check_rank(lse, 3, "(batch, heads, seqlen_q)");
    if (lse.dtype.code != dlpack::kFloat || lse.dtype.bits != 32 || lse.dtype.lanes != 1) {
      throw py::type_error(lse.name + " must be float32, got " + lse.dtype_string());
    }
    check_cpu(lse, q);
    for (int64_t d = 0; d < 3; ++d) {
      if (lse.shape[d] != q.shape[d]) {
        fail(lse.name + " must have shape (" + std::to_string(q.shape[0]) + ", " + std::to_string(q.shape[1]) +
             ", " + std::to_string(q.shape[2]) + "), got " + lse.shape_string());
      }
    }
    const bool contiguous = lse.strides[2] == 1 && lse.strides[1] == lse.shape[2] &&
                            lse.strides[0] == lse.shape[1] * lse.shape[2];
    if (!contiguous && params.seqlen_q > 0 && num_heads > 0) fail(lse.name + " must be contiguous");
    if (lse.read_only) fail(lse.name + " is read-only");
    params.lse = static_cast<float*>(lse.data);
  }

  if (!std::isfinite(options.scale)) fail("scale must be finite, got " + std::to_string(options.scale));
  if (options.window_left < -1 || options.window_right < -1) {
    fail("window_size must be (left, right) with each >= 0 or -1 (unbounded), got (" +
         std::to_string(options.window_left) + ", " + std::to_string(options.window_right) + ")");
  }
  params.scale = options.scale;
  params.causal = options.causal;
  params.q_offset = options.q_offset;
  params.window_left = options.window_left;
  params.window_right = options.window_right;
  return params;
}

}  // namespace fusedattn
