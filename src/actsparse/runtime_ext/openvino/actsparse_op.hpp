// ActSparseMatMul and ActSparseMLP for OpenVINO: thin adapters over the kernel core (actsparse_core.hpp).
#pragma once

#include <openvino/op/op.hpp>

#include <array>
#include <mutex>

#include "actsparse_core.hpp"

namespace actsparse {

// One projection's attributes (docs/op.md), visited under a prefix ("" for ActSparseMatMul, "up_" and "down_"
// for ActSparseMLP).
struct ProjectionAttributes {
    std::string weight_format = "f32";
    int64_t out_features = 0;
    int64_t group_size = 0;
    float mode = 0.f;
    float threshold = 0.f;
    std::string prefill = "dense";
    bool has_bias = false;
    int64_t tile_cols = kLegacyTileCols;
    bool int8_activations = false;
    void visit(ov::AttributeVisitor& visitor, const std::string& prefix);
};

// A projection's weight and params as an op holds them: their types and byte counts (-1: not static), and in
// evaluate their bytes.
struct Buffers {
    ov::element::Type weight_type, params_type;
    int64_t weight_bytes = -1, params_bytes = -1;
    const void* weight = nullptr;
    const void* params = nullptr;
};

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
    ProjectionAttributes m_attrs;
    bool m_rows_are_tokens = false;  // x's token axis is a static 1 (PagedAttention): see validate_and_infer_types
    // The contract as bound in validate_and_infer_types (or on the first call), so evaluate only compares sizes.
    mutable OpBinding m_binding;
    mutable std::once_flag m_pages;  // to_huge_pages on the weights, at the first evaluate
};

// A whole MLP in one call: y = down(act(up(x))), each projection an ActSparseMatMul with its own mask, m, τ and
// weights (attributes up_* and down_* as ActSparseMatMul's; activation silu, gelu_erf or gelu_tanh; gate first,
// second or none: which half of up's output the activation takes before the product with the other half).
// Inputs: x and one u8 blob, [up weight | up params | down weight | down params], each buffer from a multiple of
// 64 bytes, their sizes the attributes *_weight_bytes and *_params_bytes. Every custom-op call pays the CPU
// plugin's fixed cost, partly per input, so one call per layer's MLP instead of two, with two inputs, and the
// intermediate never leaves the op.
class ActSparseMLP : public ov::op::Op {
public:
    OPENVINO_OP("ActSparseMLP", "actsparse");

    ActSparseMLP() = default;

    void validate_and_infer_types() override;
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override;
    bool visit_attributes(ov::AttributeVisitor& visitor) override;
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;
    bool has_evaluate() const override { return true; }

private:
    int64_t intermediate() const;  // down's K
    std::array<Buffers, 2> buffers(const void* blob) const;  // up's and down's, in the blob (null: sizes only)
    int64_t blob_bytes() const;
    ProjectionAttributes m_up, m_down;
    std::string m_activation = "silu", m_gate = "first";
    Activation m_act = Activation::Silu;
    Gate m_gate_kind = Gate::First;
    bool m_rows_are_tokens = false;
    std::array<int64_t, 4> m_bytes{};  // up weight, up params, down weight, down params
    mutable OpBinding m_up_binding, m_down_binding;
    mutable std::once_flag m_pages;
};

}  // namespace actsparse
