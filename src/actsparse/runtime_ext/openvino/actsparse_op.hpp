// ActSparseMatMul for OpenVINO: a thin adapter over the kernel core (actsparse_core.hpp).
#pragma once

#include <openvino/op/op.hpp>

namespace actsparse {

// y = z'·W + bias, z' = (x − m) where ¬(|x − m| ≤ τ) else 0; dense (z' = x − m) on a prefill step
// when keep_dense is true. Inputs: x [..., K] f32, W (packed [K, N], see PackedWeight), scale,
// zero_point (f32, empty for f32/f16), mode and threshold (f32 scalars), bias [N] (f32, may be
// empty), keep_dense (boolean scalar).
class ActSparseMatMul : public ov::op::Op {
public:
    OPENVINO_OP("ActSparseMatMul", "actsparse");

    ActSparseMatMul() = default;
    ActSparseMatMul(const ov::OutputVector& args, std::string weight_format, int64_t out_features, int64_t group_size);

    void validate_and_infer_types() override;
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override;
    bool visit_attributes(ov::AttributeVisitor& visitor) override;
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;
    bool has_evaluate() const override { return true; }

private:
    std::string m_weight_format = "f32";
    int64_t m_out_features = 0;
    int64_t m_group_size = 0;
};

}  // namespace actsparse
