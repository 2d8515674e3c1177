// ActSparseMatMul for ONNX Runtime: ai.actsparse::ActSparseMatMul as a custom-op library, a thin
// adapter over the kernel core (actsparse_core.hpp) with the OpenVINO op's semantics
// (openvino/actsparse_op.hpp). The library takes the API from ORT at registration and links no
// libonnxruntime, so one build serves every runtime at least as new as its headers. The OpenVINO op's
// int8_activations attribute is no node attribute here: it follows the session's config (session_quantises).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "actsparse_core.hpp"

namespace actsparse {
namespace {

constexpr const char* kDomain = "ai.actsparse";
constexpr const char* kOpType = "ActSparseMatMul";


// Runs a C++ callable on ORT's intra-op pool, which hands it plain function pointers. The first
// exception of any task is kept and rethrown on the calling thread: none may cross ORT's C frames.
struct Job {
  const std::function<void(int64_t)>* fn;
  std::mutex mutex;
  std::exception_ptr error;

  static void run(void* self, size_t task) {
    auto* job = static_cast<Job*>(self);
    try {
      (*job->fn)(int64_t(task));
    } catch (...) {
      std::lock_guard<std::mutex> lock(job->mutex);
      if (!job->error) job->error = std::current_exception();
    }
  }
};

#if ORT_API_VERSION >= 17  // KernelContext_ParallelFor appeared in 1.17
void parallel_for(const OrtKernelContext* ctx, size_t ntasks, Job& job) {
  // num_batch 0: every task is an item of ORT's own dynamic scheduling over its threads.
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, &Job::run, ntasks, 0, &job));
}

// ORT tells a custom op nothing about its pool, so measure it: hold every task until all have
// started or 2 ms have passed; the most tasks ever running at once is the pool's width (1 when
// the session has one intra-op thread: ORT then runs the tasks one after another on the caller).
int pool_width(const OrtKernelContext* ctx) {
  const int most = int(std::max(1u, std::thread::hardware_concurrency()));
  if (most == 1) return 1;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
  std::atomic<int> running{0}, peak{0};
  const std::function<void(int64_t)> hold = [&](int64_t) {
    const int now = ++running;
    for (int p = peak.load(); p < now && !peak.compare_exchange_weak(p, now);) {}
    while (peak.load() < most && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    --running;
  };
  Job job{&hold, {}, {}};
  parallel_for(ctx, size_t(most), job);
  return std::max(1, peak.load());
}
#endif

// The core's tasks on the session's intra-op pool (so intra_op_num_threads is respected and two
// pools never compete). Built per Compute call: it holds nothing shared between calls.
struct OrtExecutor final : Executor {
  const OrtKernelContext* ctx;
  int width;
  OrtExecutor(const OrtKernelContext* c, int w) : ctx(c), width(w) {}
  int concurrency() const override { return width; }
  void parallel(int64_t ntasks, const std::function<void(int64_t)>& fn) const override {
    Job job{&fn, {}, {}};
#if ORT_API_VERSION >= 17
    if (width > 1 && ntasks > 1) {
      parallel_for(ctx, size_t(ntasks), job);
    } else
#endif
      for (int64_t t = 0; t < ntasks; ++t) Job::run(&job, size_t(t));
    if (job.error) std::rethrow_exception(job.error);
  }
};

Element element(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? Element::F32 : t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 ? Element::BF16
       : t == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? Element::U8 : t == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED ? Element::Unknown
       : Element::Other;
}

size_t element_size(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return 2;
    default: return 1;
  }
}

// What a type and shape say of one input: its element type, and its bytes (-1 where a dimension is unknown).
template <class Info>
void describe_input(const Info& info, Element& type, int64_t& bytes) {
  type = element(info.GetElementType());
  bytes = int64_t(element_size(info.GetElementType()));
  for (const int64_t d : info.GetShape()) bytes = d < 0 ? -1 : bytes < 0 ? -1 : bytes * d;
}

// Attributes are bound when ORT creates the kernel for a node, with K and the initializers' sizes where
// the graph declares them; a call whose sizes differ from those is bound again before it reads a byte.
struct Kernel {
  bool int8_activations;  // the session's (see RegisterCustomOps)
  OpDesc desc;
  OpBinding binding;
  std::atomic<int> width{0};  // the pool's width, measured on the first call (0: not yet)
  std::once_flag pages;       // to_huge_pages on the weights, at the first call

  Kernel(const OrtKernelInfo* raw, bool int8) : int8_activations(int8) {
    Ort::ConstKernelInfo info(raw);
    desc.weight_format = info.GetAttribute<std::string>("weight_format");
    desc.out_features = info.GetAttribute<int64_t>("out_features");
    desc.group_size = info.GetAttribute<int64_t>("group_size");
    desc.mode = info.GetAttribute<float>("mode");
    desc.threshold = info.GetAttribute<float>("threshold");
    desc.prefill = info.GetAttribute<std::string>("prefill");
    desc.has_bias = info.GetAttribute<int64_t>("has_bias") != 0;
    try {
      desc.tile_cols = info.GetAttribute<int64_t>("tile_cols");
    } catch (const Ort::Exception&) {  // absent: a model that predates the attribute
    }
    OpDesc known = desc;
    try {  // the declared types and shapes, where ORT knows them
      const auto x = info.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo();
      const auto shape = x.GetShape();
      known.K = shape.empty() || shape.back() < 0 ? -1 : shape.back();
      describe_input(info.GetInputTypeInfo(1).GetTensorTypeAndShapeInfo(), known.weight_type, known.weight_bytes);
      describe_input(info.GetInputTypeInfo(2).GetTensorTypeAndShapeInfo(), known.params_type, known.params_bytes);
    } catch (const Ort::Exception&) {
      known = desc;
    }
    binding.set(bind_op(known));
  }

  void compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    const auto x = ctx.GetInput(0), weight = ctx.GetInput(1), params = ctx.GetInput(2);
    const auto x_info = x.GetTensorTypeAndShapeInfo();  // x and params: float32, as GetInputType declares
    std::vector<int64_t> shape = x_info.GetShape();
    const auto w_info = weight.GetTensorTypeAndShapeInfo(), p_info = params.GetTensorTypeAndShapeInfo();
    const int64_t K = shape.empty() ? 0 : shape.back();
    const int64_t w_bytes = int64_t(w_info.GetElementCount() * element_size(w_info.GetElementType()));
    const int64_t p_bytes = int64_t(p_info.GetElementCount() * element_size(p_info.GetElementType()));
    auto rebind = [&] {
      OpDesc d = desc;
      d.K = K;
      describe_input(w_info, d.weight_type, d.weight_bytes);
      describe_input(p_info, d.params_type, d.params_bytes);
      return bind_op(d);
    };
    const BoundOp bound = binding.get(K, w_bytes, p_bytes, rebind);
    const int64_t M = int64_t(x_info.GetElementCount()) / bound.K;

    shape.back() = bound.N;
    auto y = ctx.GetOutput(0, shape);
    if (M == 0) return;
    const void* p = params.GetTensorRawData();
    std::call_once(pages, [&] { to_huge_pages(weight.GetTensorRawData(), size_t(w_bytes)); });
    const PackedWeight w = bound.weight(weight.GetTensorRawData(), p);

    // One token per sequence is a decode step: always pruned. Longer inputs are prefill.
    const size_t rank = shape.size();
    Params prm;
    prm.mode = bound.mode;
    prm.threshold = bound.threshold;
    prm.mask = (rank < 2 ? M == 1 : shape[rank - 2] == 1) || bound.prune_prefill;
    prm.int8_activations = int8_activations;

    int conc = width.load();
#if ORT_API_VERSION >= 17
    if (conc == 0) {  // concurrent first calls may each measure: keep the largest
      const int measured = pool_width(raw);
      for (conc = width.load(); conc < measured && !width.compare_exchange_weak(conc, measured);) {}
      conc = std::max(conc, measured);
    }
#endif
    matmul(x.GetTensorData<float>(), M, w, bound.bias(p), prm, y.GetTensorMutableData<float>(),
           OrtExecutor(raw, std::max(conc, 1)));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    try {
      compute(ctx);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  bool int8_activations;

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info, int8_activations);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return kOpType; }
  size_t GetInputTypeCount() const { return 3; }
  // The weight is float32 or uint8 depending on weight_format: checked per call.
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  explicit Op(bool int8) : int8_activations(int8) { OrtCustomOp::InferOutputShapeFn = infer_shape; }

  // y has x's shape with the last dim replaced by out_features, so ORT plans the graph's shapes.
  // Written on the C API: the 1.21 C++ wrapper sends a named dim as -2, which ORT 1.32 rejects,
  // and a dim sent as an unnamed -1 comes back as a known -1 (two of them then break a later
  // Reshape's check). So every dynamic dim goes back as -1 with a name: x's, or a fresh one.
  static OrtStatusPtr infer_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
    const OrtApi& api = Ort::GetApi();
    try {
      const OrtOpAttr* attr = nullptr;
      int64_t n = 0;
      size_t size = 0;
      Ort::ThrowOnError(api.ShapeInferContext_GetAttribute(ctx, "out_features", &attr));
      Ort::ThrowOnError(api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &n, sizeof(n), &size));
      // Not wrapped in an owning Ort:: object: releasing it here frees it twice in ORT 1.32.
      OrtTensorTypeAndShapeInfo* raw = nullptr;
      Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(ctx, 0, &raw));
      Ort::ConstTensorTypeAndShapeInfo x(raw);
      auto dims = x.GetShape();
      // rank unknown here (a scalar x fails at run time), or out_features the kernel will refuse
      if (dims.empty() || n < 1) return nullptr;
      std::vector<const char*> names(dims.size(), nullptr);
      x.GetSymbolicDimensions(names.data(), names.size());
      static std::atomic<int64_t> unknown{0};
      std::vector<std::string> fresh(dims.size());
      for (size_t i = 0; i < dims.size(); ++i) {
        if (dims[i] >= 0) {
          names[i] = "";
        } else if (!names[i] || !*names[i]) {
          fresh[i] = "actsparse_unk_" + std::to_string(unknown++);
          names[i] = fresh[i].c_str();
        }
        dims[i] = dims[i] >= 0 ? dims[i] : -1;
      }
      dims.back() = n;
      names.back() = "";
      OrtTensorTypeAndShapeInfo* out_raw = nullptr;
      Ort::ThrowOnError(api.CreateTensorTypeAndShapeInfo(&out_raw));
      Ort::TensorTypeAndShapeInfo out(out_raw);
      Ort::ThrowOnError(api.SetTensorElementType(out_raw, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
      Ort::ThrowOnError(api.SetDimensions(out_raw, dims.data(), dims.size()));
      Ort::ThrowOnError(api.SetSymbolicDimensions(out_raw, names.data(), names.size()));
      return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out_raw);
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
};

// Whether a session quantises the activations of its int8/int4 MatMuls to int8: ORT fuses DequantizeLinear →
// MatMul into MatMulNBits at the accuracy level of this entry, 4 (int8 activations) when absent. The ops
// then do the same with u8/u4 weights (Params::int8_activations), so fused and unfused models compute alike.
bool session_quantises(const OrtApi& api, const OrtSessionOptions* options) {
  constexpr const char* key = "session.qdq_matmulnbits_accuracy_level";
  int has = 0;
  Ort::ThrowOnError(api.HasSessionConfigEntry(options, key, &has));
  if (!has) return true;
  size_t size = 0;
  Ort::ThrowOnError(api.GetSessionConfigEntry(options, key, nullptr, &size));
  std::string value(size, '\0');
  Ort::ThrowOnError(api.GetSessionConfigEntry(options, key, value.data(), &size));
  return value.c_str() == std::string("4");
}

}  // namespace
}  // namespace actsparse

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                         const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api)  // a runtime older than these headers: say so through the oldest API, which every runtime has
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "libactsparse_onnxruntime needs a newer onnxruntime");
  Ort::InitApi(api);
  try {
    // Two domains for the process, by activation precision: sessions keep pointers to them and to the ops.
    // The session's config is read here, so its entries must be set before the library is registered.
    static actsparse::Op f32_op(false), int8_op(true);
    static const auto domain = [](actsparse::Op* op) {
      Ort::CustomOpDomain d(actsparse::kDomain);
      d.Add(op);
      return d;
    };
    static Ort::CustomOpDomain f32_domain = domain(&f32_op), int8_domain = domain(&int8_op);
    Ort::UnownedSessionOptions(options).Add(actsparse::session_quantises(*api, options) ? int8_domain : f32_domain);
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}
