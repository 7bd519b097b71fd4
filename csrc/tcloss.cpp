// Schemas of every native op (TORCH_LIBRARY) and the Python module stub that makes
// `import tcloss._C` load this library. Kernels are registered per device in cpu/ and cuda/;
// autograd and fake (meta) implementations are registered from Python (tcloss/_backends/).
#include <Python.h>
#include <torch/library.h>

// `import tcloss._C` only has to load the shared object: the ops register themselves
// with the dispatcher through static initialisers. No pybind11 needed. PyMODINIT_FUNC exports
// the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tcloss native kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(tcloss, m) {
  // Fused temporal loss, eq. 1. mask_mode: 0 signed_sum, 1 l1, 2 l2. reduction: 0 none,
  // 1 mean, 2 sum. With reduction mean/sum the forward can also return the gradients
  // (scaled by 1 / the reduction), which backward multiplies by grad_output. Gradients not
  // requested come back as empty (0,) tensors.
  m.def(
      "temporal_loss_fwd(Tensor pred_t, Tensor pred_tk, Tensor flow, Tensor img_t, Tensor img_tk, "
      "bool on_prob, int mask_mode, float mask_power, bool zeros_padding, int reduction, "
      "bool grad_pred_t, bool grad_pred_tk, bool grad_flow) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "temporal_loss_bwd(Tensor grad, Tensor pred_t, Tensor pred_tk, Tensor flow, Tensor img_t, "
      "Tensor img_tk, bool on_prob, int mask_mode, float mask_power, bool zeros_padding, "
      "int reduction, bool grad_pred_t, bool grad_pred_tk, bool grad_flow) -> (Tensor, Tensor, Tensor)");
}
