"""Graph-construction twins of the C++ ops (Python ``ov.Op``s of the same type, opset, inputs and attributes):
rewrites build them, and an IR round trip (``fuse.materialize``, or a saved export) turns them into the real ops."""
from __future__ import annotations

import openvino as ov

from ...runtime_ext import MLP_TYPE, OP_TYPE, OPENVINO_OPSET


class ActSparseMatMul(ov.Op):
    """Graph-construction twin of the C++ op: same type, opset, inputs and attributes."""

    TYPE, OUT_FEATURES = OP_TYPE, "out_features"  # its type and the attribute that gives its output's width

    def __init__(self, inputs=None, attrs=None):
        self._attrs = dict(attrs or {})
        super().__init__(self, inputs)

    def get_type_info(self):
        return ov.DiscreteTypeInfo(self.TYPE, OPENVINO_OPSET)

    def validate_and_infer_types(self):
        shape = self.get_input_partial_shape(0)
        shape[shape.rank.get_length() - 1] = ov.Dimension(self._attrs[self.OUT_FEATURES])
        self.set_output_type(0, self.get_input_element_type(0), shape)  # f32, or bf16 in and out

    def clone_with_new_inputs(self, new_inputs):
        return type(self)(new_inputs, self._attrs)

    def visit_attributes(self, visitor):
        visitor.on_attributes(self._attrs)
        return True


class ActSparseMLP(ActSparseMatMul):
    """Graph-construction twin of the C++ ActSparseMLP: inputs x and the blob; attributes ``up_*`` and ``down_*``
    (ActSparseMatMul's), ``activation``, ``gate`` and the blob's buffer sizes."""

    TYPE, OUT_FEATURES = MLP_TYPE, "down_out_features"
