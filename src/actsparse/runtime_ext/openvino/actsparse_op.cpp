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

}  // namespace

ActSparseMatMul::ActSparseMatMul(const ov::OutputVector& args, std::string weight_format, int64_t out_features,
                                 int64_t group_size, float mode, float threshold, std::string prefill, bool has_bias,
                                 int64_t tile_cols, bool int8_activations)
    : Op(args),
      m_attrs{std::move(weight_format), out_features, group_size, mode, threshold, std::move(prefill), has_bias,
              tile_cols, int8_activations} {
    constructor_validate_and_infer_types();
}

OpDesc ActSparseMatMul::describe(int64_t K, const ov::element::Type& x, const ov::element::Type& weight,
                                 const ov::element::Type& params, int64_t weight_bytes, int64_t params_bytes) const {
    OpDesc d;
    d.K = K;
    d.x_type = element(x);
    d.weight_type = element(weight);
    d.params_type = element(params);
    d.weight_bytes = weight_bytes;
    d.params_bytes = params_bytes;
    d.weight_format = m_attrs.weight_format;
    d.prefill = m_attrs.prefill;
    d.out_features = m_attrs.out_features;
    d.group_size = m_attrs.group_size;
    d.tile_cols = m_attrs.tile_cols;
    d.mode = m_attrs.mode;
    d.threshold = m_attrs.threshold;
    d.has_bias = m_attrs.has_bias;
    return d;
}

// Binds what the graph says: the attributes always; K and the constant inputs' sizes where static.
void ActSparseMatMul::validate_and_infer_types() {
    NODE_VALIDATION_CHECK(this, get_input_size() == 3, "expects 3 inputs (x, weight, params), got ", get_input_size());
    auto shape = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, shape.rank().is_static() && shape.rank().get_length() >= 1, "x needs a static rank");
    const auto& k = shape[shape.rank().get_length() - 1];
    try {
        m_binding.set(bind_op(describe(k.is_static() ? k.get_length() : -1, get_input_element_type(0),
                                       get_input_element_type(1), get_input_element_type(2), byte_size(*this, 1),
                                       byte_size(*this, 2))));
    } catch (const std::invalid_argument& e) {
        // x a Constant: the CPU plugin's shape inference of one call, on a clone. With one inference thread the
        // plugin drops an error raised there and returns the previous call's y, so the call goes on to evaluate,
        // which binds its sizes again and raises.
        NODE_VALIDATION_CHECK(this, ov::is_type<ov::op::v0::Constant>(get_input_node_ptr(0)), e.what());
    }
    // PagedAttention (openvino-genai's default) flattens the tokens of every sequence of a step into the batch
    // axis: x is [tokens, 1, K] with the 1 static in the graph. A row is then a token, not a sequence, and a
    // prompt's rows cannot be told from other sequences' decode steps, so only a single row is a decode step.
    const int64_t rank = shape.rank().get_length();
    m_rows_are_tokens = rank >= 2 && shape[rank - 2].is_static() && shape[rank - 2].get_length() == 1;
    // bf16 or f16 x: the op returns that type too, so a bf16 or f16 graph needs no Reorder around it
    shape[rank - 1] = m_attrs.out_features;
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
    visitor.on_attribute("weight_format", m_attrs.weight_format);
    visitor.on_attribute("out_features", m_attrs.out_features);
    visitor.on_attribute("group_size", m_attrs.group_size);
    visitor.on_attribute("mode", m_attrs.mode);
    visitor.on_attribute("threshold", m_attrs.threshold);
    visitor.on_attribute("prefill", m_attrs.prefill);
    visitor.on_attribute("has_bias", m_attrs.has_bias);
    visitor.on_attribute("tile_cols", m_attrs.tile_cols);
    visitor.on_attribute("int8_activations", m_attrs.int8_activations);
    return true;
}

bool ActSparseMatMul::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const auto& x = inputs[0];
    const ov::Shape in_shape = x.get_shape();
    const int64_t K = static_cast<int64_t>(in_shape.back());
    const int64_t M = K ? static_cast<int64_t>(ov::shape_size(in_shape)) / K : 0;
    // One token per sequence is a decode step: always pruned. Longer inputs are prefill.
    const size_t rank = in_shape.size();
    const bool decode = M == 1 || (rank >= 2 && !m_rows_are_tokens && in_shape[rank - 2] == 1);

    // Sizes the graph did not show (or that changed since) are bound here, before any byte is read.
    const int64_t w_bytes = static_cast<int64_t>(inputs[1].get_byte_size());
    const int64_t p_bytes = static_cast<int64_t>(inputs[2].get_byte_size());
    const BoundOp bound = m_binding.get(K, w_bytes, p_bytes, [&]() -> BoundOp {
        try {
            return bind_op(describe(K, x.get_element_type(), inputs[1].get_element_type(), inputs[2].get_element_type(),
                                    w_bytes, p_bytes));
        } catch (const std::invalid_argument& e) {
            // With one inference thread the CPU plugin (2026.4) drops this error and returns its last y, over
            // the buffer it handed the op: NaN there, so the call's result cannot pass for numbers.
            fill_nan(outputs[0]);
            OPENVINO_THROW(e.what());
        }
    });
    ov::Shape out_shape = in_shape;
    out_shape.back() = static_cast<size_t>(bound.N);
    outputs[0].set_shape(out_shape);
    if (M == 0) return true;
    const void* params = inputs[2].data();
    std::call_once(m_pages, [&] { to_huge_pages(inputs[1].data(), inputs[1].get_byte_size()); });
    const PackedWeight weight = bound.weight(inputs[1].data(), params);
    Params p;
    p.mode = m_attrs.mode;
    p.threshold = m_attrs.threshold;
    p.mask = decode || bound.prune_prefill;
    p.int8_activations = m_attrs.int8_activations;
    // bf16 x (bf16 exports) or f16 x (GPU-precision graphs): the core reads it and rounds y to its type, as a
    // Reorder around the op would
    const auto& et = x.get_element_type();
    const auto type = et == ov::element::f32 ? Activations::F32 : et == ov::element::f16 ? Activations::F16
                                                                                          : Activations::BF16;
    // f32 x holding only bf16 values: the plugin runs the graph in bf16 and widened x for the op (it keeps a
    // custom op's declared types). The prompt then multiplies in bf16, as the plugin's own FullyConnected does.
    p.bf16_products = type == Activations::F32 && M > decode_max_rows() && holds_bf16(x.data<const float>(), M * K);
    matmul(x.data(), type, M, weight, bound.bias(params), p, outputs[0].data(), OpenVINOExecutor{});
    return true;
}

}  // namespace actsparse
