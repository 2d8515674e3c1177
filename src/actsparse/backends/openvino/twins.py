"""Graph-construction twins of the C++ ops (Python ``ov.Op``s of the same type, opset, inputs and attributes):
rewrites build them, and an IR round trip (``fuse.materialize``, or a saved export) turns them into the real ops."""
from __future__ import annotations

import openvino as ov

from ...runtime_ext import MLP_TYPE, OP_TYPE, OPENVINO_OPSET


class ActSparseMatMul(ov.Op):
    """Graph-construction twin of the C++ op: same type, opset, inputs and attributes."""

    def __init__(self, inputs=None, attrs=None):
        self._attrs = dict(attrs or {})
        super().__init__(self, inputs)

    def get_type_info(self):
        return ov.DiscreteTypeInfo(OP_TYPE, OPENVINO_OPSET)

    def validate_and_infer_types(self):
        shape = self.get_input_partial_shape(0)
        shape[shape.rank.get_length() - 1] = ov.Dimension(self._attrs["out_features"])
        self.set_output_type(0, self.get_input_element_type(0), shape)  # f32, or bf16 in and out

    def clone_with_new_inputs(self, new_inputs):
        return ActSparseMatMul(new_inputs, self._attrs)

    def visit_attributes(self, visitor):
        visitor.on_attributes(self._attrs)
        return True


class ActSparseMLP(ActSparseMatMul):
    """Graph-construction twin of the C++ ActSparseMLP: inputs x, up weight and params, down weight and params;
    attributes ``up_*`` and ``down_*`` (ActSparseMatMul's), ``activation`` and ``gate``."""

    def get_type_info(self):
        return ov.DiscreteTypeInfo(MLP_TYPE, OPENVINO_OPSET)

    def validate_and_infer_types(self):
        shape = self.get_input_partial_shape(0)
        shape[shape.rank.get_length() - 1] = ov.Dimension(self._attrs["down_out_features"])
        self.set_output_type(0, self.get_input_element_type(0), shape)

    def clone_with_new_inputs(self, new_inputs):
        return ActSparseMLP(new_inputs, self._attrs)
