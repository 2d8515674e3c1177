// The OpenVINO extension library: the IR ops (opset "actsparse"), and the ONNX-frontend conversion of
// ai.actsparse::ActSparseMatMul onto the same op, so OpenVINO reads fused ONNX files too.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>

#include "actsparse_op.hpp"

namespace {

// A converter, not an attribute map: ONNX has no bool attribute, so has_bias arrives as an int
// (the map would fail with "Bad cast from l to b").
ov::OutputVector convert_onnx(const ov::frontend::NodeContext& node) {
    return {std::make_shared<actsparse::ActSparseMatMul>(
        ov::OutputVector{node.get_input(0), node.get_input(1), node.get_input(2)},
        node.get_attribute<std::string>("weight_format"), node.get_attribute<int64_t>("out_features"),
        node.get_attribute<int64_t>("group_size"), node.get_attribute<float>("mode"),
        node.get_attribute<float>("threshold"), node.get_attribute<std::string>("prefill"),
        node.get_attribute<int64_t>("has_bias") != 0,
        node.get_attribute<int64_t>("tile_cols", actsparse::kLegacyTileCols))};
}

}  // namespace

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<actsparse::ActSparseMatMul>>(),
    std::make_shared<ov::OpExtension<actsparse::ActSparseMLP>>(),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("ActSparseMatMul", "ai.actsparse", convert_onnx),
}));
