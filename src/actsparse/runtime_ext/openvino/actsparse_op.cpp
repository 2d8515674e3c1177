#include "actsparse_op.hpp"

#include <openvino/core/parallel.hpp>

#include "actsparse_core.hpp"

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

WeightFormat parse_format(const std::string& name) {
    if (name == "f32") return WeightFormat::F32;
    if (name == "f16") return WeightFormat::F16;
    if (name == "u8") return WeightFormat::U8;
    if (name == "u4") return WeightFormat::U4;
    OPENVINO_THROW("ActSparseMatMul: unknown weight_format '", name, "'");
}

}  // namespace

ActSparseMatMul::ActSparseMatMul(const ov::OutputVector& args, std::string weight_format, int64_t out_features,
                                 int64_t group_size)
    : Op(args), m_weight_format(std::move(weight_format)), m_out_features(out_features), m_group_size(group_size) {
    constructor_validate_and_infer_types();
}

void ActSparseMatMul::validate_and_infer_types() {
    NODE_VALIDATION_CHECK(this, get_input_size() == 8, "expects 8 inputs, got ", get_input_size());
    NODE_VALIDATION_CHECK(this, get_input_element_type(0) == ov::element::f32, "x must be f32");
    const auto format = parse_format(m_weight_format);
    // f16 weights travel as raw bytes: a plugin would widen an f16 constant to f32
    const auto weight_type = format == WeightFormat::F32 ? ov::element::f32 : ov::element::u8;
    NODE_VALIDATION_CHECK(this, get_input_element_type(1) == weight_type, "weight of format ", m_weight_format,
                          " must be ", weight_type, ", got ", get_input_element_type(1));
    auto shape = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, shape.rank().is_static() && shape.rank().get_length() >= 1, "x needs a static rank");
    shape[shape.rank().get_length() - 1] = m_out_features;
    set_output_type(0, ov::element::f32, shape);
}

std::shared_ptr<ov::Node> ActSparseMatMul::clone_with_new_inputs(const ov::OutputVector& new_args) const {
    return std::make_shared<ActSparseMatMul>(new_args, m_weight_format, m_out_features, m_group_size);
}

bool ActSparseMatMul::visit_attributes(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("weight_format", m_weight_format);
    visitor.on_attribute("out_features", m_out_features);
    visitor.on_attribute("group_size", m_group_size);
    return true;
}

bool ActSparseMatMul::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const auto& x = inputs[0];
    const ov::Shape in_shape = x.get_shape();
    const int64_t K = static_cast<int64_t>(in_shape.back());
    const int64_t M = K ? static_cast<int64_t>(ov::shape_size(in_shape)) / K : 0;
    ov::Shape out_shape = in_shape;
    out_shape.back() = static_cast<size_t>(m_out_features);
    outputs[0].set_shape(out_shape);

    // One token per sequence is a decode step: always pruned. Longer inputs are prefill.
    const size_t rank = in_shape.size();
    const bool decode = rank < 2 ? M == 1 : in_shape[rank - 2] == 1;
    const bool keep_dense = *static_cast<const char*>(inputs[7].data()) != 0;
    auto optional = [](const ov::Tensor& t) { return t.get_size() ? t.data<const float>() : nullptr; };

    PackedWeight weight{parse_format(m_weight_format), K, m_out_features, m_group_size, inputs[1].data(),
                        optional(inputs[2]), optional(inputs[3])};
    Params params;
    params.mode = *inputs[4].data<const float>();
    params.threshold = *inputs[5].data<const float>();
    params.mask = decode || !keep_dense;
    matmul(x.data<const float>(), M, weight, optional(inputs[6]), params, outputs[0].data<float>(), OpenVINOExecutor{});
    return true;
}

}  // namespace actsparse
