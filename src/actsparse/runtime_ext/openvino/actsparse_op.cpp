#include "actsparse_op.hpp"

#include <openvino/core/parallel.hpp>
#include <openvino/op/constant.hpp>

#include <algorithm>
#include <limits>
#include <memory>
#include <stdexcept>

namespace actsparse {
namespace {

// Runs the core's tasks on OpenVINO's own thread pool (its TBB arena), so the op follows
// INFERENCE_NUM_THREADS and never oversubscribes the cores.
struct OpenVINOExecutor final : Executor {
    int concurrency() const override { return parallel_get_max_threads(); }
    void parallel(int64_t ntasks, const std::function<void(int64_t)>& fn) const override {
        ov::parallel_for(ntasks, [&](int64_t task) { fn(task); });
    }
};

Element element(const ov::element::Type& t) {
    return t == ov::element::f32 ? Element::F32 : t == ov::element::bf16 ? Element::BF16
         : t == ov::element::f16 ? Element::F16 : t == ov::element::u8 ? Element::U8
         : t.is_dynamic() ? Element::Unknown : Element::Other;
}

// An input's bytes where its shape is static, else -1.
int64_t byte_size(const ov::Node& node, size_t i) {
    const auto& shape = node.get_input_partial_shape(i);
    const auto& type = node.get_input_element_type(i);
    if (shape.is_dynamic() || type.is_dynamic()) return -1;
    int64_t n = static_cast<int64_t>(type.size());
    for (const auto& d : shape) n *= d.get_length();  // not to_shape(): no allocation on the plugin's per-call clone
    return n;
}

void fill_nan(ov::Tensor& y) {
    const size_t n = y.get_size();
    const auto& t = y.get_element_type();
    if (t == ov::element::f32) {
        std::fill_n(y.data<float>(), n, std::numeric_limits<float>::quiet_NaN());
    } else if (t == ov::element::bf16 || t == ov::element::f16) {
        std::fill_n(static_cast<uint16_t*>(y.data()), n, uint16_t(t == ov::element::bf16 ? 0x7fc0 : 0x7e00));
    }
}

OpDesc describe(const ProjectionAttributes& a, int64_t K, const ov::element::Type& x, const ov::element::Type& weight,
                const ov::element::Type& params, int64_t weight_bytes, int64_t params_bytes) {
    OpDesc d;
    d.K = K;
    d.x_type = element(x);
    d.weight_type = element(weight);
    d.params_type = element(params);
    d.weight_bytes = weight_bytes;
    d.params_bytes = params_bytes;
    d.weight_format = a.weight_format;
    d.prefill = a.prefill;
    d.out_features = a.out_features;
    d.group_size = a.group_size;
    d.tile_cols = a.tile_cols;
    d.mode = a.mode;
    d.threshold = a.threshold;
    d.has_bias = a.has_bias;
    return d;
}

// bind_op's message, for one of ActSparseMLP's projections ("ActSparseMLP: up: ...") where label is given.
std::string message(const std::invalid_argument& e, const char* label) {
    static const std::string ours = "ActSparseMatMul: ";
    std::string what = e.what();
    if (!label) return what;
    return "ActSparseMLP: " + std::string(label) + ": " + (what.rfind(ours, 0) == 0 ? what.substr(ours.size()) : what);
}

// The buffers of ActSparseMatMul's inputs 1 and 2.
Buffers inputs_of(const ov::Node& node) {
    return {node.get_input_element_type(1), node.get_input_element_type(2), byte_size(node, 1), byte_size(node, 2)};
}

Buffers inputs_of(const ov::TensorVector& inputs) {
    return {inputs[1].get_element_type(), inputs[2].get_element_type(), static_cast<int64_t>(inputs[1].get_byte_size()),
            static_cast<int64_t>(inputs[2].get_byte_size()), inputs[1].data(), inputs[2].data()};
}

// Binds what the graph shows of a projection: the attributes always; K and its buffers' sizes where static.
void bind_graph(const ov::Node& node, OpBinding& binding, const ProjectionAttributes& a, int64_t K, const Buffers& b,
                const char* label) {
    try {
        binding.set(bind_op(describe(a, K, node.get_input_element_type(0), b.weight_type, b.params_type,
                                     b.weight_bytes, b.params_bytes)));
    } catch (const std::invalid_argument& e) {
        // x a Constant: the CPU plugin's shape inference of one call, on a clone. With one inference thread the
        // plugin drops an error raised there and returns the previous call's y, so the call goes on to evaluate,
        // which binds its sizes again and raises.
        NODE_VALIDATION_CHECK(&node, ov::is_type<ov::op::v0::Constant>(node.get_input_node_ptr(0)), message(e, label));
    }
}

// A call's sizes, bound where the graph did not show them (or they changed since), before any byte is read.
BoundOp bind_call(OpBinding& binding, const ProjectionAttributes& a, int64_t K, const ov::element::Type& x,
                  const Buffers& b, ov::Tensor& y, const char* label) {
    return binding.get(K, b.weight_bytes, b.params_bytes, [&]() -> BoundOp {
        try {
            return bind_op(describe(a, K, x, b.weight_type, b.params_type, b.weight_bytes, b.params_bytes));
        } catch (const std::invalid_argument& e) {
            // With one inference thread the CPU plugin (2026.4) drops this error and returns its last y, over
            // the buffer it handed the op: NaN there, so the call's result cannot pass for numbers.
            fill_nan(y);
            OPENVINO_THROW(message(e, label));
        }
    });
}

// PagedAttention (openvino-genai's default) flattens the tokens of every sequence of a step into the batch
// axis: x is [tokens, 1, K] with the 1 static in the graph. A row is then a token, not a sequence, and a
// prompt's rows cannot be told from other sequences' decode steps, so only a single row is a decode step.
bool rows_are_tokens(const ov::PartialShape& shape) {
    const int64_t rank = shape.rank().get_length();
    return rank >= 2 && shape[rank - 2].is_static() && shape[rank - 2].get_length() == 1;
}

// One token per sequence is a decode step: always pruned. Longer inputs are prefill.
bool is_decode(const ov::Shape& shape, int64_t M, bool rows_are_tokens) {
    const size_t rank = shape.size();
    return M == 1 || (rank >= 2 && !rows_are_tokens && shape[rank - 2] == 1);
}

Activations activations(const ov::element::Type& et) {
    return et == ov::element::f32 ? Activations::F32 : et == ov::element::f16 ? Activations::F16 : Activations::BF16;
}

// One projection of M rows of x (of type) into y.
void project(const ProjectionAttributes& a, const BoundOp& bound, const void* x, Activations type, int64_t M,
             bool decode, bool bf16_products, const Buffers& b, void* y) {
    Params q;
    q.mode = a.mode;
    q.threshold = a.threshold;
    q.mask = decode || bound.prune_prefill;
    q.int8_activations = a.int8_activations;
    q.bf16_products = bf16_products;
    matmul(x, type, M, bound.weight(b.weight, b.params), bound.bias(b.params), q, y, OpenVINOExecutor{});
}

// f32 x holding only bf16 values: the plugin runs the graph in bf16 and widened x for the op (it keeps a
// custom op's declared types). A prompt then multiplies in bf16, as the plugin's own FullyConnected does.
bool bf16_prompt(const ov::Tensor& x, int64_t M, int64_t K) {
    return x.get_element_type() == ov::element::f32 && M > decode_max_rows() && holds_bf16(x.data<const float>(), M * K);
}

}  // namespace

void ProjectionAttributes::visit(ov::AttributeVisitor& visitor, const std::string& prefix) {
    visitor.on_attribute(prefix + "weight_format", weight_format);
    visitor.on_attribute(prefix + "out_features", out_features);
    visitor.on_attribute(prefix + "group_size", group_size);
    visitor.on_attribute(prefix + "mode", mode);
    visitor.on_attribute(prefix + "threshold", threshold);
    visitor.on_attribute(prefix + "prefill", prefill);
    visitor.on_attribute(prefix + "has_bias", has_bias);
    visitor.on_attribute(prefix + "tile_cols", tile_cols);
    visitor.on_attribute(prefix + "int8_activations", int8_activations);
}

ActSparseMatMul::ActSparseMatMul(const ov::OutputVector& args, std::string weight_format, int64_t out_features,
                                 int64_t group_size, float mode, float threshold, std::string prefill, bool has_bias,
                                 int64_t tile_cols, bool int8_activations)
    : Op(args),
      m_attrs{std::move(weight_format), out_features, group_size, mode, threshold, std::move(prefill), has_bias,
              tile_cols, int8_activations} {
    constructor_validate_and_infer_types();
}

// Binds what the graph says: the attributes always; K and the constant inputs' sizes where static.
void ActSparseMatMul::validate_and_infer_types() {
    NODE_VALIDATION_CHECK(this, get_input_size() == 3, "expects 3 inputs (x, weight, params), got ", get_input_size());
    auto shape = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, shape.rank().is_static() && shape.rank().get_length() >= 1, "x needs a static rank");
    const auto& k = shape[shape.rank().get_length() - 1];
    bind_graph(*this, m_binding, m_attrs, k.is_static() ? k.get_length() : -1, inputs_of(*this), nullptr);
    m_rows_are_tokens = rows_are_tokens(shape);
    // bf16 or f16 x: the op returns that type too, so a bf16 or f16 graph needs no Reorder around it
    shape[shape.rank().get_length() - 1] = m_attrs.out_features;
    set_output_type(0, get_input_element_type(0), shape);
}

std::shared_ptr<ov::Node> ActSparseMatMul::clone_with_new_inputs(const ov::OutputVector& new_args) const {
    auto op = std::make_shared<ActSparseMatMul>();
    op->m_attrs = m_attrs;
    op->set_arguments(new_args);
    op->constructor_validate_and_infer_types();
    return op;
}

bool ActSparseMatMul::visit_attributes(ov::AttributeVisitor& visitor) {
    m_attrs.visit(visitor, "");
    return true;
}

bool ActSparseMatMul::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const auto& x = inputs[0];
    const ov::Shape in_shape = x.get_shape();
    const int64_t K = static_cast<int64_t>(in_shape.back());
    const int64_t M = K ? static_cast<int64_t>(ov::shape_size(in_shape)) / K : 0;
    const Buffers buffers = inputs_of(inputs);
    const BoundOp bound = bind_call(m_binding, m_attrs, K, x.get_element_type(), buffers, outputs[0], nullptr);
    ov::Shape out_shape = in_shape;
    out_shape.back() = static_cast<size_t>(bound.N);
    outputs[0].set_shape(out_shape);
    if (M == 0) return true;
    std::call_once(m_pages, [&] { to_huge_pages(inputs[1].data(), inputs[1].get_byte_size()); });
    // bf16 x (bf16 exports) or f16 x (GPU-precision graphs): the core reads it and rounds y to its type, as a
    // Reorder around the op would
    project(m_attrs, bound, x.data(), activations(x.get_element_type()), M, is_decode(in_shape, M, m_rows_are_tokens),
            bf16_prompt(x, M, K), buffers, outputs[0].data());
    return true;
}

namespace {
Activation parse_activation(const ov::Node* node, const std::string& name) {
    if (name == "silu") return Activation::Silu;
    if (name == "gelu_erf") return Activation::GeluErf;
    NODE_VALIDATION_CHECK(node, name == "gelu_tanh", "activation must be silu, gelu_erf or gelu_tanh, got '", name, "'");
    return Activation::GeluTanh;
}

Gate parse_gate(const ov::Node* node, const std::string& name) {
    if (name == "first") return Gate::First;
    if (name == "second") return Gate::Second;
    NODE_VALIDATION_CHECK(node, name == "none", "gate must be first, second or none, got '", name, "'");
    return Gate::None;
}

constexpr int64_t kBlobAlign = 64;  // each buffer of the blob starts at a multiple of this many bytes
int64_t aligned(int64_t n) { return (n + kBlobAlign - 1) / kBlobAlign * kBlobAlign; }

// A projection's buffers in the blob: the weight as its format stores it, params f32 or compact u8.
Buffers blob_buffers(const ProjectionAttributes& a, int64_t weight_bytes, int64_t params_bytes) {
    const FormatInfo* f = find_format(a.weight_format);
    const bool f32_weight = f && f->storage == Element::F32, compact = f && f->compact_params;
    return {f32_weight ? ov::element::f32 : ov::element::u8, compact ? ov::element::u8 : ov::element::f32,
            weight_bytes, params_bytes};
}
}  // namespace

int64_t ActSparseMLP::intermediate() const {
    return m_gate_kind == Gate::None ? m_up.out_features : m_up.out_features / 2;
}

std::array<Buffers, 2> ActSparseMLP::buffers(const void* blob) const {
    std::array<Buffers, 2> b{blob_buffers(m_up, m_bytes[0], m_bytes[1]), blob_buffers(m_down, m_bytes[2], m_bytes[3])};
    if (const auto* base = static_cast<const uint8_t*>(blob)) {
        const int64_t up_params = aligned(m_bytes[0]), down_weight = up_params + aligned(m_bytes[1]);
        b[0].weight = base;
        b[0].params = base + up_params;
        b[1].weight = base + down_weight;
        b[1].params = base + down_weight + aligned(m_bytes[2]);
    }
    return b;
}

int64_t ActSparseMLP::blob_bytes() const {
    return aligned(m_bytes[0]) + aligned(m_bytes[1]) + aligned(m_bytes[2]) + m_bytes[3];
}

void ActSparseMLP::validate_and_infer_types() {
    NODE_VALIDATION_CHECK(this, get_input_size() == 2, "expects 2 inputs (x, blob), got ", get_input_size());
    m_act = parse_activation(this, m_activation);
    m_gate_kind = parse_gate(this, m_gate);
    NODE_VALIDATION_CHECK(this, *std::min_element(m_bytes.begin(), m_bytes.end()) >= 0,
                          "ActSparseMLP: the buffers' byte counts must not be negative");
    const auto& blob_type = get_input_element_type(1);
    NODE_VALIDATION_CHECK(this, blob_type.is_dynamic() || blob_type == ov::element::u8,
                          "ActSparseMLP: blob must be u8, got ", blob_type);
    const int64_t bytes = byte_size(*this, 1);
    NODE_VALIDATION_CHECK(this, bytes < 0 || bytes == blob_bytes(), "ActSparseMLP: blob has ", bytes,
                          " bytes, expected ", blob_bytes(), " for up_weight_bytes=", m_bytes[0], ", up_params_bytes=",
                          m_bytes[1], ", down_weight_bytes=", m_bytes[2], ", down_params_bytes=", m_bytes[3],
                          " (each buffer from a multiple of 64 bytes)");
    auto shape = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, shape.rank().is_static() && shape.rank().get_length() >= 1, "x needs a static rank");
    const auto& k = shape[shape.rank().get_length() - 1];
    const auto b = buffers(nullptr);
    bind_graph(*this, m_up_binding, m_up, k.is_static() ? k.get_length() : -1, b[0], "up");
    NODE_VALIDATION_CHECK(this, m_gate_kind == Gate::None || m_up.out_features % 2 == 0,
                          "a gated MLP needs an even up_out_features, got ", m_up.out_features);
    bind_graph(*this, m_down_binding, m_down, intermediate(), b[1], "down");
    m_rows_are_tokens = rows_are_tokens(shape);
    shape[shape.rank().get_length() - 1] = m_down.out_features;
    set_output_type(0, get_input_element_type(0), shape);
}

std::shared_ptr<ov::Node> ActSparseMLP::clone_with_new_inputs(const ov::OutputVector& new_args) const {
    auto op = std::make_shared<ActSparseMLP>();
    op->m_up = m_up;
    op->m_down = m_down;
    op->m_activation = m_activation;
    op->m_gate = m_gate;
    op->m_bytes = m_bytes;
    op->set_arguments(new_args);
    op->constructor_validate_and_infer_types();
    return op;
}

bool ActSparseMLP::visit_attributes(ov::AttributeVisitor& visitor) {
    m_up.visit(visitor, "up_");
    m_down.visit(visitor, "down_");
    visitor.on_attribute("activation", m_activation);
    visitor.on_attribute("gate", m_gate);
    visitor.on_attribute("up_weight_bytes", m_bytes[0]);
    visitor.on_attribute("up_params_bytes", m_bytes[1]);
    visitor.on_attribute("down_weight_bytes", m_bytes[2]);
    visitor.on_attribute("down_params_bytes", m_bytes[3]);
    return true;
}

bool ActSparseMLP::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const auto& x = inputs[0];
    const ov::Shape in_shape = x.get_shape();
    const int64_t K = static_cast<int64_t>(in_shape.back());
    const int64_t M = K ? static_cast<int64_t>(ov::shape_size(in_shape)) / K : 0;
    const auto& et = x.get_element_type();
    if (static_cast<int64_t>(inputs[1].get_byte_size()) != blob_bytes()) {
        fill_nan(outputs[0]);  // see bind_call
        OPENVINO_THROW("ActSparseMLP: blob has ", inputs[1].get_byte_size(), " bytes, expected ", blob_bytes());
    }
    const auto b = buffers(inputs[1].data());
    const BoundOp up = bind_call(m_up_binding, m_up, K, et, b[0], outputs[0], "up");
    const BoundOp down = bind_call(m_down_binding, m_down, intermediate(), et, b[1], outputs[0], "down");
    ov::Shape out_shape = in_shape;
    out_shape.back() = static_cast<size_t>(down.N);
    outputs[0].set_shape(out_shape);
    if (M == 0) return true;
    std::call_once(m_pages, [&] { to_huge_pages(inputs[1].data(), inputs[1].get_byte_size()); });
    const Activations type = activations(et);
    const bool decode = is_decode(in_shape, M, m_rows_are_tokens), bf16_products = bf16_prompt(x, M, K);
    // Per calling thread, reused: a decode step allocates nothing.
    thread_local std::vector<float> h, a;
    const int64_t bytes = type == Activations::F32 ? 4 : 2;
    h.resize(static_cast<size_t>((M * up.N * bytes + 3) / 4));
    a.resize(static_cast<size_t>((M * intermediate() * bytes + 3) / 4));
    project(m_up, up, x.data(), type, M, decode, bf16_products, b[0], h.data());
    // Where the prompt multiplies in bf16, so does down: a is rounded to bf16 as the plugin's graph would hold it.
    activate(h.data(), type, M, up.N, m_act, m_gate_kind, bf16_products, a.data(), OpenVINOExecutor{});
    project(m_down, down, a.data(), type, M, decode, bf16_products, b[1], outputs[0].data());
    return true;
}

}  // namespace actsparse
