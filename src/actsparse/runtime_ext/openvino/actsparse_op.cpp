#include "actsparse_op.hpp"

#include <openvino/core/parallel.hpp>

#include <memory>

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
    WeightFormat f;
    if (!parse_weight_format(name, f)) OPENVINO_THROW("ActSparseMatMul: unknown weight_format '", name, "'");
    return f;
}

}  // namespace

ActSparseMatMul::ActSparseMatMul(const ov::OutputVector& args, std::string weight_format, int64_t out_features,
                                 int64_t group_size, float mode, float threshold, std::string prefill, bool has_bias,
                                 int64_t tile_cols, bool int8_activations)
    : Op(args),
      m_weight_format(std::move(weight_format)),
      m_out_features(out_features),
      m_group_size(group_size),
      m_mode(mode),
      m_threshold(threshold),
      m_prefill(std::move(prefill)),
      m_has_bias(has_bias),
      m_tile_cols(tile_cols),
      m_int8_activations(int8_activations) {
    constructor_validate_and_infer_types();
}

void ActSparseMatMul::validate_and_infer_types() {
    NODE_VALIDATION_CHECK(this, get_input_size() == 3, "expects 3 inputs (x, weight, params), got ", get_input_size());
    NODE_VALIDATION_CHECK(this, m_prefill == "dense" || m_prefill == "sparse", "prefill must be dense or sparse");
    // bf16 x (bf16 exports): the op then returns bf16 too, and OpenVINO's bf16 graph needs no Reorder around it
    const auto x_type = get_input_element_type(0);
    NODE_VALIDATION_CHECK(this, x_type == ov::element::f32 || x_type == ov::element::bf16, "x must be f32 or bf16");
    NODE_VALIDATION_CHECK(this, valid_tile_cols(m_tile_cols), "tile_cols must be a power of two from 128 to ",
                          kMaxTileCols, ", got ", m_tile_cols);
    m_format = parse_format(m_weight_format);
    m_prune_prefill = m_prefill == "sparse";
    const auto params_type = get_input_element_type(2);
    NODE_VALIDATION_CHECK(this, params_type == ov::element::f32 || (params_type == ov::element::u8 && m_format == WeightFormat::U4),
                          "params must be f32 (or u8 bytes, compact, for u4 weights), got ", params_type);
    const auto format = m_format;
    // f16/bf16 weights travel as raw bytes: a plugin would widen such a constant to f32
    const auto weight_type = format == WeightFormat::F32 ? ov::element::f32 : ov::element::u8;
    NODE_VALIDATION_CHECK(this, get_input_element_type(1) == weight_type, "weight of format ", m_weight_format,
                          " must be ", weight_type, ", got ", get_input_element_type(1));
    auto shape = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, shape.rank().is_static() && shape.rank().get_length() >= 1, "x needs a static rank");
    shape[shape.rank().get_length() - 1] = m_out_features;
    set_output_type(0, x_type, shape);
}

std::shared_ptr<ov::Node> ActSparseMatMul::clone_with_new_inputs(const ov::OutputVector& new_args) const {
    return std::make_shared<ActSparseMatMul>(new_args, m_weight_format, m_out_features, m_group_size, m_mode,
                                             m_threshold, m_prefill, m_has_bias, m_tile_cols,
                                             m_int8_activations);
}

bool ActSparseMatMul::visit_attributes(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("weight_format", m_weight_format);
    visitor.on_attribute("out_features", m_out_features);
    visitor.on_attribute("group_size", m_group_size);
    visitor.on_attribute("mode", m_mode);
    visitor.on_attribute("threshold", m_threshold);
    visitor.on_attribute("prefill", m_prefill);
    visitor.on_attribute("has_bias", m_has_bias);
    visitor.on_attribute("tile_cols", m_tile_cols);
    visitor.on_attribute("int8_activations", m_int8_activations);
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

    const auto format = m_format;
    const int64_t N = m_out_features;
    const int64_t per_channel = format == WeightFormat::U8 ? N : format == WeightFormat::U4 ? K / m_group_size * N : 0;
    // params: f32 [bias | scale | zero point], or for u4 the compact bytes [bias f32 | scale f16 | zero point u8]
    const bool compact = inputs[2].get_element_type() == ov::element::u8;
    const int64_t bias_n = m_has_bias ? N : 0;
    const size_t expect = compact ? size_t(4 * bias_n + 3 * per_channel) : size_t(bias_n + 2 * per_channel);
    OPENVINO_ASSERT(inputs[2].get_size() == expect, "ActSparseMatMul: params has ", inputs[2].get_size(),
                    compact ? " bytes" : " values", ", expected ", expect);
    const auto* bytes = static_cast<const uint8_t*>(inputs[2].data());
    const float* bias = m_has_bias ? reinterpret_cast<const float*>(bytes) : nullptr;
    std::call_once(m_pages, [&] { to_huge_pages(inputs[1].data(), inputs[1].get_byte_size()); });
    PackedWeight weight{format, K, N, m_group_size, inputs[1].data(), nullptr, nullptr, m_tile_cols};
    if (compact) {
      weight.scale16 = reinterpret_cast<const uint16_t*>(bytes + 4 * bias_n);
      weight.zp8 = bytes + 4 * bias_n + 2 * per_channel;
    } else if (per_channel) {
      weight.scale = reinterpret_cast<const float*>(bytes) + bias_n;
      weight.zero_point = weight.scale + per_channel;
    }
    Params p;
    p.mode = m_mode;
    p.threshold = m_threshold;
    p.mask = decode || m_prune_prefill;
    p.int8_activations = m_int8_activations;
    // bf16 x (bf16 exports): the core reads it and rounds y to bf16, as a Reorder around the op would
    const auto type = x.get_element_type() == ov::element::f32 ? Activations::F32 : Activations::BF16;
    matmul(x.data(), type, M, weight, bias, p, outputs[0].data(), OpenVINOExecutor{});
    return true;
}

}  // namespace actsparse
