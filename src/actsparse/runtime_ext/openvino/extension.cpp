// The OpenVINO extension library: the IR op (opset "actsparse"), and the ONNX-frontend mapping of
// ai.actsparse::ActSparseMatMul onto the same op, so OpenVINO reads fused ONNX files too.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>

#include "actsparse_op.hpp"

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<actsparse::ActSparseMatMul>>(),
    std::make_shared<ov::frontend::onnx::OpExtension<actsparse::ActSparseMatMul>>(
        "ActSparseMatMul", "ai.actsparse",
        std::map<std::string, std::string>{{"weight_format", "weight_format"},
                                           {"out_features", "out_features"},
                                           {"group_size", "group_size"},
                                           {"mode", "mode"},
                                           {"threshold", "threshold"},
                                           {"prefill", "prefill"},
                                           {"has_bias", "has_bias"}},
        std::map<std::string, ov::Any>{}),
}));
