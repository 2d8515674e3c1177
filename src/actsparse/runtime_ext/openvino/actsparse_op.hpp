// ActSparseMatMul for OpenVINO: a thin adapter over the kernel core (actsparse_core.hpp).
#pragma once

#include <openvino/op/op.hpp>

#include <mutex>

#include "actsparse_core.hpp"

namespace actsparse {

// y = z'·W + bias, z' = (x − m) where ¬(|x − m| ≤ τ) else 0; dense (z' = x − m) on a prefill
// step (more than one token per sequence) when prefill is "dense". Inputs x [..., K] (f32, bf16 or f16, the
// output's type), the packed weight and params; inputs, attributes and their checks are in docs/op.md
// (bind_op). m, τ and the policy are attributes: the CPU plugin re-runs generic shape inference on every
// call of a custom op, at a cost per input. int8_activations (u8/u4 weights; false when absent): the op
// quantises its activations to int8 (Params::int8_activations), as the CPU plugin's dynamic quantisation
// does for its own u8/u4 FullyConnected (opt-in: backends.openvino.int8_activations). The op needs no other
// preparation: f32 x that holds bf16 values (the plugin runs the graph in bf16) gets a bf16 prefill.
class ActSparseMatMul : public ov::op::Op {
public:
    OPENVINO_OP("ActSparseMatMul", "actsparse");

    ActSparseMatMul() = default;
    ActSparseMatMul(const ov::OutputVector& args, std::string weight_format, int64_t out_features, int64_t group_size,
                    float mode, float threshold, std::string prefill, bool has_bias, int64_t tile_cols,
                    bool int8_activations = false);

    void validate_and_infer_types() override;
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override;
    bool visit_attributes(ov::AttributeVisitor& visitor) override;
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;
    bool has_evaluate() const override { return true; }

private:
    // The attributes plus what is known of the inputs (-1: unknown), for bind_op.
    OpDesc describe(int64_t K, const ov::element::Type& x, const ov::element::Type& weight,
                    const ov::element::Type& params, int64_t weight_bytes, int64_t params_bytes) const;
    struct Attributes {
        std::string weight_format = "f32";
        int64_t out_features = 0;
        int64_t group_size = 0;
        float mode = 0.f;
        float threshold = 0.f;
        std::string prefill = "dense";
        bool has_bias = false;
        int64_t tile_cols = kLegacyTileCols;
        bool int8_activations = false;
    } m_attrs;
    bool m_rows_are_tokens = false;  // x's token axis is a static 1 (PagedAttention): see validate_and_infer_types
    // The contract as bound in validate_and_infer_types (or on the first call), so evaluate only compares sizes.
    mutable OpBinding m_binding;
    mutable std::once_flag m_pages;  // to_huge_pages on the weights, at the first evaluate
};

}  // namespace actsparse
