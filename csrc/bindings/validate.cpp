// Checks of the forward's arguments (see validate.h), in the order a user would fix them:
// rank, dtype, device, sizes, strides, then the output buffers.
#include "bindings/validate.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

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

MaskType mask_type(const TensorView& view) {
  if (view.dtype.lanes == 1) {
    if (view.dtype.code == dlpack::kBool) return MaskType::kBool;
    if (view.dtype.code == dlpack::kFloat && view.dtype.bits == 32) return MaskType::kFloat32;
    if (view.dtype.code == dlpack::kFloat && view.dtype.bits == 64) return MaskType::kFloat64;
    if (view.dtype.code == dlpack::kFloat && view.dtype.bits == 16) return MaskType::kFloat16;
    if (view.dtype.code == dlpack::kBfloat && view.dtype.bits == 16) return MaskType::kBFloat16;
  }
  throw py::type_error(view.name + " must be bool or floating point, got " + view.dtype_string());
}

void check_float64_vector(const TensorView& view, const std::vector<std::vector<int64_t>>& shapes,
                          const std::string& expected) {
  if (view.dtype.code != dlpack::kFloat || view.dtype.bits != 64 || view.dtype.lanes != 1) {
    throw py::type_error(view.name + " must be float64 (the Python layer converts it), got " + view.dtype_string());
  }
  bool matches = false;
  for (const auto& shape : shapes) matches |= view.shape == shape;
  if (!matches) fail(view.name + " must have shape " + expected + ", got " + view.shape_string());
  if (!view.is_contiguous()) fail(view.name + " must be contiguous");
}

void fill_variant(const ForwardViews& views, AttentionParams& params) {
  const TensorView& q = views.q;
  const std::string dims = "(" + std::to_string(params.batch) + ", " + std::to_string(params.num_heads) + ", " +
                           std::to_string(params.seqlen_q) + ", " + std::to_string(params.seqlen_k) + ")";
  if (views.mask) {
    const TensorView& mask = *views.mask;
    check_cpu(mask, q);
    params.mask.type = mask_type(mask);
    const std::vector<int64_t> expected{params.batch, params.num_heads, params.seqlen_q, params.seqlen_k};
    if (mask.shape != expected) fail(mask.name + " must broadcast to " + dims + ", got " + mask.shape_string());
    params.mask.data = mask.data;
    params.mask.batch_stride = mask.strides[0];
    params.mask.head_stride = mask.strides[1];
    params.mask.row_stride = mask.strides[2];
    params.mask.col_stride = mask.strides[3];
  }
  if (views.alibi_slopes) {
    const TensorView& slopes = *views.alibi_slopes;
    check_cpu(slopes, q);
    const std::string heads = std::to_string(params.num_heads);
    const int64_t batch = views.sequence_count >= 0 ? views.sequence_count : params.batch;
    check_float64_vector(slopes, {{params.num_heads}, {batch, params.num_heads}},
                         "(" + heads + ",) or (" + std::to_string(batch) + ", " + heads + ")");
    params.alibi_slopes = static_cast<const double*>(slopes.data);
    params.alibi_batch_stride = slopes.ndim() == 2 ? params.num_heads : 0;
  }
  if (views.sinks) {
    const TensorView& sinks = *views.sinks;
    check_cpu(sinks, q);
    check_float64_vector(sinks, {{params.num_heads}}, "(" + std::to_string(params.num_heads) + ",)");
    params.sinks = static_cast<const double*>(sinks.data);
    // A sink starts its row's running max: above the compute type's range (+inf, or a float64
    // logit past 3.4e38 for float32 compute) the online softmax subtracted inf from inf (NaN).
    const double largest = params.dtype == DType::kFloat64 ? std::numeric_limits<double>::max()
                                                           : static_cast<double>(std::numeric_limits<float>::max());
    for (int64_t h = 0; h < params.num_heads; ++h) {
      if (params.sinks[h] > largest) {
        fail("sinks[" + std::to_string(h) + "] = " + std::to_string(params.sinks[h]) +
             " is beyond the compute type's range: a sink must be a finite logit or -inf");
      }
    }
  }
}

}  // namespace

ForwardOptions parse_variant(const py::tuple& variant, ForwardViews& views) {
  if (variant.size() != 12) fail("variant must have 12 entries, got " + std::to_string(variant.size()));
  ForwardOptions options;
  options.scale = variant[0].cast<double>();
  options.causal = variant[1].cast<bool>();
  options.q_offset = variant[2].cast<int64_t>();
  options.window_left = variant[3].cast<int64_t>();
  options.window_right = variant[4].cast<int64_t>();
  options.softcap = variant[5].cast<double>();
  if (!variant[6].is_none()) views.mask = view_array(variant[6], "attn_mask");
  if (!variant[7].is_none()) views.alibi_slopes = view_array(variant[7], "alibi_slopes");
  if (!variant[8].is_none()) views.sinks = view_array(variant[8], "sinks");
  options.dropout_p = variant[9].cast<double>();
  options.seed = variant[10].cast<uint64_t>();
  options.offset = variant[11].cast<uint64_t>();
  return options;
}

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
    if (dlse.dtype.code != lse.dtype.code || dlse.dtype.bits != lse.dtype.bits || dlse.dtype.lanes != 1) {
      throw py::type_error(dlse.name + " must have lse's dtype " + lse.dtype_string() + ", got " + dlse.dtype_string());
    }
    check_cpu(dlse, lse);
    for (int64_t d = 0; d < 3; ++d) {
      if (dlse.shape[d] != lse.shape[d]) fail(dlse.name + " must have the shape of lse " + lse.shape_string());
    }
    if (!dlse.is_contiguous()) fail(dlse.name + " must be contiguous");
    if (dlse.dtype.bits == 64) {
      params.dlse_f64 = static_cast<const double*>(dlse.data);
    } else {
      params.dlse = static_cast<const float*>(dlse.data);
    }
  }
  if (views.dmask) {
    const TensorView& dmask = *views.dmask;
    const AttentionParams& f = params.forward;
    const int bits = f.dtype == DType::kFloat64 ? 64 : 32;
    if (dmask.dtype.code != dlpack::kFloat || dmask.dtype.bits != bits || dmask.dtype.lanes != 1) {
      throw py::type_error(dmask.name + " must be float" + std::to_string(bits) + ", got " + dmask.dtype_string());
    }
    const std::vector<int64_t> expected{f.batch, f.num_heads, f.seqlen_q, f.seqlen_k};
    if (dmask.shape != expected) fail(dmask.name + " must have shape (batch, heads, seqlen_q, seqlen_k)");
    if (!dmask.is_contiguous()) fail(dmask.name + " must be contiguous");
    if (f.mask.type == MaskType::kNone || f.mask.type == MaskType::kBool) {
      fail("dmask (the attn_mask gradient) needs a float attn_mask");
    }
    if (bits == 64) {
      params.dmask_f64 = static_cast<double*>(dmask.data);
    } else {
      params.dmask = static_cast<float*>(dmask.data);
    }
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

  if (!views.kv_is_cache) {
    check_size(k, 0, q.shape[0], "batch size", q);
    check_size(v, 0, q.shape[0], "batch size", q);
  } else {
    check_size(v, 0, k.shape[0], "cache rows", k);
  }
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
  if (out.read_only && !views.out_is_input) fail(out.name + " is read-only");

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
    // float32, or float64 for float64 inputs (fp64 gradients stay fp64-accurate)
    const bool fp64 = kernel_dtype(q) == DType::kFloat64;
    if (lse.dtype.code != dlpack::kFloat || lse.dtype.bits != (fp64 ? 64 : 32) || lse.dtype.lanes != 1) {
      throw py::type_error(lse.name + " must be " + (fp64 ? "float64 (as q)" : "float32") + ", got " +
                           lse.dtype_string());
    }
    check_cpu(lse, q);
    for (int64_t d = 0; d < 3; ++d) {
      if (lse.shape[d] != q.shape[d]) {
        fail(lse.name + " must have shape (" + std::to_string(q.shape[0]) + ", " + std::to_string(q.shape[1]) +
             ", " + std::to_string(q.shape[2]) + "), got " + lse.shape_string());
      }
    }
    if (!lse.is_contiguous()) fail(lse.name + " must be contiguous");
    if (lse.read_only && !views.out_is_input) fail(lse.name + " is read-only");
    if (fp64) {
      params.lse_f64 = static_cast<double*>(lse.data);
    } else {
      params.lse = static_cast<float*>(lse.data);
    }
    params.lse_batch_stride = lse.strides[0];
    params.lse_head_stride = lse.strides[1];
  }

  if (!std::isfinite(options.scale)) fail("scale must be finite, got " + std::to_string(options.scale));
  if (options.window_left < -1 || options.window_right < -1) {
    fail("window_size must be (left, right) with each >= 0 or -1 (unbounded), got (" +
         std::to_string(options.window_left) + ", " + std::to_string(options.window_right) + ")");
  }
  if (!(options.softcap >= 0.0) || !std::isfinite(options.softcap)) {
    fail("softcap must be >= 0 (0 = off), got " + std::to_string(options.softcap));
  }
  if (!(options.dropout_p >= 0.0 && options.dropout_p <= 1.0)) {
    fail("dropout_p must be in [0, 1], got " + std::to_string(options.dropout_p));
  }
  params.softcap = options.softcap;
  params.dropout_p = options.dropout_p;
  params.dropout_seed = options.seed;
  params.dropout_offset = options.offset;
  fill_variant(views, params);
  params.scale = options.scale;
  params.causal = options.causal;
  params.q_offset = options.q_offset;
  params.window_left = options.window_left;
  params.window_right = options.window_right;
  return params;
}

void check_page_size(int64_t page_size) {
  if (page_size < 1) fail("a paged cache's pages must hold at least one row (k_cache.shape[1] >= 1), got 0");
}

}  // namespace fusedattn
